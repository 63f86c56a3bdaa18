"""Serving benchmark: the Ray Serve endpoint under concurrent load against in-process decoding of
the same student, measured in the same run. Writes benchmarks/results/serve.json and the
"## Serving (issue 4)" section of BENCHMARKS.md.

    python -m benchmarks.serve                    # ~3 min on 2 CPUs (builds a 2 × 256 student)
    python -m benchmarks.serve --model PATH       # a real student directory instead
    python -m benchmarks.serve --render --notes "..."   # rewrite the section from the json

In-process: `model.generate` (greedy, batch 1) per prompt, and serve/generate.py's `decode_batch`
at batch 1 and 8 (the engine without HTTP). Serve: `--requests` non-streamed greedy completions
per concurrency level from async httpx clients, all with the same `--max-tokens`; latency is per
request, end to end. The client runs in this process, on the same CPUs as the replica.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks._common import REPO, log, machine_facts, machine_line, write_section

SECTION = "## Serving (issue 4)"
MODEL_ID = "bench"


def build_student(out: Path) -> str:
    """A 2 × 256 Llama (head_dim 64) over a 4k BPE trained on stdlib text; the EOS row of the LM
    head is zeroed so greedy decoding never stops early (every request makes max_tokens)."""
    import torch

    from orchestrator.driver import tiny

    texts = list(tiny.chunks_of_text(tiny.stdlib_sources()[:80]))
    tok = tiny.train_tokenizer(texts, out, vocab_size=4096)
    cfg = tiny.llama_config(len(tok), layers=2, hidden=256, heads=4, max_positions=512)
    model = tiny.build_model(cfg, seed=0)
    tiny.sharpen(model, scale=4.0)
    with torch.no_grad():
        model.lm_head.weight[cfg.eos_token_id].zero_()
    model.save_pretrained(str(out), safe_serialization=True)
    return str(out)


def make_prompts(student, n: int, tokens: int) -> list[str]:
    """`n` prompts of about `tokens` tokens: pieces of held-out stdlib modules."""
    from orchestrator.driver import tiny
    from serve.generate import decode_text

    files = [f for f in tiny.stdlib_sources() if tiny.held_out(f)]
    out = []
    for text in tiny.chunks_of_text(files, max_chars=2000):
        ids = student.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= tokens:
            out.append(decode_text(student, ids[:tokens]))
        if len(out) == n:
            break
    return out


def summary(latencies: list[float], tokens: int, wall: float, requests: int) -> dict:
    lat = sorted(latencies)
    return {"p50_ms": 1000 * _pct(lat, 50), "p99_ms": 1000 * _pct(lat, 99),
            "mean_ms": 1000 * statistics.fmean(lat), "requests_per_s": requests / wall,
            "tokens_per_s": tokens / wall, "requests": requests, "tokens": tokens, "wall_s": wall}


def _pct(sorted_values: list[float], q: float) -> float:
    k = (len(sorted_values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def in_process(student, prompts: list[str], *, max_tokens: int) -> dict:
    """`model.generate` batch 1, then decode_batch at batch 1 and 8, on the same prompts."""
    import torch

    from serve.generate import Sampling, decode_batch, encode_prompt

    R = {}
    encoded = [encode_prompt(student, p) for p in prompts]
    student.model.generate(torch.tensor([encoded[0]]), do_sample=False, max_new_tokens=4)
    lat, tokens, t0 = [], 0, time.perf_counter()
    for ids in encoded:
        t = time.perf_counter()
        with torch.no_grad():
            out = student.model.generate(torch.tensor([ids]), do_sample=False,
                                         attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                         max_new_tokens=max_tokens, min_new_tokens=max_tokens)
        lat.append(time.perf_counter() - t)
        tokens += out.shape[1] - len(ids)
    R["generate_b1"] = summary(lat, tokens, time.perf_counter() - t0, len(encoded))
    greedy = Sampling(max_tokens=max_tokens, temperature=0)
    for size in (1, 8):
        lat, tokens, t0 = [], 0, time.perf_counter()
        for start in range(0, len(encoded), size):
            group = encoded[start:start + size]
            t = time.perf_counter()
            for step in decode_batch(student, group, [greedy] * len(group)):
                tokens += sum(1 for d in step if d is not None)
            lat += [time.perf_counter() - t] * len(group)
        R[f"decode_batch_b{size}"] = summary(lat, tokens, time.perf_counter() - t0, len(encoded))
    return R


async def load_test(url: str, prompts: list[str], *, concurrency: int, requests: int,
                    max_tokens: int) -> dict:
    """`requests` completions from `concurrency` clients at once; end-to-end latency each."""
    import httpx

    lat, tokens, failures = [], 0, 0
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(prompts[i % len(prompts)])

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal tokens, failures
        while not queue.empty():
            prompt = queue.get_nowait()
            t = time.perf_counter()
            r = await client.post(f"{url}/v1/completions", json={
                "model": MODEL_ID, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
            lat.append(time.perf_counter() - t)
            if r.status_code == 200:
                tokens += r.json()["usage"]["completion_tokens"]
            else:
                failures += 1

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        before = (await client.get(f"{url}/health")).json()["stats"]
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        after = (await client.get(f"{url}/health")).json()["stats"]
    out = summary(lat, tokens, wall, requests)
    batches = after["batches"] - before["batches"]
    out.update(concurrency=concurrency, non_2xx=failures, batches=batches,
               mean_batch=(after["prompts"] - before["prompts"]) / max(1, batches),
               max_batch=after["max_batch_size"])
    return out


def serve_runs(path: str, prompts: list[str], *, levels: list[int], requests: int,
               max_tokens: int, replica_cpus: float) -> dict:
    import ray

    from orchestrator.config import ServeConfig
    from orchestrator.winners import ServedModel
    from serve import app

    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR, object_store_memory=256 * 1024 * 1024)
    settings = ServeConfig(port=_free_port(), replica_cpus=replica_cpus)
    R = {"settings": {k: getattr(settings, k) for k in (
        "max_batch_size", "batch_wait_timeout_s", "max_ongoing_requests", "max_queued_requests",
        "replica_cpus")}}
    try:
        t = time.perf_counter()
        url = app.start([ServedModel(id=MODEL_ID, path=path)], settings)
        R["start_s"] = time.perf_counter() - t
        asyncio.run(load_test(url, prompts, concurrency=2, requests=4, max_tokens=max_tokens))
        for c in levels:
            log(f"serve: {requests} requests, {c} concurrent")
            R[f"c{c}"] = asyncio.run(load_test(url, prompts, concurrency=c, requests=requests,
                                               max_tokens=max_tokens))
        app.stop()
    finally:
        ray.shutdown()
    return R


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def markdown(R: dict) -> str:
    ref = R["in_process"]["generate_b1"]
    m = R["model"]
    lines = [SECTION, "",
             f"`python -m benchmarks.serve` ({R['date']}): one student "
             f"({m['desc']}, {m['params'] / 1e6:.1f}M parameters, fp32), prompts of "
             f"{R['prompt_tokens']} tokens, {R['max_tokens']} greedy tokens per request, "
             f"torch threads {max(1, int(R['serve']['settings']['replica_cpus']))}, "
             f"{R['requests']} requests per Serve row; Serve settings "
             f"{_settings_text(R['serve']['settings'])}; Serve start {R['serve']['start_s']:.0f} s "
             f"(not in the numbers). {machine_text(R)}", "",
             "| Path | p50 ms | p99 ms | requests/s | tokens/s | × tokens/s of (a) | "
             "× p50 of (a) | mean batch | non-2xx |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rows = [("(a) in-process `model.generate`, batch 1", ref, None),
            ("(b) in-process `decode_batch`, batch 1", R["in_process"]["decode_batch_b1"], None),
            ("(c) in-process `decode_batch`, batch 8", R["in_process"]["decode_batch_b8"], None)]
    rows += [(f"(d) Serve HTTP, {R['serve'][k]['concurrency']} concurrent client(s)",
              R["serve"][k], R["serve"][k]) for k in R["serve"] if k.startswith("c")]
    for label, r, srv in rows:
        batch = f"{srv['mean_batch']:.1f}" if srv else "–"
        fails = str(srv["non_2xx"]) if srv else "–"
        lines.append(f"| {label} | {r['p50_ms']:,.0f} | {r['p99_ms']:,.0f} | "
                     f"{r['requests_per_s']:.2f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}× | "
                     f"{r['p50_ms'] / ref['p50_ms']:.2f}× | {batch} | {fails} |")
    lines += ["", R.get("notes", ""), ""]
    return "\n".join(lines)


def _settings_text(s: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in s.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a student directory (default: build one)")
    ap.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=48)
    ap.add_argument("--replica-cpus", type=float, default=1.0,
                    help="the replica's CPUs and torch threads, in-process too (default: "
                         "serve.replica_cpus' default, 1)")
    ap.add_argument("--notes", default="", help="the paragraph under the table")
    ap.add_argument("--render", action="store_true",
                    help="only rewrite the section from results/serve.json (with --notes)")
    args = ap.parse_args()
    results = REPO / "benchmarks" / "results" / "serve.json"
    if args.render:
        R = json.loads(results.read_text())
        R["notes"] = args.notes or R.get("notes", "")
        results.write_text(json.dumps(R, indent=1))
        log(f"wrote {write_section(SECTION, markdown(R))}")
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from serve.generate import load_student

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or build_student(Path(tmp) / "student")
        student = load_student(path, threads=max(1, int(args.replica_cpus)))
        cfg = student.model.config
        R = {"date": time.strftime("%Y-%m-%d"), "machine": machine_facts(),
             "model": {"path": args.model or "built", "params": sum(
                 p.numel() for p in student.model.parameters()),
                 "desc": f"{cfg.num_hidden_layers} × {cfg.hidden_size} Llama, "
                         f"{cfg.vocab_size // 1024}k vocab"},
             "max_tokens": args.max_tokens, "prompt_tokens": args.prompt_tokens,
             "requests": args.requests, "notes": args.notes,
             "load_avg_start": os.getloadavg()[0]}
        prompts = make_prompts(student, args.requests, args.prompt_tokens)
        log(f"in-process: {len(prompts)} prompts")
        R["in_process"] = in_process(student, prompts, max_tokens=args.max_tokens)
        del student
        R["serve"] = serve_runs(path, prompts, requests=args.requests,
                                levels=[int(c) for c in args.concurrency.split(",")],
                                max_tokens=args.max_tokens, replica_cpus=args.replica_cpus)
    R["load_avg_end"] = os.getloadavg()[0]
    text = markdown(R)
    print(text)
    results.parent.mkdir(exist_ok=True)
    results.write_text(json.dumps(R, indent=1))
    log(f"wrote {write_section(SECTION, text)}")


def machine_text(R: dict) -> str:
    """The machine line of a result: detected facts (`machine_facts`), or the bare string that
    results saved before them hold."""
    if isinstance(R["machine"], str):
        return (f"Machine: {R['machine']}; 1-min load average {R['load_avg_start']:.1f} at the "
                f"start, {R['load_avg_end']:.1f} at the end.")
    return machine_line({**R["machine"], "load_1min": R["load_avg_start"]},
                        load_end=R["load_avg_end"])


if __name__ == "__main__":
    main()
