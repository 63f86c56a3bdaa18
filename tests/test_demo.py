"""The README's main job, `raydistill demo`, end to end on a tiny budget: teacher built for its
step budget (plain progress lines: the output is not a terminal) and cached, capture streamed into
a KD student, both baselines, the report with its verdict and warnings as the last lines, a sweep
on the same capture with its leaderboard, and the best student of the run and the sweep served
and queried through the openai client; the exported KD student also loads and generates in vLLM.

Then the first hour of a newcomer (issue 12), as the README walks it: the README's next commands on
the same output_dir with the plain examples/quickstart.yaml — `run`, `train`, `tune`, `inspect`,
`serve` + `query` — and the user's own data (only data.path changed, same output_dir, beside the
demo's capture). None may need `--fresh`. HOME points into the test's
folder, so the quickstart's `~/.cache/raydistill/...` paths are the ones the demo wrote, and
`runs/...` is relative to the working directory, as for a user in a fresh clone."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.driver.cli import main
from orchestrator.shards.format import read_shards
from orchestrator.shards.dirs import list_captures
from tests.conftest import capture_folder, free_port, server_up, wait_until, write_jsonl

QUICKSTART = str(Path(__file__).resolve().parent.parent / "examples" / "quickstart.yaml")
RAYDISTILL = str(Path(sys.executable).with_name("raydistill"))

TINY = ["--set", "data.limit=12", "--set", "teacher.kv_cache_gib=0.25",
        "--set", "train.max_steps=6", "--set", "train.eval_every=3", "--set", "train.log_every=3",
        "--set", "train.batch_size=2", "--set", "train.eval_samples=8",
        "--set", "tune.max_steps=3", "--set", "tune.eval_every=2", "--set", "tune.latency_tokens=2",
        "--set", "on_policy.start_step=3", "--set", "on_policy.max_new_tokens=8"]
TWO_TRIALS = ["--set", "tune.space={student: {grid: [{preset: nano}, {preset: micro}]}}"]
ONE_TRIAL = ["--set", "tune.space={train.temperature: {grid: [1.0]}}"]
_VLLM_LOAD = """
import sys
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=128, enforce_eager=True,
          kv_cache_memory_bytes=1 << 27)
out = llm.generate(["def main():"], SamplingParams(max_tokens=4, temperature=0.0))
print("GENERATED", len(out[0].outputs[0].token_ids))
"""


@pytest.mark.slow
def test_demo_then_the_readme_s_next_commands(tmp_path, ray_session, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAYDISTILL_HOME", raising=False)
    home = tmp_path / ".cache" / "raydistill"
    assert main(["demo", "--teacher-steps", "20", *TINY, *TWO_TRIALS]) == 0
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
    assert set(report["students"]) == {"kd", "offline", "hard", "bc"}
    # the KD student learned from its own samples after on_policy.start_step (3), the offline
    # one from the shards only
    kd = report["history"]["kd"]
    after = [h for h in kd if h["step"] > 3]
    assert after and all(h["onpolicy_samples_per_s"] > 0 for h in after)
    assert kd[-1]["onpolicy_kd"] > 0
    assert "onpolicy_kd" not in report["history"]["offline"][-1]
    assert "offline KD (no on-policy samples)" in report["verdict"]
    # the exported KD student (a plain Hugging Face directory) loads and generates in vLLM
    loaded = subprocess.run([sys.executable, "-c", _VLLM_LOAD,
                             report["students"]["kd"]["model_dir"]],
                            capture_output=True, text=True, timeout=300)
    assert "GENERATED 4" in loaded.stdout, loaded.stderr[-3000:]
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
    assert main(["demo", *TINY, *ONE_TRIAL, "--set", "train.baselines=[]",
                 "--set", "train.on_policy=0"]) == 0  # (offline, no baselines: a shorter test)
    flat = " ".join(capsys.readouterr().err.split())
    assert "using the cached demo teacher" in flat and "capture: complete" in flat
    assert "it trained fewer steps than the default 1000" in flat
    assert "verdict: No verdict on distillation: no hard-label baseline was trained" in flat
    _the_first_hour(tmp_path, out, capsys)


def _refusals(text: str) -> list[str]:
    return [line for line in text.splitlines() if "another capture" in line or "--fresh" in line]


def _the_first_hour(tmp_path, out, capsys) -> None:
    """The README's next commands after the demo, on the demo's output_dir, then own data."""
    # the baselines and the on-policy samples ran in the demo
    quick = [*TINY, "--set", "train.baselines=[]", "--set", "train.on_policy=0"]
    assert main(["run", QUICKSTART, *quick]) == 0
    assert main(["train", QUICKSTART, *quick]) == 0
    assert main(["tune", QUICKSTART, *TINY, *ONE_TRIAL]) == 0
    err = capsys.readouterr().err
    assert not _refusals(err), _refusals(err)
    assert "no teacher started" in err  # tune reused the demo's capture
    experiments = sorted(p.name for p in (out / "experiments").iterdir())
    sweeps = sorted(p.name for p in (out / "sweeps").iterdir())
    assert len(experiments) == 4 and len(sweeps) == 3

    # inspect: every capture, experiment and sweep of the output_dir
    assert main(["inspect", "runs/quickstart"]) == 0
    shown = capsys.readouterr().out
    for what in ("held-out", "bc", *experiments, *sweeps):
        assert what in shown, (what, shown)

    # serve the newest sweep's winners as the README says, and query them over HTTP
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

    # own data: the quickstart with only data.path changed, in the demo's output_dir: captured
    # into a folder of its own beside the demo's captures (kept as they were), no --fresh; the
    # held-out file is the same, so the demo's held-out capture is reused
    texts = [f"def handler_{i}(event):\n    return event.get('value', {i}) * {i + 1}\n" * 3
             for i in range(20)]
    own = write_jsonl(tmp_path / "mine.jsonl", [{"text": t} for t in texts])
    demo_capture = capture_folder(out)
    kept = {p: p.stat().st_mtime_ns for p in demo_capture.rglob("*") if p.is_file()}
    assert main(["run", QUICKSTART, *quick, "--set", f"data.path={own}"]) == 0
    err = capsys.readouterr().err
    assert not _refusals(err), _refusals(err)
    assert "runs/quickstart also holds 2 other capture(s) (" in " ".join(err.split())
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # the demo's capture is still there
    mains = [c.uri for c in list_captures("runs/quickstart") if c.kind == "main"]
    assert len(mains) == 2 and str(demo_capture) in {str(Path(m).resolve()) for m in mains}
    newest = max((out / "experiments").iterdir(), key=lambda p: p.stat().st_mtime)
    report = json.loads((newest / "report.json").read_text())
    assert "kd" in report["students"]
    assert report["settings"]["captures"]["capture"]["dir"] != str(demo_capture)
    assert report["settings"]["captures"]["held-out"]["dir"] == str(capture_folder(out, "heldout"))
