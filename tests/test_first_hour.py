"""A newcomer's first hour, as the README walks it (issue 12): `raydistill demo` on tiny budgets,
then the README's next commands on the same output_dir with the plain examples/quickstart.yaml —
`run`, `train`, `tune`, `inspect`, `serve` + `query` — and the user's own data with `data.path`
changed. Every one must work without `--fresh`.

HOME points into the test's folder, so the quickstart's `~/.cache/raydistill/...` paths are the
ones the demo wrote (the same expansion a user's shell and raydistill perform), and `runs/...` is
relative to the test's working directory, as for a user in a fresh clone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.cli import main
from tests.conftest import free_port, server_up, wait_until, write_jsonl

QUICKSTART = str(Path(__file__).resolve().parent.parent / "examples" / "quickstart.yaml")
RAYDISTILL = str(Path(sys.executable).with_name("raydistill"))
# what keeps each step short; the same overrides on every command (data.limit is part of the
# capture's fingerprint, like any setting that changes the shards)
TINY = ["--set", "data.limit=12", "--set", "teacher.kv_cache_gib=0.25",
        "--set", "train.max_steps=4", "--set", "train.eval_every=2", "--set", "train.log_every=2",
        "--set", "train.batch_size=2", "--set", "train.eval_samples=8",
        "--set", "tune.max_steps=2", "--set", "tune.eval_every=2", "--set", "tune.latency_tokens=2"]
ONE_TRIAL = ["--set", "tune.space={train.temperature: {grid: [1.0]}}"]


def _refusals(text: str) -> list[str]:
    return [line for line in text.splitlines() if "another capture" in line or "--fresh" in line]


@pytest.mark.slow
def test_the_readme_walkthrough_works_without_fresh(tmp_path, ray_session, monkeypatch, capsys):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("RAYDISTILL_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs" / "quickstart"

    # 1. the README's first command (after the install): the demo
    assert main(["demo", "--teacher-minutes", "0.1", *TINY, *ONE_TRIAL]) == 0
    assert (home / ".cache" / "raydistill" / "demo-teacher" / "demo.json").exists()
    assert (out / "manifest.json").exists()
    capsys.readouterr()

    # 2. the README's next commands, on the same output_dir, with the plain quickstart
    assert main(["run", QUICKSTART, *TINY, "--set", "train.baselines=[]"]) == 0
    assert main(["train", QUICKSTART, *TINY, "--set", "train.baselines=[]"]) == 0
    assert main(["tune", QUICKSTART, *TINY, *ONE_TRIAL]) == 0
    err = capsys.readouterr().err
    assert not _refusals(err), _refusals(err)
    assert "no teacher started" in err  # tune reused the demo's capture
    experiments = sorted(p.name for p in (out / "experiments").iterdir())
    sweeps = sorted(p.name for p in (out / "sweeps").iterdir())
    assert len(experiments) == 3 and len(sweeps) == 2

    # 3. inspect: every capture, experiment and sweep of the output_dir
    assert main(["inspect", "runs/quickstart"]) == 0
    shown = capsys.readouterr().out
    for what in ("held-out", "bc", *experiments, *sweeps):
        assert what in shown, (what, shown)

    # 4. serve the newest sweep's winners (the README's command) and query them over HTTP
    port = free_port()
    proc = subprocess.Popen([RAYDISTILL, "serve", "runs/quickstart", "--top", "1",
                             "--set", f"serve.port={port}", "--set", "serve.replica_cpus=0.5"],
                            env={**os.environ}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: server_up(url) or proc.poll() is not None, timeout_s=180)
        assert proc.poll() is None, proc.stdout.read()
        assert main(["query", "def read_config(path):", "--url", url, "--max-tokens", "4"]) == 0
        assert capsys.readouterr().out.strip()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:  # only on failure: stop what the test started, by its group id
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    # 5. own data: the quickstart with data.path changed (and its own output_dir: the demo's
    # capture in runs/quickstart is kept, and the refusal says so)
    texts = [f"def handler_{i}(event):\n    return event.get('value', {i}) * {i + 1}\n" * 3
             for i in range(20)]
    own = write_jsonl(tmp_path / "mine.jsonl", [{"text": t} for t in texts])
    assert main(["run", QUICKSTART, *TINY, "--set", f"data.path={own}",
                 "--set", "output_dir=runs/mine", "--set", "train.baselines=[]"]) == 0
    assert main(["run", QUICKSTART, *TINY, "--set", f"data.path={own}",
                 "--set", "train.baselines=[]"]) == 2
    err = capsys.readouterr().err
    assert "another capture" in err and "new output_dir" in err
    (exp,) = (tmp_path / "runs" / "mine" / "experiments").iterdir()
    report = json.loads((exp / "report.json").read_text())
    assert "kd" in report["students"]
