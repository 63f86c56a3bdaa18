"""The README's main job, `raydistill demo`, end to end on a tiny budget."""

import json

import pytest

from orchestrator.cli import main
from orchestrator.shards import read_shards


@pytest.mark.slow
def test_demo_builds_teacher_and_captures(tmp_path, ray_session, monkeypatch):
    monkeypatch.chdir(tmp_path)
    home = tmp_path / "home"
    assert main(["demo", "--home", str(home), "--teacher-minutes", "0.15",
                 "--set", "data.limit=12", "--set", "teacher.kv_cache_gib=0.25"]) == 0
    info = json.loads((home / "demo-teacher" / "demo.json").read_text())
    assert info["steps"] > 0 and info["heldout_nats"] < info["unigram_nats"] + 1.0
    assert (home / "demo-data" / "transfer.jsonl").exists()
    rows = list(read_shards(str(tmp_path / "runs" / "quickstart")))
    assert len({r["sample_id"].split("#")[0] for r in rows}) == 12
    assert rows[0]["topk_ids"].shape[1] == 64
    # second run reuses the cached teacher and the finished capture
    assert main(["demo", "--home", str(home), "--set", "data.limit=12"]) == 0
