"""The README's main job, `raydistill demo`, end to end on a tiny budget: teacher built and cached,
capture streamed into a KD student, both baselines, the report, a sweep on the same capture with
its leaderboard, and the winner served and queried through the openai client."""

import json
import math

import pytest

from orchestrator.cli import main
from orchestrator.shards import read_shards

TINY = ["--set", "data.limit=12", "--set", "teacher.kv_cache_gib=0.25",
        "--set", "train.max_steps=6", "--set", "train.eval_every=3", "--set", "train.log_every=3",
        "--set", "train.batch_size=2", "--set", "train.eval_samples=8",
        "--set", "tune.max_steps=4", "--set", "tune.eval_every=2", "--set", "tune.latency_tokens=2"]
TWO_TRIALS = ["--set", "tune.space={student: {grid: [{preset: nano}, {preset: micro}]}}"]
ONE_TRIAL = ["--set", "tune.space={train.temperature: {grid: [1.0]}}"]


@pytest.mark.slow
def test_demo_builds_teacher_captures_trains_and_reports(tmp_path, ray_session, monkeypatch,
                                                          capsys):
    monkeypatch.chdir(tmp_path)
    home = tmp_path / "home"
    assert main(["demo", "--home", str(home), "--teacher-minutes", "0.25", *TINY,
                 *TWO_TRIALS]) == 0
    info = json.loads((home / "demo-teacher" / "demo.json").read_text())
    assert info["steps"] > 0 and info["heldout_nats"] < math.log(info["vocab_size"])
    assert (home / "demo-data" / "transfer.jsonl").exists()
    out = tmp_path / "runs" / "quickstart"
    rows = list(read_shards(str(out)))
    assert len({r["sample_id"].split("#")[0] for r in rows}) == 12
    assert rows[0]["topk_ids"].shape[1] == 64
    (exp,) = (out / "experiments").iterdir()
    report = json.loads((exp / "report.json").read_text())
    assert set(report["students"]) == {"kd", "hard", "bc"}
    captured = capsys.readouterr()
    err = captured.err
    assert "report.md" in err and "plots:" in err
    # the sweep on the same capture, then the winner served
    assert "reusing the capture" in err and "no teacher started" in err
    (sweep,) = (out / "sweeps").iterdir()
    rows = (sweep / "leaderboard.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 and (sweep / "pareto.png").exists()
    winner = json.loads((sweep / "winners.json").read_text())["models"][0]["id"]
    assert f"prompt ({winner})" in err and "serving" in err
    assert len(captured.out.strip()) > 0  # the streamed completion
    # a second run reuses the cached teacher and the finished captures
    assert main(["demo", "--home", str(home), *TINY, *ONE_TRIAL,
                 "--set", "train.baselines=[]"]) == 0  # (no baselines: only a shorter test)
    err = capsys.readouterr().err
    assert "using the cached demo teacher" in err and "capture: complete" in err
