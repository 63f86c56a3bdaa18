"""Where a CPU teacher's vLLM engine core runs: vLLM's own processes vs the actor's process.

    python -m benchmarks.engine_process              # ~4 min on 2 CPUs (needs the demo teacher:
                                                     # `raydistill demo` builds it once)
    python -m benchmarks.engine_process --rounds 1   # shorter

Each measurement is a fresh Python process standing in for one teacher actor, with the demo teacher
(4 × 256 Llama, 4k vocabulary, fp32) in raydistill's `VLLMBackend`:
- `separate`: vLLM's default (`VLLM_ENABLE_V1_MULTIPROCESSING=1`): an engine-core process and a
  model-worker process under it;
- `same, N thread(s)`: the engine core in the process (`=0`, what raydistill's actors use on a CPU
  node), with torch on N threads — an actor reserving N CPUs gets OMP_NUM_THREADS=N from Ray.
Per placement: the first engine's start (scoring engine, with raydistill's head self-check), a
second engine's start in the same process (sampling), scoring tokens/s (64 × 256 tokens, k = 16)
and sampling seconds (32 prompts × 64 new tokens), and the CPU seconds the process and its
children used per wall second while scoring, sampling, and with both engines idle for 5 s (how
many cores it really took). Rounds alternate the placements so a shared machine's load falls on
all of them alike; medians.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

from benchmarks._common import REPO, log, machine_facts, machine_line, write_section

SECTION = "## vLLM engine core placement on CPU teachers"
PLACEMENTS = {"separate": ("1", None), "same, 1 thread": ("0", 1), "same, 2 threads": ("0", 2)}


def _cpu_s(proc) -> float:
    """CPU seconds of a process and all its children, alive now."""
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except Exception:  # a child that exited meanwhile
            pass
    return total


def _child(model: str) -> None:
    import random

    import psutil

    me = psutil.Process()
    t0 = time.perf_counter()
    from actors.vllm_backend import VLLMBackend

    scorer = VLLMBackend(model, mode="score", k=16, dtype="float32", kv_cache_gib=0.25,
                         max_model_len=512)
    t1 = time.perf_counter()
    rng = random.Random(0)
    seqs = [[rng.randrange(3, scorer.vocab_size) for _ in range(256)] for _ in range(64)]
    scorer.score(seqs[:4], k=16)  # warm
    c0, w0 = _cpu_s(me), time.perf_counter()
    scorer.score(seqs, k=16)
    c1, w1 = _cpu_s(me), time.perf_counter()
    sampler = VLLMBackend(model, mode="sample", k=16, dtype="float32", kv_cache_gib=0.25,
                          max_model_len=512)
    t2 = time.perf_counter()
    c2 = _cpu_s(me)
    sampler.sample([s[:32] for s in seqs[:32]], k=16, n=1, temperature=1.0, top_p=1.0,
                   max_new_tokens=64, seeds=list(range(32)), eos_id=None)
    c3, t3 = _cpu_s(me), time.perf_counter()
    time.sleep(5)  # both engines idle: what do they take from whatever else runs on the node?
    c4, t4 = _cpu_s(me), time.perf_counter()
    print("RESULT " + json.dumps({"idle_cores": (c4 - c3) / (t4 - t3),
        "start_s": t1 - t0, "second_start_s": t2 - w1, "score_tok_s": 64 * 256 / (w1 - w0),
        "score_cores": (c1 - c0) / (w1 - w0), "sample_s": t3 - t2,
        "sample_cores": (c3 - c2) / (t3 - t2)}), flush=True)


def _measure(model: str, placement: str) -> dict:
    multiprocessing, threads = PLACEMENTS[placement]
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING=multiprocessing,
               VLLM_LOGGING_LEVEL="WARNING", PYTHONPATH=str(REPO))
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.engine_process", "--child", model],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=600)
    finally:  # the engine processes vLLM started under it, if it left any
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise SystemExit(f"{placement}: no result (exit {proc.returncode}):\n{err[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def run(rounds: int) -> dict:
    from orchestrator.driver.demo import demo_home

    model = demo_home(None) / "demo-teacher"
    if not (model / "demo.json").exists():
        raise SystemExit("the demo teacher is missing: run `raydistill demo` once first")
    facts = machine_facts()
    samples: dict[str, list[dict]] = {p: [] for p in PLACEMENTS}
    for r in range(rounds):
        for placement in PLACEMENTS:
            samples[placement].append(_measure(str(model), placement))
            log(f"round {r + 1}/{rounds} {placement}: {samples[placement][-1]}")
    medians = {p: {key: statistics.median(s[key] for s in runs) for key in runs[0]}
               for p, runs in samples.items()}
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rounds": rounds,
            "medians": medians, "machine": machine_line(facts, load_end=os.getloadavg()[0])}


def markdown(R: dict) -> str:
    base = R["medians"]["separate"]
    lines = [
        SECTION, "",
        f"Command: `python -m benchmarks.engine_process --rounds {R['rounds']}` ({R['date']}; "
        f"{R['machine']}). The demo teacher (4 × 256 Llama, fp32) in `VLLMBackend`, one fresh "
        "process per measurement; medians over the rounds. *cores* = CPU seconds of the process "
        "and its children per wall second.", "",
        "| engine core | start s | 2nd engine start s | scoring tok/s | ratio | cores | "
        "sampling 32 × 64 s | ratio | cores | cores idle |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for placement, m in R["medians"].items():
        lines.append(
            f"| {placement} | {m['start_s']:.1f} | {m['second_start_s']:.1f} | "
            f"{m['score_tok_s']:,.0f} | {m['score_tok_s'] / base['score_tok_s']:.2f}× | "
            f"{m['score_cores']:.2f} | {m['sample_s']:.2f} | "
            f"{base['sample_s'] / m['sample_s']:.2f}× | {m['sample_cores']:.2f} | "
            f"{m['idle_cores']:.2f} |")
    lines += ["", "Ratios are speed against `separate` (higher is faster). raydistill's teacher "
              "and rollout actors use `same` on nodes without a GPU, on the threads their "
              "`num_cpus` gives them; GPU nodes keep vLLM's default.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child)
        return
    R = run(args.rounds)
    text = markdown(R)
    print(text)
    log(f"wrote {write_section(SECTION, text)}")
    (REPO / "benchmarks" / "results").mkdir(exist_ok=True)
    (REPO / "benchmarks" / "results" / "engine_process.json").write_text(json.dumps(R, indent=1))


if __name__ == "__main__":
    main()
