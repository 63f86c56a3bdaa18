"""The experiment report: `report.json`, `report.md` and PNG plots (loss curves; student vs.
teacher metrics) comparing the KD student with the baselines on the held-out split.

It opens with the verdict — one sentence on whether distillation helped, with the margin against
evaluation noise — and the warnings that qualify it (`orchestrator.driver.verdict`); the command prints
both as its last lines (`headline`).

"% of the gap recovered" = (NLL of the from-scratch hard-label student − NLL of the student) /
(NLL of the hard-label student − NLL of the teacher), on the same held-out positions.
"""

from __future__ import annotations

import json
import os
import tempfile

from orchestrator.kd.evaluate import SEQUENCES_KEY, gap_recovered
from orchestrator.shards.plan import CaptureKind
from orchestrator.storage import filesystem
from orchestrator.driver.completions import markdown as completions_markdown
from orchestrator.driver.verdict import NAMES, Z, paired_difference, verdict, warnings

__all__ = ["NAMES", "headline", "summarise", "write_report"]


def summarise(results: dict) -> dict:
    """label → the final held-out metrics, with the gap recovered against the hard baseline."""
    rows = {}
    scratch = results.get("hard")
    for label, r in results.items():
        f = r.final
        row = {"model_dir": r.model_dir, "wall_s": round(r.wall_s, 1), "steps": f.get("step"),
               "tokens_per_s": _mean(r.history, "tokens_per_s"),
               "padding_share": _mean(r.history, "padding_share"),
               "data_wait_share": _mean_wait(r.history)}
        sampled = [h for h in r.history if h.get("onpolicy_samples_per_s")]  # past start_step
        on_policy = {key: _mean(sampled, key) for key in ON_POLICY_KEYS
                     if sampled and _mean(sampled, key) is not None}
        if on_policy:
            on_policy["onpolicy_staleness_max"] = max(
                h.get("onpolicy_staleness_max", 0) for h in r.history)
            row["on_policy"] = on_policy
        for key in ("eval_student_nll", "eval_student_ppl", "eval_teacher_nll", "eval_teacher_ppl",
                    "eval_kl", "eval_top1", "eval_positions"):
            if key in f:
                row[key.removeprefix("eval_")] = f[key]
        if scratch is not None and "student_nll" in row and "eval_student_nll" in scratch.final:
            row["gap_recovered"] = gap_recovered(
                student_nll=row["student_nll"], scratch_nll=scratch.final["eval_student_nll"],
                teacher_nll=row["teacher_nll"])
        rows[label] = row
    return rows


ON_POLICY_KEYS = ("onpolicy_samples_per_s", "onpolicy_generate_share", "onpolicy_score_share",
                  "onpolicy_sync_share", "onpolicy_train_share", "onpolicy_wait_share",
                  "onpolicy_sync_s", "onpolicy_load_s", "onpolicy_staleness",
                  "onpolicy_new_tokens", "onpolicy_teacher_nll")
"""The on-policy figures of a student's training history the report averages."""


def compare(results: dict) -> dict:
    """"kd-hard", "bc-hard" → the paired NLL difference of the two students' last evaluations
    (`verdict.Paired`; None where either did not record its per-sequence sums)."""
    out = {}
    for a, b in (("kd", "hard"), ("bc", "hard")):
        if a in results and b in results:
            sa, sb = (results[x].final.get(SEQUENCES_KEY) for x in (a, b))
            out[f"{a}-{b}"] = paired_difference(sa, sb) if sa and sb else None
    return out


def _mean(history: list[dict], key: str) -> float | None:
    """The mean of a per-window metric over the run (training throughput: every report window)."""
    values = [h[key] for h in history if h.get(key) is not None]
    return sum(values) / len(values) if values else None


def _mean_wait(history: list[dict]) -> float | None:
    times = sum(h.get("step_time_s", 0.0) for h in history)
    waits = sum(h.get("data_wait_s", 0.0) for h in history)
    return waits / times if times else None


def _no_hard_reason(settings: dict) -> str | None:
    if "hard" not in settings["train"].get("baselines", []):
        return "no hard-label baseline was trained (train.baselines has no `hard`)"
    if settings.get("mode") == "sample":
        return ("no hard-label baseline was trained (a sample-mode capture holds no dataset "
                "text to learn from)")
    return None


def build_report(results: dict, *, settings: dict, repeated: dict | None = None,
                 completions: list[dict] | None = None) -> dict:
    """What report.json holds: verdict, warnings, per-student rows, the paired comparisons, the
    settings and each student's history (without its per-sequence sums)."""
    rows = summarise(results)
    comparisons = compare(results)
    evaluated = [r for r in results.values() if "eval_student_nll" in r.final]
    sequences = next((len(r.final[SEQUENCES_KEY]) for r in evaluated if SEQUENCES_KEY in r.final),
                     settings.get("captures", {}).get(CaptureKind.HELDOUT.label, {}).get("rows"))
    tokens = next((r.final.get("eval_positions") for r in evaluated), None)
    histories = {label: [{k: v for k, v in h.items() if k != SEQUENCES_KEY} for h in r.history]
                 for label, r in results.items()}
    return {
        "verdict": verdict(rows, comparisons=comparisons,
                           no_hard_reason=_no_hard_reason(settings)),
        "warnings": warnings(rows, histories=histories,
                             heldout_sequences=sequences if evaluated else None,
                             heldout_tokens=tokens, repeated=repeated),
        "heldout": {"sequences": sequences if evaluated else None, "positions": tokens,
                    "repeated_texts": repeated},
        "comparisons": {k: None if p is None else p.as_dict() for k, p in comparisons.items()},
        "students": rows, "settings": settings, "history": histories,
        "completions": completions or []}


def headline(report: dict) -> list[str]:
    """The verdict and the warnings as terminal lines (the command's last lines)."""
    return [f"[bold]verdict[/]: {report['verdict']}"] + [f"[yellow]warning[/]: {w}"
                                                          for w in report.get("warnings", [])]


def write_report(out_uri: str, *, results: dict, settings: dict, repeated: dict | None = None,
                 completions: list[dict] | None = None) -> tuple[str, dict]:
    """Write report.json, report.md and plots/ under `out_uri` (local or s3://); returns the
    Markdown report's location and the report (`build_report`). `repeated`: texts repeated
    across the training and held-out data (`verdict.repeated_texts`), if counted."""
    report = build_report(results, settings=settings, repeated=repeated,
                          completions=completions)
    rows = report["students"]
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "plots"))
        with open(os.path.join(tmp, "report.json"), "w") as f:
            json.dump(report, f, indent=1)
        plots = _plots(tmp, results, rows)
        with open(os.path.join(tmp, "report.md"), "w") as f:
            f.write(_markdown(report, plots))
        _upload(tmp, out_uri)
    return f"{out_uri.rstrip('/')}/report.md", report


def _upload(local_dir: str, out_uri: str) -> None:
    import pyarrow.fs as pafs

    fs, root = filesystem(out_uri)
    fs.create_dir(root, recursive=True)
    pafs.copy_files(local_dir, root, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)


class _Notes:
    """Numbered reasons for the "–" cells of a table: the same reason gets the same number."""

    def __init__(self):
        self.reasons: list[str] = []

    def dash(self, reason: str) -> str:
        if reason not in self.reasons:
            self.reasons.append(reason)
        return f"– [{self.reasons.index(reason) + 1}]"

    def lines(self) -> list[str]:
        return [f"[{n}] {r}" + "  " for n, r in enumerate(self.reasons, start=1)]


def _gap_cell(label: str, r: dict, rows: dict, settings: dict, notes: _Notes) -> str:
    gap = r.get("gap_recovered")
    if label == "hard" and gap is not None:
        return "baseline"
    if gap is not None:
        return f"{100 * gap:.0f}%"
    if r.get("student_nll") is None:
        return notes.dash(_NOT_EVALUATED)
    hard = rows.get("hard", {})
    if hard.get("student_nll") is None:
        return notes.dash(f"gap recovered: {_no_hard_reason(settings) or 'no hard-label baseline'}"
                          ", so there is no gap to measure against")
    return notes.dash(f"gap recovered: the teacher ({r.get('teacher_nll', 0):.3f}) is not better "
                      f"than the hard-label student ({hard['student_nll']:.3f}), so there is no "
                      "gap to close")


_NOT_EVALUATED = ("not evaluated: there is no held-out split (set data.eval_path, or "
                  "data.eval_fraction > 0)")


def _markdown(report: dict, plots: list[str]) -> str:
    rows, settings = report["students"], report["settings"]
    tr = settings["train"]
    lines = ["# Distillation report", "", f"**Verdict.** {report['verdict']}", ""]
    if report["warnings"]:
        lines += ["**Warnings**", ""] + [f"- {w}" for w in report["warnings"]] + [""]
    lines += [
        f"Teacher `{settings['teacher']}` (top-{settings['k']}, {settings['mode']} mode); student "
        f"{_shape(settings['student'])}; {tr['max_steps']} steps × {tr['batch_size']} × "
        f"{tr['grad_accum']} sequences per worker, {max(tr['num_workers'], 1)} worker(s), seed "
        f"{tr['seed']}; KD loss {tr['loss']} at T={tr['temperature']}, alpha={tr['alpha']}, "
        f"tail={tr['tail']}.", "",
        "Held-out split, teacher-scored. NLL in nats/token; KL(teacher‖student) over the teacher's "
        "top-k + tail; top-1 = the student's argmax is the teacher's.", "",
        "| student | NLL | perplexity | teacher NLL | KL | top-1 | gap recovered | wall s | "
        "train tokens/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    notes = _Notes()
    for label, r in rows.items():
        cells = [NAMES.get(label, label)]
        for key, spec in (("student_nll", ".3f"), ("student_ppl", ".1f"), ("teacher_nll", ".3f"),
                          ("kl", ".3f"), ("top1", ".1%")):
            value = r.get(key)
            cells.append(notes.dash(_NOT_EVALUATED) if value is None else format(value, spec))
        cells += [_gap_cell(label, r, rows, settings, notes), f"{r['wall_s']:.0f}",
                  f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s")
                  else notes.dash("no training throughput was reported for this student")]
        lines.append("| " + " | ".join(cells) + " |")
    if notes.reasons:
        lines += [""] + notes.lines()
    lines += _throughput(rows, packing=bool(tr.get("packing")))
    lines += _on_policy(rows, settings)
    if any(report["comparisons"].values()):
        pairs = [p for p in report["comparisons"].values() if p]
        lines += ["", f"± = {Z:g} standard errors of the paired difference of two students' NLL "
                  f"over the {pairs[0]['sequences']} held-out sequences both were scored on "
                  f"({pairs[0]['positions']:,} positions): evaluation noise, not seed-to-seed "
                  "variation (each student is trained once)."]
    lines += ["", "Captures: " + ", ".join(
        f"{k} {v['shards']} shards / {v['rows']} samples / {v['tokens']} tokens"
        for k, v in settings["captures"].items()), ""]
    for label, r in rows.items():
        lines.append(f"- {NAMES.get(label, label)}: `{r['model_dir']}` (Hugging Face directory)")
    lines.append("")
    lines += [f"![{os.path.splitext(os.path.basename(p))[0]}]({p})" for p in plots]
    lines += [""] + completions_markdown(report.get("completions") or [],
                                         {label: NAMES.get(label, label) for label in rows})
    return "\n".join(lines) + "\n"


def _throughput(rows: dict, *, packing: bool) -> list[str]:
    """One line on the padding the students' batches held, or that packing removed."""
    shares = {label: r["padding_share"] for label, r in rows.items()
              if r.get("padding_share") is not None}
    if not shares:
        return []
    share = sum(shares.values()) / len(shares)
    if packing:
        return ["", f"Packing (train.packing) removed the padding a padded layout of these "
                f"batches would hold: {share:.0%} of its token slots, on average over the "
                "students; train tokens/s counts real tokens only."]
    return ["", f"{share:.0%} of the students' batch slots were padding; `train.packing: true` "
            "removes it (BENCHMARKS.md, packing)."]


def _on_policy(rows: dict, settings: dict) -> list[str]:
    """The on-policy students' loop: where the trainer's time went, samples/s, staleness."""
    on = {label: r["on_policy"] for label, r in rows.items() if r.get("on_policy")}
    if not on:
        return []
    o, share = settings.get("on_policy", {}), settings["train"].get("on_policy")
    lines = ["", "## On-policy samples", "",
             f"Share λ = {share} of each batch from the student's own samples (train.on_policy): "
             f"{o.get('max_new_tokens')} new tokens at most, temperature {o.get('temperature')}, "
             f"learned with {o.get('loss')} on the generated tokens; weights refreshed every "
             f"{o.get('sync_every')} step(s), staleness at most {o.get('max_staleness')}. Time "
             "shares are of the trainer's wall time: rollouts and scoring run beside training "
             "(the next step's samples are made while this one trains), so the shares can sum "
             "past 100%; *waiting* is the time training stood still for samples.", "",
             "| student | samples/s | rollout | teacher scoring | weight sync | training | "
             "waiting | sync s/step | staleness (mean / max) | new tokens/sample | teacher NLL "
             "of the samples |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, m in on.items():
        lines.append(
            f"| {NAMES.get(label, label)} | {m['onpolicy_samples_per_s']:.2f} | "
            f"{m['onpolicy_generate_share']:.0%} | {m['onpolicy_score_share']:.0%} | "
            f"{m['onpolicy_sync_share']:.0%} | {m['onpolicy_train_share']:.0%} | "
            f"{m['onpolicy_wait_share']:.0%} | {m['onpolicy_sync_s']:.3f} | "
            f"{m['onpolicy_staleness']:.2f} / {m['onpolicy_staleness_max']:.0f} | "
            f"{m['onpolicy_new_tokens']:.1f} | {m['onpolicy_teacher_nll']:.3f} |")
    return lines


def _shape(student: dict) -> str:
    from orchestrator.shapes import resolve_shape

    if student.get("model"):
        return f"pretrained `{student['model']}`"
    s = resolve_shape(preset=student["preset"], layers=student["layers"], hidden=student["hidden"],
                      heads=student["heads"], intermediate=student["intermediate"])
    return f"{s.layers} layers × {s.hidden} hidden ({s.heads} heads, MLP {s.intermediate})"


def _plots(tmp: str, results: dict, rows: dict) -> list[str]:
    """plots/loss.png (learning curves: training CE, held-out NLL and KL per student over steps) and
    plots/metrics.png (held-out NLL, KL and top-1 per student, teacher NLL as a line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 4))
    for label, r in results.items():
        steps = [h["step"] for h in r.history]
        ax1.plot(steps, [h["ce"] for h in r.history], label=NAMES.get(label, label))
        ev = [h for h in r.history if "eval_student_nll" in h]
        if ev:
            ax2.plot([h["step"] for h in ev], [h["eval_student_nll"] for h in ev], marker="o",
                     label=NAMES.get(label, label))
            ax3.plot([h["step"] for h in ev], [h["eval_kl"] for h in ev], marker="o",
                     label=NAMES.get(label, label))
    teacher = next((r.get("teacher_nll") for r in rows.values() if r.get("teacher_nll")), None)
    if teacher is not None:
        ax2.axhline(teacher, color="black", linestyle="--", label="teacher")
    ax1.set(title="training cross-entropy (hard labels)", xlabel="step", ylabel="nats/token")
    ax2.set(title="held-out NLL", xlabel="step", ylabel="nats/token")
    ax3.set(title="held-out KL(teacher‖student)", xlabel="step", ylabel="nats/token")
    for ax in (ax1, ax2, ax3):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(tmp, "plots", "loss.png"), dpi=110)
    plt.close(fig)
    out.append("plots/loss.png")

    evaluated = {k: v for k, v in rows.items() if "student_nll" in v}
    if evaluated:
        labels = [NAMES.get(k, k) for k in evaluated]
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
        for ax, key, title in zip(axes, ("student_nll", "kl", "top1"),
                                  ("held-out NLL (nats/token)", "KL(teacher‖student)",
                                   "top-1 agreement")):
            ax.bar(labels, [v[key] for v in evaluated.values()], color="#4c72b0")
            if key == "student_nll":  # zoom in: the differences are tenths of a nat
                values = [v[key] for v in evaluated.values()] + ([teacher] if teacher else [])
                ax.set_ylim(min(values) - 0.3, max(values) + 0.2)
                if teacher is not None:
                    ax.axhline(teacher, color="black", linestyle="--", label="teacher")
                    ax.legend()
            ax.set_title(title)
            ax.tick_params(axis="x", labelrotation=15)
        fig.tight_layout()
        fig.savefig(os.path.join(tmp, "plots", "metrics.png"), dpi=110)
        plt.close(fig)
        out.append("plots/metrics.png")
    return out
