"""Demo quality (issue 15): what limits the demo's KD student, measured with learning curves.

    python -m benchmarks.demo_quality                          # every setting (~6 min a student
                                                               # on 2 idle CPUs)
    python -m benchmarks.demo_quality --only shipped,old-order # some of them
    python -m benchmarks.demo_quality --steps 150              # a shorter budget for all

Needs the demo teacher and data (`raydistill demo` builds them once). One run: capture the demo
transfer set, the held-out split and the behaviour-cloning samples once with the quickstart's
config (vLLM teacher; reused when --out already holds them), then for each setting `raydistill
train` (`pipeline.train`) on that capture: the KD student and the baselines the setting lists, at
equal optimizer steps, each evaluated on the 256 held-out sequences every `--eval-every` steps.
A setting without its own hard-label baseline is measured against the hard baseline of the setting
it names in `vs` (the hard student does not depend on the KD settings). Prints a table (final
held-out NLL, KL(teacher‖student), top-1 agreement, % of the hard → teacher gap closed, training
wall time per student) and every student's learning curve; writes
benchmarks/results/demo_quality.json. BENCHMARKS.md, "Demo quality (issue 15)", says what the
numbers mean.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks._common import REPO, log, machine_facts, machine_line

RESULTS = REPO / "benchmarks" / "results" / "demo_quality.json"

SETTINGS: dict[str, dict] = {
    # the shipped quickstart (alpha 0.5, renormalize; shards shuffled 8 at a time) and baselines
    "alpha-0.5": {"set": {"train.alpha": 0.5}, "students": ["kd", "hard", "bc"]},
    # pure KD, the teacher's tail kept (renormalize would leave the tail tokens no mass)
    "alpha-1-bucket": {"set": {"train.alpha": 1.0, "train.tail": "bucket"}, "students": ["kd"],
                       "vs": "alpha-0.5"},
    # the order before the fix: one shard (~100 texts of a few stdlib modules) at a time
    "old-order": {"set": {"train.alpha": 0.5, "train.shuffle_shards": 1},
                  "students": ["kd", "hard"]},
    "lr-0.008": {"set": {"train.alpha": 0.5, "train.lr": 0.008}, "students": ["kd", "hard"]},
    # on-policy (issue 15): the student's own samples scored by the teacher, after an offline
    # warm-up (a random student's samples are noise); reverse KL on the generated tokens
    "mixed-0.5": {"set": {"train.alpha": 0.5, "train.on_policy": 0.5,
                          "on_policy.start_step": 100, "on_policy.max_new_tokens": 32,
                          "on_policy.backend": "hf"}, "students": ["kd"], "vs": "alpha-0.5"},
    "mixed-0.25": {"set": {"train.alpha": 0.5, "train.on_policy": 0.25,
                           "on_policy.start_step": 150, "on_policy.max_new_tokens": 32,
                           "on_policy.backend": "hf"}, "students": ["kd"], "vs": "alpha-0.5"},
    "onpolicy-1": {"set": {"train.alpha": 0.5, "train.on_policy": 1.0,
                           "on_policy.start_step": 150, "on_policy.max_new_tokens": 32,
                           "on_policy.backend": "hf"}, "students": ["kd"], "vs": "alpha-0.5"},
}


def _config(out: Path, overrides: dict, *, steps: int, eval_every: int, students: list[str]):
    from orchestrator.config import load_config
    from orchestrator.driver.demo import QUICKSTART, demo_home

    home = demo_home(None)
    if not (home / "demo-teacher" / "demo.json").exists():
        raise SystemExit("the demo teacher is missing: run `raydistill demo` once first")
    data = home / "demo-data"
    baselines = [s for s in students if s != "kd"]
    sets = {"teacher.model": str(home / "demo-teacher"),
            "data.path": str(data / "transfer.jsonl"), "data.eval_path": str(data / "heldout.jsonl"),
            "output_dir": str(out), "train.max_steps": steps, "train.eval_every": eval_every,
            "train.report_prompts": 0, "train.baselines": f"[{', '.join(baselines)}]",
            **overrides}
    return load_config(QUICKSTART, [f"{k}={v}" for k, v in sets.items()])


def _curve(history: list[dict]) -> list[dict]:
    return [{"step": h["step"], "nll": h["eval_student_nll"], "kl": h["eval_kl"],
             "top1": h["eval_top1"]} for h in history if "eval_student_nll" in h]


def measure(name: str, setting: dict, *, out: Path, steps: int, eval_every: int) -> dict:
    """Train one setting's students on the shared capture; their final metrics and curves."""
    from orchestrator.driver.pipeline import train

    cfg = _config(out, setting["set"], steps=steps, eval_every=eval_every,
                  students=setting["students"])
    t0 = time.time()
    report = json.loads((Path(train(cfg)).parent / "report.json").read_text())
    log(f"{name}: {time.time() - t0:.0f}s")
    return {"set": setting["set"], "vs": setting.get("vs"),
            "students": {label: {"nll": r["student_nll"], "teacher_nll": r["teacher_nll"],
                                 "kl": r["kl"], "top1": r["top1"], "wall_s": r["wall_s"],
                                 "curve": _curve(report["history"][label])}
                         for label, r in report["students"].items() if "student_nll" in r}}


def gap_closed(results: dict, name: str, label: str) -> float | None:
    """Share of the hard → teacher NLL gap a student closes, against its setting's hard student
    (or that of the setting named in `vs`)."""
    r = results[name]
    hard = r["students"].get("hard") or results.get(r.get("vs") or "", {}).get(
        "students", {}).get("hard")
    if hard is None or label == "hard":
        return None
    s = r["students"][label]
    return (hard["nll"] - s["nll"]) / (hard["nll"] - s["teacher_nll"])


def table(results: dict) -> str:
    lines = ["| setting | student | NLL | KL | top-1 | gap closed | wall (s) | NLL by step |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for label, s in r["students"].items():
            gap = gap_closed(results, name, label)
            curve = " → ".join(f"{c['nll']:.2f}" for c in s["curve"])
            lines.append(f"| {name} | {label} | {s['nll']:.3f} | {s['kl']:.3f} | "
                         f"{s['top1']:.1%} | {'–' if gap is None else f'{gap:.0%}'} | "
                         f"{s['wall_s']:.0f} | {curve} |")
    teacher = next(iter(next(iter(results.values()))["students"].values()))["teacher_nll"]
    return "\n".join(lines) + f"\n\nteacher held-out NLL {teacher:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", help="comma-separated settings (default: all): "
                    + ", ".join(SETTINGS))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--out", default=str(REPO / "runs" / "demo_quality"),
                    help="output_dir of the shared capture and the experiments")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(SETTINGS)
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        raise SystemExit(f"--only: unknown settings {unknown}; known: {', '.join(SETTINGS)}")
    facts = machine_facts()
    from orchestrator.driver.pipeline import capture

    t0 = time.time()  # every capture the settings need (main, held-out, bc), once; reused after
    capture(_config(Path(args.out), {}, steps=args.steps, eval_every=args.eval_every,
                    students=["kd", "hard", "bc"]))
    log(f"captures ready in {time.time() - t0:.0f}s")
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results = {n: r for n, r in previous.get("results", {}).items()
               if r.get("steps") == args.steps and n not in names}  # kept: same budget
    for name in names:
        log(f"setting {name}: {SETTINGS[name]}")
        results[name] = measure(name, SETTINGS[name], out=Path(args.out), steps=args.steps,
                                eval_every=args.eval_every) | {"steps": args.steps}
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps({"machine": facts, "steps": args.steps,
                                       "results": results}, indent=1))
    print(table(results))
    print(machine_line(facts, load_end=machine_facts()["load_1min"]))


if __name__ == "__main__":
    main()
