"""The report's verdict and warnings on hand-built results (no Ray): the paired standard error,
each verdict, each warning with its numbers, no "–" without its reason; the per-sequence sums the
evaluation records; texts repeated across the train/held-out split of real capture plans; the
demo's choice of what to serve."""

from __future__ import annotations

import json
import math
import re

import pytest

from orchestrator.kd.evaluate import SEQUENCES_KEY, gap_recovered
from orchestrator.driver.verdict import IMPROVING_NATS, MIN_SEQUENCES, MIN_TOKENS, Paired, paired_difference, repeated_texts, verdict, warnings


def _row(nll: float | None, teacher: float = 2.72, hard: float | None = None) -> dict:
    if nll is None:
        return {"model_dir": "/m", "wall_s": 1.0}
    row = {"student_nll": nll, "teacher_nll": teacher, "model_dir": "/m", "wall_s": 1.0}
    if hard is not None:
        row["gap_recovered"] = gap_recovered(student_nll=nll, scratch_nll=hard, teacher_nll=teacher)
    return row


def _rows(kd, hard, bc=None, teacher=2.72) -> dict:
    rows = {"kd": _row(kd, teacher, hard)}
    if hard is not None:
        rows["hard"] = _row(hard, teacher, hard)
    if bc is not None:
        rows["bc"] = _row(bc, teacher, hard)
    return rows


def test_paired_difference_is_a_ratio_estimate_with_its_clustered_standard_error():
    a = {"s1": [10, 30.0], "s2": [10, 20.0], "s3": [20, 50.0], "only-a": [5, 1.0],
         "other-length": [7, 3.0]}
    b = {"s1": [10, 32.0], "s2": [10, 21.0], "s3": [20, 52.0], "only-b": [5, 9.0],
         "other-length": [8, 3.0]}
    p = paired_difference(a, b)
    assert (p.sequences, p.positions) == (3, 40)   # unpaired and mismatched sequences left out
    assert p.diff == pytest.approx(-5 / 40)
    # d_i − D·n_i = −0.75, 0.25, 0.5 → sqrt(3/2 · 0.875) / 40
    assert p.se == pytest.approx(math.sqrt(1.5 * 0.875) / 40)
    assert paired_difference({"s1": [3, 1.0]}, {"s1": [3, 2.0]}).se is None
    assert paired_difference({"s1": [3, 1.0]}, {"s2": [3, 2.0]}) is None


def test_verdict_helped_with_margin_and_gap():
    rows = _rows(kd=2.98, hard=3.21, bc=3.10)
    text = verdict(rows, comparisons={"kd-hard": Paired(-0.23, 0.02, 64, 30000),
                                      "bc-hard": Paired(-0.11, 0.03, 64, 30000)})
    assert text == ("Distillation helped: the KD student's held-out NLL is 2.980 vs 3.210 "
                    "nats/token for hard labels (−0.230 ± 0.040, 2 s.e. over 64 held-out "
                    "sequences), closing 47% of the gap to the teacher (2.720); behaviour "
                    "cloning 3.100 (−0.110 ± 0.060 vs hard labels).")


def test_verdict_did_not_help_names_the_numbers():
    # the demo: KD 5.262 vs hard 4.902, teacher 4.570 after a short teacher budget
    text = verdict(_rows(kd=5.262, hard=4.902, teacher=4.570),
                   comparisons={"kd-hard": Paired(0.36, 0.02, 256, 120000)})
    assert text.startswith("Distillation did not help: the KD student's held-out NLL is 5.262 "
                           "vs 4.902 nats/token for hard labels (+0.360 ± 0.040")
    assert "the teacher is at 4.570" in text and "%" not in text


def test_verdict_inconclusive_within_noise():
    text = verdict(_rows(kd=3.20, hard=3.21),
                   comparisons={"kd-hard": Paired(-0.01, 0.02, 64, 30000)})
    assert text.startswith("Inconclusive (the difference is within noise): the KD student")
    assert "(−0.010 ± 0.040, 2 s.e. over 64 held-out sequences)" in text


def test_verdict_without_a_noise_estimate_says_so():
    text = verdict(_rows(kd=2.98, hard=3.21), comparisons={"kd-hard": None})
    assert text.startswith("Distillation seems to have helped (noise unknown")
    assert "±" not in text


def test_verdict_without_hard_baseline_or_held_out_split():
    text = verdict(_rows(kd=2.98, hard=None, bc=3.0), comparisons={},
                   no_hard_reason="no hard-label baseline was trained (train.baselines has "
                                  "no `hard`)")
    assert text == ("No verdict on distillation: no hard-label baseline was trained "
                    "(train.baselines has no `hard`), so nothing shows what the soft labels "
                    "added; the KD student's held-out NLL is 2.980 nats/token (behaviour cloning "
                    "3.000, the teacher's 2.720).")
    assert verdict({"kd": _row(None)}, comparisons={}).startswith(
        "No verdict: the students were not evaluated — there is no held-out split")


def test_verdict_when_the_teacher_is_no_better_than_hard_labels():
    text = verdict(_rows(kd=3.0, hard=3.1, teacher=3.5),
                   comparisons={"kd-hard": Paired(-0.1, 0.01, 60, 1)})
    assert text.endswith("; the teacher (3.500) is no better than the hard-label student, so "
                         "there is no gap to close.")


def _warn(rows=None, *, histories=None, sequences=None, tokens=None, repeated=None):
    return warnings(rows or {}, histories=histories or {}, heldout_sequences=sequences,
                    heldout_tokens=tokens, repeated=repeated)


def test_warning_small_heldout_split_names_counts_and_thresholds():
    (w,) = _warn(sequences=10, tokens=1548)
    assert w.startswith("Small held-out split: 10 sequences / 1,548 tokens evaluated")
    assert f"{MIN_SEQUENCES} sequences or {MIN_TOKENS:,} tokens" in w
    assert _warn(sequences=256, tokens=120_000) == []
    assert _warn(sequences=256, tokens=MIN_TOKENS - 1)


def test_repeated_texts_across_the_split():
    counts = repeated_texts(["a", "b", "a", "c", "e"], heldout=["a", "d", "c"])
    assert counts == {"heldout": 3, "repeated": 2, "train_copies": 3}
    (w,) = _warn(repeated=counts)
    assert w.startswith("Texts repeated across train and held-out: 2 of 3 held-out texts also "
                        "occur, exactly, in the training data (3 training records)")
    assert _warn(repeated=repeated_texts(["a"], heldout=["b"])) == []


def test_warning_student_better_than_teacher():
    rows = _rows(kd=5.2, hard=0.5, teacher=5.5)
    (w,) = _warn(rows)
    assert w == ("A student beats its teacher: the KD student's 5.200, the hard-label student's "
                 "0.500 vs the teacher's 5.500 nats/token held-out NLL. The teacher is weak on "
                 "this data, or the held-out texts leak into the training data.")


def test_warning_still_improving_at_the_last_evaluation():
    def evals(*nlls):
        return [{"step": 100 * (i + 1), "eval_student_nll": v} for i, v in enumerate(nlls)]

    history = {"kd": [{"step": 50}] + evals(5.5, 5.0, 4.9),
               "hard": evals(5.0, 5.0 - IMPROVING_NATS / 2), "bc": evals(4.8)}
    (w,) = _warn(histories=history)
    assert w.startswith("Still improving at the last evaluation (held-out NLL fell by more than "
                        f"{IMPROVING_NATS} nats/token): KD student 5.000 → 4.900 (step 200 → "
                        "300). More steps would help")
    assert "hard" not in w and "behaviour" not in w


# ---- the report files ---------------------------------------------------------------------

def _result(label, nlls: list[float], *, teacher=4.0, sequences=None):
    from orchestrator.train.launch import StudentResult

    history = [{"step": 10 * (i + 1), "ce": 5.0, "loss": 5.0, "step_time_s": 1.0,
                "data_wait_s": 0.1, "eval_student_nll": v, "eval_student_ppl": math.exp(v),
                "eval_teacher_nll": teacher, "eval_teacher_ppl": math.exp(teacher),
                "eval_kl": 0.5, "eval_top1": 0.4, "eval_positions": 1548}
               for i, v in enumerate(nlls)]
    if sequences is not None:
        history[-1][SEQUENCES_KEY] = sequences
    final = {}
    for h in history:
        final.update(h)
    return StudentResult(label, f"/exp/{label}/model", history, final, 12.0)


def _settings(baselines):
    from dataclasses import asdict

    from orchestrator.config import StudentConfig, TrainConfig

    return {"teacher": "/t", "k": 64, "mode": "score", "student": asdict(StudentConfig()),
            "train": asdict(TrainConfig()) | {"baselines": baselines},
            "captures": {"capture": {"shards": 1, "rows": 200, "tokens": 9000},
                         "held-out": {"shards": 1, "rows": 10, "tokens": 1558}}}


def _dashes_have_reasons(md: str) -> None:
    """Every "–" in report.md is a "– [n]" whose note "[n] …" says why."""
    for n in re.findall(r"– \[(\d+)\]", md):
        assert re.search(rf"^\[{n}\] \S", md, re.M), f"note [{n}] missing"
    assert md.count("–") == len(re.findall(r"– \[\d+\]", md)), md


def test_report_files_hold_verdict_warnings_and_reasons(tmp_path):
    from orchestrator.driver.report import headline, write_report

    kd_seqs = {f"s{i}": [150, 150 * (5.0 - 0.3 + 0.01 * (i % 3))] for i in range(10)}
    hard_seqs = {f"s{i}": [150, 150 * 5.0] for i in range(10)}
    results = {"kd": _result("kd", [5.2, 4.7], sequences=kd_seqs),
               "hard": _result("hard", [5.1, 5.0], sequences=hard_seqs)}
    path, report = write_report(str(tmp_path), results=results, settings=_settings(["hard"]),
                                repeated={"heldout": 10, "repeated": 4, "train_copies": 9})
    assert path == f"{tmp_path}/report.md"
    assert report["verdict"].startswith("Distillation helped: the KD student's held-out NLL is "
                                         "4.700 vs 5.000 nats/token for hard labels (−0.300 ± ")
    assert report["comparisons"]["kd-hard"]["sequences"] == 10
    kinds = [w.split(":")[0] for w in report["warnings"]]
    assert kinds == ["Small held-out split", "Texts repeated across train and held-out",
                     "Still improving at the last evaluation (held-out NLL fell by more than "
                     f"{IMPROVING_NATS} nats/token)"]
    assert "10 sequences / 1,548 tokens" in report["warnings"][0]
    md = (tmp_path / "report.md").read_text()
    assert f"**Verdict.** {report['verdict']}" in md
    assert all(f"- {w}" in md for w in report["warnings"])
    assert "| hard labels | 5.000 |" in md and "| baseline |" in md
    _dashes_have_reasons(md)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["verdict"] == report["verdict"]
    assert not any(SEQUENCES_KEY in h for h in on_disk["history"]["kd"])  # kept out of the file
    lines = headline(report)
    assert lines[0] == f"[bold]verdict[/]: {report['verdict']}" and len(lines) == 4


def test_report_without_hard_baseline_explains_each_dash(tmp_path):
    from orchestrator.driver.report import write_report

    results = {"kd": _result("kd", [4.5]), "bc": _result("bc", [4.6])}
    _, report = write_report(str(tmp_path), results=results, settings=_settings(["bc"]))
    assert report["verdict"].startswith("No verdict on distillation: no hard-label baseline was "
                                        "trained (train.baselines has no `hard`)")
    md = (tmp_path / "report.md").read_text()
    assert "| – [1] |" in md
    assert "[1] gap recovered: no hard-label baseline was trained (train.baselines has no " \
           "`hard`), so there is no gap to measure against" in md
    _dashes_have_reasons(md)


def test_report_when_the_teacher_is_not_better_than_hard_labels(tmp_path):
    from orchestrator.driver.report import write_report

    results = {"kd": _result("kd", [4.5], teacher=5.5), "hard": _result("hard", [0.5], teacher=5.5)}
    _, report = write_report(str(tmp_path), results=results, settings=_settings(["hard"]))
    md = (tmp_path / "report.md").read_text()
    assert "gap recovered: the teacher (5.500) is not better than the hard-label student " \
           "(0.500), so there is no gap to close" in md
    assert "A student beats its teacher: the KD student's 4.500, the hard-label student's " \
           "0.500 vs the teacher's 5.500" in " ".join(report["warnings"])
    _dashes_have_reasons(md)


# ---- the evaluation's per-sequence sums ---------------------------------------------------

def test_evaluate_records_per_sequence_sums_that_add_up():
    import numpy as np

    from orchestrator.driver import tiny
    from orchestrator.kd.evaluate import evaluate

    vocab, k = 64, 4
    model = tiny.build_model(tiny.llama_config(vocab, layers=1, hidden=64, heads=1,
                                               max_positions=64), seed=0)
    rng = np.random.default_rng(0)
    samples = []
    for i, length in enumerate([5, 9, 3, 12, 7]):
        ids = rng.integers(0, vocab, size=length)
        top = np.stack([rng.permutation(vocab)[:k] for _ in range(length)])
        top[-1] = -1  # the last position has no next token, hence no label
        samples.append({"sample_id": f"doc{i}", "input_ids": ids, "prompt_len": 0,
                        "label_start": 0, "topk_ids": top,
                        "topk_logprobs": np.log(np.full((length, k), 0.2, dtype=np.float32)),
                        "tail_mass": np.full((length, 1), 0.2, dtype=np.float32),
                        "tail_temperatures": [1.0]})
    per: dict = {}
    sums = evaluate(model, samples, batch_size=2, per_sequence=per)
    assert sorted(per) == [f"doc{i}" for i in range(5)]
    assert [per[f"doc{i}"][0] for i in range(5)] == [4, 8, 2, 11, 6]
    assert sum(n for n, _ in per.values()) == sums["positions"]
    assert sum(s for _, s in per.values()) == pytest.approx(sums["student_nll"], rel=1e-6)
    alone = evaluate(model, samples[3:4])  # one sequence on its own gives the same sum
    assert per["doc3"][1] == pytest.approx(alone["student_nll"], rel=1e-5)
    assert evaluate(model, samples, batch_size=2) == sums  # unchanged without per_sequence


# ---- texts repeated across real capture plans ---------------------------------------------

def test_repeated_texts_of_real_plans(tmp_path, tiny_teacher, texts):
    from tests.conftest import train_config, write_jsonl

    from orchestrator.shards.plan import plan_captures
    from orchestrator.data import stable_fraction
    from orchestrator.driver.verdict import repeated_in_plans

    distinct = texts[:20]
    records = [{"id": f"r{i}", "text": distinct[i % 20]} for i in range(60)]  # each text 3×
    data = write_jsonl(tmp_path / "data.jsonl", records)
    cfg = train_config(tmp_path / "out", tiny_teacher, data,
                       **{"data.eval_fraction": 0.2, "train.eval_samples": 8,
                          "train.baselines": "[hard]"})
    held = [r["text"] for r in records if stable_fraction(r["id"]) < 0.2][:8]
    train = [r["text"] for r in records if stable_fraction(r["id"]) >= 0.2]
    expected = {"heldout": len(held), "repeated": sum(t in set(train) for t in held),
                "train_copies": sum(t in set(held) for t in train)}
    assert expected["repeated"] > 0
    assert repeated_in_plans(plan_captures(cfg)) == expected

    own = write_jsonl(tmp_path / "eval.jsonl", [{"text": distinct[0]}, {"text": "fresh text"}])
    cfg = train_config(tmp_path / "out2", tiny_teacher, data,
                       **{"data.eval_path": own, "train.baselines": "[hard]"})
    assert repeated_in_plans(plan_captures(cfg)) == {"heldout": 2, "repeated": 1,
                                                     "train_copies": 3}


# ---- what the demo serves -------------------------------------------------------------------

def test_best_first_ranks_an_experiment_and_a_sweep_by_heldout_nll(tmp_path):
    from orchestrator.errors import RaydistillError
    from orchestrator.winners import best_first, find_models, models_of, why_served, write_winners

    exp = tmp_path / "experiments" / "exp-1"
    for label in ("kd", "hard", "bc"):
        (exp / label / "model").mkdir(parents=True)
        (exp / label / "model" / "config.json").write_text("{}")
    (exp / "report.json").write_text(json.dumps({"students": {
        "kd": {"student_nll": 4.756, "steps": 300}, "hard": {"student_nll": 4.902, "steps": 300},
        "bc": {"student_nll": 4.676, "steps": 300}}}))
    sweep = tmp_path / "sweeps" / "sweep-1"
    (sweep / "trials" / "t1" / "model").mkdir(parents=True)
    (sweep / "trials" / "t1" / "model" / "config.json").write_text("{}")
    (sweep / "trials" / "t1" / "done.json").write_text(json.dumps({"final": {"step": 40}}))
    write_winners(str(sweep), [{"id": "t00-1x128", "path": "trials/t1/model", "rank": 1,
                                "metrics": {"eval_kl": 1.2, "eval_student_nll": 5.89}}],
                  metric="eval_kl", mode="min")
    found = best_first([find_models(str(exp)), find_models(str(sweep))])
    assert [m.id for m in found] == ["bc", "kd", "hard", "t00-1x128"]
    lines = why_served(found[:2], found=found, dirs=[str(exp), str(sweep)])
    assert lines[0] == "  served: bc (experiment exp-1, 300 steps): held-out NLL 4.676"
    assert lines[3] == "  not served: t00-1x128 (sweep sweep-1, 40 steps): held-out NLL 5.890"
    assert lines[-1] == f"  `raydistill serve {sweep}` serves its models until Ctrl-C"
    with pytest.raises(RaydistillError, match="two models are both named 'kd'"):
        best_first([find_models(str(exp)), find_models(str(exp))])
    empty = tmp_path / "sweeps" / "sweep-0"  # a sweep none of whose trials finished
    empty.mkdir()
    found, held, notes = models_of([str(exp), str(empty)])
    assert [m.id for m in found] == ["bc", "kd", "hard"] and held == [str(exp)]
    assert len(notes) == 1 and notes[0].startswith(f"  nothing to serve from {empty}: ")
    with pytest.raises(RaydistillError, match="no finished students to serve"):
        models_of([str(empty), str(empty)])


def test_greedy_completions_section_escapes_table_breakers():
    from orchestrator.driver.completions import markdown

    rows = [{"prompt": "def f(a|b):\n    return `x`", "teacher": " a\nb | c", "kd": "d", "hard": "e"}]
    lines = markdown(rows, {"kd": "KD (soft labels)", "hard": "hard labels", "bc": "BC"})
    text = "\n".join(lines)
    assert lines[0] == "## Greedy completions"
    assert "**Prompt 1.** `def f(a\\|b):⏎    return ˋxˋ`" in text
    assert "| teacher |  a⏎b \\| c |" in text and "| KD (soft labels) | d |" in text
    assert "| hard labels | e |" in text and "BC" not in text  # a student without a row is left out
    assert markdown([], {"kd": "KD"}) == []


def test_verdict_names_the_offline_student_beside_a_mixed_one():
    """train.on_policy > 0 with the `offline` baseline: the sentence says what the same student
    reached without its on-policy samples."""
    rows = _rows(kd=3.05, hard=3.21)
    rows["offline"] = _row(2.98, 2.72, 3.21)
    text = verdict(rows, comparisons={"kd-hard": Paired(-0.16, 0.02, 64, 30000)})
    assert text.endswith("closing 33% of the gap to the teacher (2.720); offline KD (no "
                         "on-policy samples) 2.980 (47% of the gap).")
