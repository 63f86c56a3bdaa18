"""On-policy distillation's loop on the demo teacher: where the time goes, measured side by side.

    python -m benchmarks.onpolicy                  # ~15 min on 2 CPUs (needs the demo teacher:
                                                   # `raydistill demo` builds it once)
    python -m benchmarks.onpolicy --steps 20 --records 64   # shorter

One run: capture the first `--records` demo transfer records and the held-out split with the
vLLM teacher once; then `raydistill train` twice on that capture, each training a purely
on-policy student (train.on_policy 1) beside the offline KD student of the same steps (baseline
`offline`) — once with vLLM student rollouts, once with the transformers fallback. Printed and
written to BENCHMARKS.md ("## On-policy loop (issue 15)"), per on-policy student:
- on-policy samples/s, and the shares of the trainer's wall time spent generating (rollout
  actors), scoring (teacher actors), syncing weights (trainer side: one `ray.put` of the state
  dict), training, and waiting for samples (the part of generation + scoring that overlapping
  with training did not hide);
- the weight refresh's cost: trainer-side put seconds and actor-side fetch + load seconds;
- staleness, new tokens per sample, the teacher's NLL of the student's samples;
- its step time against the offline student's in the same run (the ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks._common import REPO, log, machine_facts, machine_line, write_section

SECTION = "## On-policy loop (issue 15)"


def _config(out: Path, *, records: int, steps: int, backend: str):
    from orchestrator.config import load_config
    from orchestrator.driver.demo import QUICKSTART, demo_home

    home = demo_home(None)
    if not (home / "demo-teacher" / "demo.json").exists():
        raise SystemExit("the demo teacher is missing: run `raydistill demo` once first")
    data = home / "demo-data"
    return load_config(QUICKSTART, [
        f"teacher.model={home / 'demo-teacher'}", f"data.path={data / 'transfer.jsonl'}",
        f"data.eval_path={data / 'heldout.jsonl'}", f"data.limit={records}",
        f"output_dir={out}", "train.baselines=[offline]", "train.on_policy=1.0",
        f"train.max_steps={steps}", f"train.eval_every={steps}", "train.log_every=5",
        "train.eval_samples=64", "train.report_prompts=0", f"on_policy.backend={backend}",
        "on_policy.max_new_tokens=64", "on_policy.rollout_cpus=0.25",
        "on_policy.teacher_cpus=0.25", "teacher.num_cpus=0.5"])


def _summary(history: list[dict]) -> dict:
    keys = [k for k in history[-1] if k.startswith("onpolicy_")] + ["step_time_s"]
    rows = [h for h in history if "step_time_s" in h][1:] or history  # the first window starts up
    out = {k: sum(h.get(k, 0.0) for h in rows) / len(rows) for k in keys}
    out["onpolicy_staleness_max"] = max(h.get("onpolicy_staleness_max", 0) for h in history)
    return out


def run(*, records: int, steps: int) -> dict:
    from orchestrator.driver import pipeline

    facts = machine_facts()
    tmp = Path(tempfile.mkdtemp(prefix="raydistill-bench-onpolicy-"))
    runs = {}
    try:
        out = tmp / "out"
        log(f"capture: {records} records + held-out split (vLLM teacher)")
        t0 = time.time()
        pipeline.capture(_config(out, records=records, steps=steps, backend="vllm"))
        capture_s = time.time() - t0
        for backend in ("vllm", "hf"):
            log(f"train: on-policy (λ = 1, {backend} rollouts) beside offline KD, {steps} steps")
            cfg = _config(out, records=records, steps=steps, backend=backend)
            t0 = time.time()
            report = Path(pipeline.train(cfg))
            wall = time.time() - t0
            doc = json.loads((report.parent / "report.json").read_text())
            runs[backend] = {"wall_s": wall, "on": _summary(doc["history"]["kd"]),
                             "offline_step_s": _summary(doc["history"]["offline"])["step_time_s"],
                             "students": doc["students"]}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "records": records,
            "steps": steps, "capture_s": capture_s, "runs": runs,
            "machine": machine_line(facts, load_end=os.getloadavg()[0])}


def markdown(R: dict) -> str:
    lines = [
        SECTION, "",
        f"Command: `python -m benchmarks.onpolicy --records {R['records']} --steps {R['steps']}` "
        f"({R['date']}; {R['machine']}). The demo teacher (4 × 256 Llama, vLLM, CPU) captured "
        f"{R['records']} transfer records once; then, per rollout backend, one `raydistill train`"
        " trains a purely on-policy nano student (train.on_policy 1, reverse KL, 64 new tokens "
        "per prompt at temperature 1, weights refreshed every step, max_staleness 1) beside the "
        f"offline KD student of the same {R['steps']} steps × 8 sequences. Means over the "
        "logged windows after the first (start-up).", "",
        "| rollouts | samples/s | rollout | teacher scoring | weight sync | training | waiting "
        "| put s/step | fetch + load s/step | staleness mean / max | new tokens | teacher NLL of "
        "samples | step s: on-policy / offline |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for backend, r in R["runs"].items():
        m = r["on"]
        lines.append(
            f"| {backend} | {m['onpolicy_samples_per_s']:.2f} | "
            f"{m['onpolicy_generate_share']:.0%} | {m['onpolicy_score_share']:.0%} | "
            f"{m['onpolicy_sync_share']:.1%} | {m['onpolicy_train_share']:.0%} | "
            f"{m['onpolicy_wait_share']:.0%} | {m['onpolicy_sync_s']:.4f} | "
            f"{m['onpolicy_load_s']:.3f} | {m['onpolicy_staleness']:.2f} / "
            f"{m['onpolicy_staleness_max']:.0f} | {m['onpolicy_new_tokens']:.1f} | "
            f"{m['onpolicy_teacher_nll']:.2f} | {m['step_time_s']:.2f} / "
            f"{r['offline_step_s']:.2f} = **{m['step_time_s'] / r['offline_step_s']:.1f}×** |")
    lines += ["", "Shares are of the trainer's wall time; generation and scoring of step n + 1 "
              "run while step n trains, so they overlap training and can sum past 100% — "
              "*waiting* is what the overlap did not hide.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=128)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    R = run(records=args.records, steps=args.steps)
    text = markdown(R)
    print(text)
    log(f"wrote {write_section(SECTION, text)}")
    (REPO / "benchmarks" / "results").mkdir(exist_ok=True)
    (REPO / "benchmarks" / "results" / "onpolicy.json").write_text(json.dumps(R, indent=1))


if __name__ == "__main__":
    main()
