"""The README's main job, `raydistill demo`, end to end on a tiny budget: teacher built for its
step budget (plain progress lines: the output is not a terminal) and cached, capture streamed into
a KD student, both baselines, the report with its verdict and warnings as the last lines, a sweep
on the same capture with its leaderboard, and the best student of the run and the sweep served
and queried through the openai client."""

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
    assert main(["demo", "--home", str(home), "--teacher-steps", "20", *TINY, *TWO_TRIALS]) == 0
    info = json.loads((home / "demo-teacher" / "demo.json").read_text())
    assert info["steps"] == info["budget_steps"] == 20  # a step budget, whatever the load
    assert info["heldout_nats"] < math.log(info["vocab_size"])
    assert (home / "demo-data" / "transfer.jsonl").exists()
    out = tmp_path / "runs" / "quickstart"
    rows = list(read_shards(str(out)))
    assert len({r["sample_id"].split("#")[0] for r in rows}) == 12
    assert rows[0]["topk_ids"].shape[1] == 64
    (exp,) = (out / "experiments").iterdir()
    report = json.loads((exp / "report.json").read_text())
    assert set(report["students"]) == {"kd", "hard", "bc"}
    # the students were paired on the same 8 held-out sequences: the verdict has its margin
    assert report["comparisons"]["kd-hard"]["sequences"] == 8
    assert " ± " in report["verdict"] and "2 s.e. over 8 held-out sequences" in report["verdict"]
    assert report["warnings"][0].startswith("Small held-out split: 8 sequences")
    captured = capsys.readouterr()
    err = captured.err
    flat = " ".join(err.split())  # lines wrapped at the console's width, joined again
    assert "demo teacher: step 20/20" in flat
    assert "report.md" in err and "plots:" in err
    # the sweep on the same capture, then the best student of the run and the sweep served
    assert "reusing the capture" in err and "no teacher started" in err
    (sweep,) = (out / "sweeps").iterdir()
    rows = (sweep / "leaderboard.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 and (sweep / "pareto.png").exists()
    nll = {label: r["student_nll"] for label, r in report["students"].items()}
    nll |= {m["id"]: m["metrics"]["eval_student_nll"] for m in
            json.loads((sweep / "winners.json").read_text())["models"]}
    best = min(nll, key=nll.get)
    assert f"prompt ({best})" in err and "serving" in err and "not served: " in err
    assert len(captured.out.strip()) > 0  # the streamed completion
    # the last lines: the verdict, then its warnings
    tail = " ".join(err[err.rindex("serve the sweep's winners"):].split())
    assert tail.index("verdict: " + report["verdict"][:40]) < tail.index("warning: Small held-out")
    # a second run reuses the cached teacher (saying it is weaker than the default) and captures
    assert main(["demo", "--home", str(home), *TINY, *ONE_TRIAL,
                 "--set", "train.baselines=[]"]) == 0  # (no baselines: only a shorter test)
    flat = " ".join(capsys.readouterr().err.split())
    assert "using the cached demo teacher" in flat and "capture: complete" in flat
    assert "it trained fewer steps than the default 1000" in flat
    assert "verdict: No verdict on distillation: no hard-label baseline was trained" in flat
