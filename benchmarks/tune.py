"""Sweep benchmark: capture once, sweep many — measured side by side in one run.

    python -m benchmarks.tune                 # ~12 min on 2 CPUs (needs the demo teacher:
                                              # `raydistill demo` builds it once)
    python -m benchmarks.tune --records 128   # a shorter capture

One run: (1) capture the demo transfer set (first `--records` records) and the held-out split with
the vLLM teacher, timed; (2) `raydistill tune` over the quickstart's space (4 trials, ASHA) on that
capture, timed, which must not recapture; (3) each trial's own wall time (finished: its Train run;
stopped: until ASHA stopped it). Printed and written to BENCHMARKS.md ("## Sweeps (issue 4)"):
- sweep wall vs capture-once + Σ trial times (the cost of Tune's scheduling, trial start-up and the
  latency measurements beyond the training itself);
- capture-once + sweep vs a capture per trial + Σ trial times (what training each setting with
  its own `raydistill run` would cost).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks._common import REPO, log, write_section

SECTION = "## Sweeps (issue 4)"


def _config(out: Path, records: int):
    from orchestrator.config import load_config
    from orchestrator.driver.demo import QUICKSTART, demo_home

    home = demo_home(None)
    if not (home / "demo-teacher" / "demo.json").exists():
        raise SystemExit("the demo teacher is missing: run `raydistill demo` once first")
    data = home / "demo-data"
    return load_config(QUICKSTART, [
        f"teacher.model={home / 'demo-teacher'}", f"data.path={data / 'transfer.jsonl'}",
        f"data.eval_path={data / 'heldout.jsonl'}", f"data.limit={records}",
        f"output_dir={out}", "train.baselines=[]"])


def _trial_times(sweep_dir: Path) -> list[dict]:
    """Per trial: status and wall seconds (Train run for finished trials, Tune's time for the
    stopped ones)."""
    rows = list(csv.DictReader(open(sweep_dir / "leaderboard.csv")))
    out = []
    for r in rows:
        wall = float(r["wall_s"]) if r["wall_s"] else None
        if wall is None:  # stopped early: Tune's own clock of the trial
            result = sweep_dir / r["id"] / "result.json"  # Tune's folder of the trial
            lines = result.read_text().splitlines() if result.exists() else []
            wall = json.loads(lines[-1])["time_total_s"] if lines else 0.0
        out.append({"id": r["id"], "status": r["status"], "wall_s": wall,
                    "eval_kl": float(r["eval_kl"]) if r["eval_kl"] else None,
                    "step": r["step"]})
    return out


def run(records: int) -> dict:
    from orchestrator.driver import pipeline
    from orchestrator.shards.dirs import find_capture

    tmp = Path(tempfile.mkdtemp(prefix="raydistill-bench-tune-"))
    try:
        cfg = _config(tmp / "out", records)
        log(f"capture: {records} records + held-out split (vLLM teacher)")
        t0 = time.time()
        pipeline.capture(cfg)
        capture_s = time.time() - t0
        manifest_file = Path(find_capture(str(tmp / "out"))) / "manifest.json"
        manifest = manifest_file.stat().st_mtime_ns
        log(f"sweep over the quickstart space on that capture (capture took {capture_s:.0f}s)")
        t0 = time.time()
        sweep_dir = Path(pipeline.tune(cfg))
        sweep_s = time.time() - t0
        if manifest_file.stat().st_mtime_ns != manifest:
            raise SystemExit("the sweep rewrote the capture's manifest")
        trials = _trial_times(sweep_dir)
        leaderboard = (sweep_dir / "leaderboard.md").read_text()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = len(trials)
    trial_sum = sum(t["wall_s"] for t in trials)
    return {"date": time.strftime("%Y-%m-%d"), "records": records, "trials": trials,
            "capture_s": capture_s, "sweep_s": sweep_s, "trial_sum_s": trial_sum,
            "capture_once_plus_trials_s": capture_s + trial_sum,
            "capture_per_trial_plus_trials_s": n * capture_s + trial_sum,
            "leaderboard": leaderboard, "cpus": os.cpu_count(),
            "trial_steps": cfg.tune.max_steps or cfg.train.max_steps,
            "eval_every": cfg.tune.eval_every or cfg.train.eval_every}


def markdown(R: dict) -> str:
    once = R["capture_s"] + R["sweep_s"]
    lines = [
        SECTION, "",
        f"Command: `python -m benchmarks.tune --records {R['records']}` ({R['date']}, "
        f"{R['cpus']} CPUs). The demo teacher (vLLM, CPU) captures {R['records']} transfer "
        "records plus the held-out split once; `raydistill tune` then runs the quickstart's space "
        f"(2 sizes × 2 temperatures, {R['trial_steps']} steps per trial, ASHA on held-out KL "
        f"every {R['eval_every']} steps, one trial at a time) on that capture.", "",
        "| | seconds | ratio |", "|---|---:|---:|",
        f"| capture (once) | {R['capture_s']:.0f} | |",
        f"| Σ trial wall times ({len(R['trials'])} trials) | {R['trial_sum_s']:.0f} | |",
        f"| **sweep wall** (Tune, start-up, latency measurement, leaderboard) | "
        f"{R['sweep_s']:.0f} | **{R['sweep_s'] / R['trial_sum_s']:.2f}×** Σ trials |",
        f"| capture once + sweep | {once:.0f} | "
        f"{once / R['capture_once_plus_trials_s']:.2f}× capture + Σ trials |",
        f"| a capture per trial + Σ trials (no reuse) | "
        f"{R['capture_per_trial_plus_trials_s']:.0f} | capture-once + sweep = "
        f"**{once / R['capture_per_trial_plus_trials_s']:.2f}×** of it |", "",
        "| trial | status | step | held-out KL | wall s |", "|---|---|---:|---:|---:|"]
    for t in R["trials"]:
        kl = f"{t['eval_kl']:.4f}" if t["eval_kl"] is not None else "–"
        lines.append(f"| {t['id']} | {t['status']} | {t['step']} | {kl} | {t['wall_s']:.0f} |")
    lines += ["", "The sweep's own cost beyond training is Tune's scheduling, each trial's Ray "
              "Train start-up (controller, worker, Ray Data pipeline) and the latency measurement "
              "of the finished students; the capture is never repeated.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=256)
    args = ap.parse_args()
    R = run(args.records)
    text = markdown(R)
    print(text)
    log(f"wrote {write_section(SECTION, text)}")
    (REPO / "benchmarks" / "results").mkdir(exist_ok=True)
    (REPO / "benchmarks" / "results" / "tune.json").write_text(json.dumps(R, indent=1))


if __name__ == "__main__":
    main()
