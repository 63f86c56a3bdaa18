"""`raydistill run`: students train on the shards while the teachers still produce them — they wait
(and report the wait) for a slow teacher, a fast teacher pauses for them (backpressure). The
command end to end on a real vLLM teacher, its students loaded by vLLM, is tests/test_demo.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import (assert_split_main_truncated_heldout, capture_folder, train_config,
                      write_jsonl)


def _dataset(tmp_path, texts):
    return write_jsonl(tmp_path / "d.jsonl", [{"id": i, "text": t} for i, t in enumerate(texts)])


def _report(path) -> dict:
    return json.loads((Path(path).parent / "report.json").read_text())


@pytest.mark.slow
def test_students_train_while_a_slow_teacher_is_still_capturing(tmp_path, tiny_teacher, texts,
                                                                ray_session, monkeypatch):
    from orchestrator.driver import pipeline

    monkeypatch.setenv("RAYDISTILL_TEST_TEACHER_DELAY_S", "1.0")  # a real teacher, made slow
    cfg = train_config(tmp_path / "out", tiny_teacher, _dataset(tmp_path, texts), **{
        "capture.samples_per_shard": 4, "capture.max_inflight_per_actor": 1,
        "train.baselines": "[]", "train.max_steps": 60, "train.eval_every": 30,
        "train.log_every": 3})
    report = _report(pipeline.run(cfg))
    manifest = json.loads((capture_folder(tmp_path / "out") / "manifest.json").read_text())
    assert manifest["complete"] and report["settings"]["streaming"]["streamed"]
    samples = sum(s["rows"] for s in manifest["shards"])
    assert samples < 60 * 4, "the capture must hold less than the run's 60 steps × 4 samples"
    kd = report["history"]["kd"]
    # the student reported progress before the last shard was captured …
    assert kd[0]["time"] < manifest["updated"]
    # … waited for the teacher and said so, and read later epochs from the persisted shards
    assert report["students"]["kd"]["data_wait_share"] > 0.2
    assert kd[-1]["step"] == 60 and kd[-1]["epoch"] >= 1


@pytest.mark.slow
def test_a_fast_teacher_pauses_for_the_students(tmp_path, tiny_teacher, texts, ray_session):
    from orchestrator.driver import pipeline

    cfg = train_config(tmp_path / "out", tiny_teacher, _dataset(tmp_path, texts), **{
        "capture.samples_per_shard": 4, "train.max_shards_ahead": 2, "train.baselines": "[]",
        "train.max_steps": 24, "train.eval_every": 12})
    report = _report(pipeline.run(cfg))
    assert report["settings"]["streaming"]["capture_paused_s"] > 0
    assert json.loads((capture_folder(tmp_path / "out") / "manifest.json").read_text())["complete"]
    assert report["history"]["kd"][-1]["step"] == 24


@pytest.mark.slow
@pytest.mark.parametrize("heldout", ["eval_fraction", "eval_path"])
def test_run_splits_the_training_texts_the_heldout_capture_started_the_engine_for(
        heldout, tmp_path, tiny_teacher, texts, ray_session):
    """`run` captures the held-out split first (truncated, as documented), on the engine the
    main capture then streams through: the main capture's long texts are still split into
    `#p<j>` pieces, none truncated, and the students train on them and evaluate on the
    held-out shards (both checked against what their shards say was done)."""
    from orchestrator.driver import pipeline

    main = {str(i): t for i, t in enumerate(texts[:24])}
    sets = {"data.long_text": "split", "data.max_length": 64, "train.baselines": "[]",
            "train.max_steps": 4, "train.eval_every": 2, "train.log_every": 2}
    if heldout == "eval_path":
        held = {f"e{i}": t for i, t in enumerate(texts[60:66])}
        sets["data.eval_path"] = write_jsonl(tmp_path / "e.jsonl",
                                             [{"id": i, "text": t} for i, t in held.items()])
    else:
        held, sets["data.eval_fraction"] = {}, 0.25
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": i, "text": t} for i, t in main.items()])
    cfg = train_config(tmp_path / "out", tiny_teacher, data, **sets)
    report = _report(pipeline.run(cfg))
    assert_split_main_truncated_heldout(tmp_path / "out", tiny_teacher, main | held, max_length=64)
    assert report["history"]["kd"][-1]["step"] == 4
    assert report["students"]["kd"]["student_nll"] > 0  # evaluated on the held-out shards
