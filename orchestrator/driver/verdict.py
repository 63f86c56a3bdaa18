"""Whether distillation helped, in one sentence, and what should make a reader doubt it.

`verdict` compares the KD student with the hard-label baseline (and behaviour cloning, and the
teacher) on held-out NLL. The margin against noise is the paired standard error of the NLL
difference (`paired_difference`): both students are scored on the same held-out sequences, so
each sequence gives one difference, and the spread of those differences says how far the mean
difference could move with another held-out sample of the same size. It measures evaluation
noise only — each student is trained once, with one seed, so seed-to-seed variation is not in it.

`warnings` names the numbers behind each doubt: a small held-out split, texts repeated across
the training and held-out data (`repeated_texts`), a student better than its teacher, students
still improving at their last evaluation. Pure functions on plain values (no Ray, no torch), so
the report, the command's last lines and the tests use the same sentences.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

Z = 2.0
"""The margin is Z standard errors (≈ 95% for a normal difference)."""
MIN_SEQUENCES = 50
"""Fewer held-out sequences: one document dominates the mean and the standard error, estimated
from the sequences themselves, is itself unreliable."""
MIN_TOKENS = 20_000
"""Fewer held-out tokens: with per-token NLLs spreading ~2–3 nats and neighbouring tokens
correlated, differences of a few hundredths of a nat (what KD settings change) are noise."""
IMPROVING_NATS = 0.02
"""A held-out NLL falling by more than this (nats/token) between the last two evaluations: the
student is still learning."""
NAMES = {"kd": "KD (soft labels)", "hard": "hard labels", "bc": "behaviour cloning",
         "offline": "offline KD"}
STUDENT = {"kd": "KD student", "hard": "hard-label student", "bc": "behaviour-cloning student",
           "offline": "offline KD student"}


@dataclass(frozen=True)
class Paired:
    """Mean NLL difference a − b (nats/token) over the sequences both students were scored on."""

    diff: float
    se: float | None
    """Its standard error; None with fewer than 2 sequences."""
    sequences: int
    positions: int

    def as_dict(self) -> dict:
        return {"diff": self.diff, "se": self.se, "sequences": self.sequences,
                "positions": self.positions}


def paired_difference(a: dict, b: dict) -> Paired | None:
    """a, b: {sample_id: [positions, NLL sum]} of two students' last evaluations. Pairs the
    sequences both hold with the same positions; the mean per-token difference D = Σd_i / Σn_i
    (d_i: a's NLL sum − b's on sequence i, n_i its positions) is a ratio estimate, whose standard
    error is sqrt(N/(N−1) · Σ(d_i − D·n_i)²) / Σn_i (sequences as clusters of tokens)."""
    pairs = [(a[k][0], a[k][1] - b[k][1]) for k in a if k in b and a[k][0] == b[k][0]]
    pairs = [(n, d) for n, d in pairs if n > 0]
    if not pairs:
        return None
    total = sum(n for n, _ in pairs)
    mean = sum(d for _, d in pairs) / total
    se = None
    if len(pairs) > 1:
        spread = sum((d - mean * n) ** 2 for n, d in pairs)
        se = math.sqrt(len(pairs) / (len(pairs) - 1) * spread) / total
    return Paired(diff=mean, se=se, sequences=len(pairs), positions=total)


def _nats(x: float) -> str:
    return f"{x:.3f}"


def _signed(x: float) -> str:
    return f"{'−' if x < 0 else '+'}{abs(x):.3f}"


def _noise(p: Paired | None) -> str:
    if p is None or p.se is None:
        return ""
    return f" ± {Z * p.se:.3f}, {Z:g} s.e. over {p.sequences} held-out sequences"


def verdict(rows: dict, *, comparisons: dict[str, Paired | None],
            no_hard_reason: str | None = None) -> str:
    """One sentence: did distillation help? rows: label → summary row (student_nll, teacher_nll,
    gap_recovered, …) as `report.summarise` makes them; comparisons: "kd-hard", "bc-hard" →
    `paired_difference` (None: not recorded)."""
    kd, hard, bc = (rows.get(k) or {} for k in ("kd", "hard", "bc"))
    if "student_nll" not in kd:  # (an "offline" row: the KD student without its on-policy share)
        return ("No verdict: the students were not evaluated — there is no held-out split "
                "(set data.eval_path, or data.eval_fraction > 0).")
    teacher = kd.get("teacher_nll")
    teacher_text = f"the teacher's {_nats(teacher)}" if teacher is not None else ""
    if "student_nll" not in hard:
        why = no_hard_reason or "no hard-label baseline was trained"
        others = [f"behaviour cloning {_nats(bc['student_nll'])}"] if "student_nll" in bc else []
        others += [teacher_text] if teacher_text else []
        return (f"No verdict on distillation: {why}, so nothing shows what the soft labels "
                f"added; the KD student's held-out NLL is {_nats(kd['student_nll'])} nats/token"
                + (f" ({', '.join(others)})" if others else "") + ".")
    diff = kd["student_nll"] - hard["student_nll"]
    pair = comparisons.get("kd-hard")
    if pair is not None and pair.se is not None:
        beyond = abs(diff) > Z * pair.se
        head = ("Distillation helped" if beyond and diff < 0 else "Distillation did not help"
                if beyond else "Inconclusive (the difference is within noise)")
    else:
        head = (("Distillation seems to have helped" if diff < 0 else
                 "Distillation seems not to have helped")
                + " (noise unknown: the evaluation recorded no per-sequence NLL)")
    text = (f"{head}: the KD student's held-out NLL is {_nats(kd['student_nll'])} vs "
            f"{_nats(hard['student_nll'])} nats/token for hard labels ({_signed(diff)}"
            f"{_noise(pair)})")
    gap = kd.get("gap_recovered")
    if teacher is not None and gap is not None and gap >= 0:
        text += f", closing {gap:.0%} of the gap to the teacher ({_nats(teacher)})"
    elif teacher is not None and gap is not None:
        text += f"; the teacher is at {_nats(teacher)}"
    elif teacher is not None:
        text += (f"; the teacher ({_nats(teacher)}) is no better than the hard-label student, "
                 "so there is no gap to close")
    offline = rows.get("offline") or {}
    if "student_nll" in offline:  # the KD student was mixed with on-policy samples
        og = offline.get("gap_recovered")
        text += (f"; offline KD (no on-policy samples) {_nats(offline['student_nll'])}"
                 + (f" ({og:.0%} of the gap)" if og is not None and og >= 0 else ""))
    if "student_nll" in bc:
        bc_pair = comparisons.get("bc-hard")
        text += (f"; behaviour cloning {_nats(bc['student_nll'])} "
                 f"({_signed(bc['student_nll'] - hard['student_nll'])}"
                 f"{'' if bc_pair is None or bc_pair.se is None else f' ± {Z * bc_pair.se:.3f}'}"
                 " vs hard labels)")
    return text + "."


def warnings(rows: dict, *, histories: dict[str, list[dict]], heldout_sequences: int | None,
             heldout_tokens: int | None, repeated: dict | None) -> list[str]:
    """Each doubt about the comparison, naming its numbers. histories: label → the student's
    metric rows (`eval_student_nll` where it was evaluated); repeated: `repeated_texts`' dict."""
    out = []
    small = ((heldout_sequences is not None and heldout_sequences < MIN_SEQUENCES)
             or (heldout_tokens is not None and heldout_tokens < MIN_TOKENS))
    if small:
        seqs = "?" if heldout_sequences is None else f"{heldout_sequences:,}"
        toks = "?" if heldout_tokens is None else f"{heldout_tokens:,}"
        out.append(f"Small held-out split: {seqs} sequences / {toks} tokens evaluated (below "
                   f"{MIN_SEQUENCES} sequences or {MIN_TOKENS:,} tokens, NLL differences of a few "
                   "hundredths of a nat are noise); use more held-out text (data.eval_path, "
                   "data.eval_fraction) and raise train.eval_samples.")
    if repeated and repeated.get("repeated"):
        out.append(f"Texts repeated across train and held-out: {repeated['repeated']} of "
                   f"{repeated['heldout']} held-out texts also occur, exactly, in the training "
                   f"data ({repeated['train_copies']} training records): held-out NLL flatters "
                   "every student that saw them. Remove the duplicates from data.path (a split by "
                   "data.eval_fraction separates records by id, not by text).")
    beaten = [(label, r["student_nll"], r["teacher_nll"]) for label, r in rows.items()
              if r.get("student_nll") is not None and r.get("teacher_nll") is not None
              and r["student_nll"] < r["teacher_nll"]]
    if beaten:
        listed = ", ".join(f"the {STUDENT.get(label, label)}'s {_nats(nll)}"
                           for label, nll, _ in beaten)
        out.append(f"A student beats its teacher: {listed} vs the teacher's "
                   f"{_nats(beaten[0][2])} nats/token held-out NLL. The teacher is weak on this "
                   "data, or the held-out texts leak into the training data.")
    improving = []
    for label, history in histories.items():
        evals = [h for h in history if "eval_student_nll" in h]
        if len(evals) >= 2:
            prev, last = evals[-2], evals[-1]
            if prev["eval_student_nll"] - last["eval_student_nll"] > IMPROVING_NATS:
                improving.append(f"{STUDENT.get(label, label)} {_nats(prev['eval_student_nll'])} "
                                 f"→ {_nats(last['eval_student_nll'])} (step {prev['step']} → "
                                 f"{last['step']})")
    if improving:
        out.append(f"Still improving at the last evaluation (held-out NLL fell by more than "
                   f"{IMPROVING_NATS} nats/token): {'; '.join(improving)}. More steps would help "
                   "(raise train.max_steps); the comparison is of students mid-training.")
    return out


def _text_key(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def repeated_texts(train: Iterable[str], *, heldout: Iterable[str]) -> dict:
    """Exact duplicates across the split: {"heldout": held-out texts, "repeated": how many of them
    occur in `train`, "train_copies": training records holding one}. Holds only the held-out
    texts' hashes; streams `train`."""
    held_keys = [_text_key(t) for t in heldout]
    wanted = set(held_keys)
    found: set[bytes] = set()
    copies = 0
    for text in train:
        key = _text_key(text)
        if key in wanted:
            found.add(key)
            copies += 1
    return {"heldout": len(held_keys), "repeated": sum(k in found for k in held_keys),
            "train_copies": copies}


def plan_texts(plan) -> Iterator[str]:
    """The texts (or prompts, in sample mode) of a capture plan's records — the same records, in
    the same split, that its capture reads (`capture_plan.CapturePlan.units`)."""
    from orchestrator import data as data_mod
    from orchestrator.shards.records import record_args

    d = plan.cfg.data
    for record in data_mod.iter_records(data_mod.dataset_files(d.path), id_field=d.id_field,
                                        on_bad_line="skip", limit=d.limit, keep=plan.split,
                                        **record_args(plan.cfg)):
        yield record.content


def repeated_in_plans(plans: list) -> dict | None:
    """`repeated_texts` of the main capture's records against the held-out capture's (None
    without a held-out capture): one pass over the data, holding the held-out texts' hashes."""
    from orchestrator.shards.plan import CaptureKind

    by_kind = {p.kind: p for p in plans}
    if CaptureKind.HELDOUT not in by_kind:
        return None
    return repeated_texts(plan_texts(by_kind[CaptureKind.MAIN]),
                          heldout=plan_texts(by_kind[CaptureKind.HELDOUT]))
