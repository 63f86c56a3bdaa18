"""Serving under load (issue 5): waves of concurrent requests beyond the server's capacity, then one
of two replicas SIGKILLed mid-load. Writes benchmarks/results/load.json and the
"## Serving under load (issue 5)" section of BENCHMARKS.md.

    python -m benchmarks.load                  # ~2-3 min on 2 CPUs (builds a 2 × 256 student)
    python -m benchmarks.load --waves 3 --wave-size 300 --max-tokens 16
    python -m benchmarks.load --render --notes "..."   # rewrite the section from the json

One application, two replicas (replica_cpus 0.5 each, one torch thread), the default admission
limits (serve.max_ongoing_requests 16 + serve.max_queued_requests 64 per replica: 160 admitted).
Overload: each wave sends `--wave-size` non-streamed greedy completions at once; every response is
counted by status, latency is end to end. Kill: `--clients` closed-loop clients (half of them
streaming) run while one replica's process (its pid from /health) gets SIGKILL; a request counts
as ok only with status 200 and, streamed, a final [DONE]. The clients run in this process, on the
same machine as the replicas and the proxy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import tempfile
import time
from pathlib import Path

from benchmarks._common import REPO, log, machine_facts, write_section
from benchmarks.serve import (MODEL_ID, _free_port, _pct, build_student, machine_text,
                              make_prompts)

SECTION = "## Serving under load (issue 5)"
COMMAND = "python -m benchmarks.load"


async def wave(url: str, prompts: list[str], *, size: int, max_tokens: int) -> dict:
    """`size` completions sent at once; counts by status, latencies, throughput."""
    import httpx

    async def one(client, i: int) -> tuple[object, float, dict | None, str | None]:
        t = time.perf_counter()
        try:
            r = await client.post(f"{url}/v1/completions", json={
                "model": MODEL_ID, "prompt": prompts[i % len(prompts)],
                "max_tokens": max_tokens, "temperature": 0})
        except httpx.HTTPError as e:
            return type(e).__name__, time.perf_counter() - t, None, None
        body = r.json() if "json" in r.headers.get("content-type", "") else None
        return r.status_code, time.perf_counter() - t, body, r.headers.get("retry-after")

    limits = httpx.Limits(max_connections=size + 8, max_keepalive_connections=size + 8)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        t0 = time.perf_counter()
        out = await asyncio.gather(*(one(client, i) for i in range(size)))
        wall = time.perf_counter() - t0
    ok = [(lat, body) for status, lat, body, _ in out if status == 200]
    refused = [(lat, body, ra) for status, lat, body, ra in out if status == 429]
    tokens = sum(body["usage"]["completion_tokens"] for _, body in ok)
    shaped = sum(1 for _, body, ra in refused if ra and body and
                 body.get("error", {}).get("code") == "server_at_capacity")
    lat_ok = sorted(lat for lat, _ in ok) or [float("nan")]
    lat_429 = sorted(lat for lat, _, _ in refused) or [float("nan")]
    return {"sent": size, "ok": len(ok), "429": len(refused), "429_openai_shaped": shaped,
            "5xx": sum(1 for s, *_ in out if isinstance(s, int) and s >= 500),
            "other": sum(1 for s, *_ in out if not isinstance(s, int) or s not in (200, 429)
                         and s < 500),
            "p50_ms": 1000 * _pct(lat_ok, 50), "p99_ms": 1000 * _pct(lat_ok, 99),
            "p50_429_ms": 1000 * _pct(lat_429, 50), "wall_s": wall,
            "completions_per_s": len(ok) / wall, "tokens_per_s": tokens / wall}


async def kill_phase(url: str, prompts: list[str], *, clients: int, max_tokens: int,
                     kill_after_s: float, app: str) -> dict:
    """Closed-loop clients; one replica SIGKILLed after `kill_after_s`; runs until a replacement
    answers and `kill_after_s` more seconds pass. Times are seconds from the kill."""
    import httpx
    from ray import serve

    records: list[tuple[float, float, str]] = []  # (start, end, outcome)
    stop = asyncio.Event()

    async def client_loop(client, i: int) -> None:
        stream = i % 2 == 1
        while not stop.is_set():
            body = {"model": MODEL_ID, "prompt": prompts[i % len(prompts)],
                    "max_tokens": max_tokens, "temperature": 0, "stream": stream}
            t = time.monotonic()
            try:
                outcome = await (_streamed(client, url, body) if stream else
                                 _plain(client, url, body))
            except httpx.HTTPError as e:
                outcome = f"{'stream' if stream else 'plain'} {type(e).__name__}"
            records.append((t, time.monotonic(), outcome))

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(
            max_connections=clients + 8)) as client:
        pids = await _pids(client, url, 2)
        tasks = [asyncio.create_task(client_loop(client, i)) for i in range(clients)]
        await asyncio.sleep(kill_after_s)
        held = await _in_flight(client, url, pids)
        victim = sorted(pids)[0]
        with open(f"/proc/{victim}/cmdline", "rb") as fh:
            assert fh.read().startswith(b"ray::"), f"pid {victim} is not a Ray worker"
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        log(f"kill: SIGKILL to replica pid {victim}")
        noticed = running = answered = None
        while answered is None and time.monotonic() - killed < 180:
            n = _running(serve, app)
            if noticed is None and n < 2:
                noticed = time.monotonic() - killed
            if noticed is not None and running is None and n == 2:
                running = time.monotonic() - killed
            if running is not None and (await _pids(client, url, 2, tries=10)) - pids:
                answered = time.monotonic() - killed
            await asyncio.sleep(0.2)
        await asyncio.sleep(kill_after_s)
        stop.set()
        await asyncio.gather(*tasks)
    end = time.monotonic()
    rel = [(s - killed, e - killed, o) for s, e, o in records]
    failed = [(round(s, 2), round(e, 2), o) for s, e, o in rel if o != "ok"]

    def rate(lo: float, hi: float) -> float:
        return sum(1 for _, e, o in rel if o == "ok" and lo <= e < hi) / max(1e-9, hi - lo)

    back = answered if answered is not None else end - killed
    return {"clients": clients, "requests": len(rel), "ok": sum(o == "ok" for *_, o in rel),
            "failed": failed, "failed_kinds": _counts(o for *_, o in failed),
            "victim_pid": victim, "in_flight_before_kill": {
                "victim" if pid == victim else "other": n for pid, n in held.items()},
            "noticed_s": noticed, "running_s": running,
            "answered_s": answered,
            "ok_per_s_before": rate(-kill_after_s, 0), "ok_per_s_during": rate(0, back),
            "ok_per_s_after": rate(back, end - killed)}


async def _plain(client, url: str, body: dict) -> str:
    r = await client.post(f"{url}/v1/completions", json=body)
    return "ok" if r.status_code == 200 else f"plain {r.status_code}"


async def _streamed(client, url: str, body: dict) -> str:
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            return f"stream {r.status_code}"
        last = ""
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                last = line[6:]
                if '"error"' in last:
                    return "stream error event"
        return "ok" if last == "[DONE]" else "stream cut"


async def _in_flight(client, url: str, pids: set[int]) -> dict[int, int]:
    """Requests each replica holds (admitted, not finished), read from /health just now. With two
    replicas Serve's router sends each /health to the less loaded one, so the busier one may not
    be seen within the ~2 s this polls."""
    held: dict[int, int] = {}
    for _ in range(100):
        health = (await client.get(f"{url}/health", timeout=5)).json()
        held[health["pid"]] = health["stats"]["in_flight"]
        if set(held) >= pids:
            break
        await asyncio.sleep(0.02)
    return held


async def _pids(client, url: str, n: int, *, tries: int = 60) -> set[int]:
    seen: set[int] = set()
    for _ in range(tries):
        try:
            seen.add((await client.get(f"{url}/health", timeout=5)).json()["pid"])
        except Exception:  # noqa: BLE001 - a replica that is going away
            await asyncio.sleep(0.1)
        if len(seen) >= n:
            break
    return seen


def _running(serve, app: str) -> int:
    from serve.openai_api import DEPLOYMENT

    try:
        status = serve.status().applications[app].deployments[DEPLOYMENT]
    except KeyError:
        return 0
    return status.replica_states.get("RUNNING", 0)


def _counts(items) -> dict:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def run(path: str, prompts: list[str], args) -> dict:
    import ray

    from orchestrator.config import ServeConfig
    from orchestrator.winners import ServedModel
    from serve import app

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR, object_store_memory=256 * 1024 * 1024)
    settings = ServeConfig(port=_free_port(), replica_cpus=0.5, min_replicas=2, max_replicas=2)
    R = {"settings": {k: getattr(settings, k) for k in (
        "min_replicas", "max_replicas", "replica_cpus", "max_ongoing_requests",
        "max_queued_requests", "max_batch_size", "batch_wait_timeout_s")}}
    try:
        t = time.perf_counter()
        url = app.start([ServedModel(id=MODEL_ID, path=path)], settings)
        R["start_s"] = time.perf_counter() - t
        asyncio.run(wave(url, prompts, size=8, max_tokens=args.max_tokens))  # load on both
        R["waves"] = []
        for i in range(args.waves):
            log(f"wave {i + 1}: {args.wave_size} requests at once")
            R["waves"].append(asyncio.run(wave(url, prompts, size=args.wave_size,
                                               max_tokens=args.max_tokens)))
            log(f"  {R['waves'][-1]}")
        log(f"kill phase: {args.clients} closed-loop clients")
        R["kill"] = asyncio.run(kill_phase(url, prompts, clients=args.clients,
                                           max_tokens=args.max_tokens, app=app.APP_NAME,
                                           kill_after_s=args.kill_after_s))
        log(f"  {R['kill']}")
        app.stop()
    finally:
        ray.shutdown()
    return R


def markdown(R: dict) -> str:
    s, m, k = R["serve"]["settings"], R["model"], R["serve"]["kill"]
    lines = [SECTION, "",
             f"`{COMMAND}` ({R['date']}): one student ({m['desc']}, "
             f"{m['params'] / 1e6:.1f}M parameters, fp32, EOS disabled so every request makes "
             f"max_tokens), prompts of {R['prompt_tokens']} tokens, {R['max_tokens']} greedy "
             f"tokens per request; {s['min_replicas']} replicas × {s['replica_cpus']} CPU, "
             f"admission per replica max_ongoing_requests={s['max_ongoing_requests']} + "
             f"max_queued_requests={s['max_queued_requests']} (so "
             f"{s['min_replicas'] * (s['max_ongoing_requests'] + s['max_queued_requests'])} "
             f"admitted at once), max_batch_size={s['max_batch_size']}; Serve start "
             f"{R['serve']['start_s']:.0f} s (not in the numbers); the HTTP clients run on the "
             f"same machine. {machine_text(R)}", "",
             "**Overload**: each wave sends its requests at once.", "",
             "| Wave | sent | 200 | 429 (with Retry-After + OpenAI body) | 5xx | other | "
             "p50 ms (200) | p99 ms (200) | p50 ms (429) | completions/s | tokens/s | wall s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for i, w in enumerate(R["serve"]["waves"], start=1):
        lines.append(f"| {i} | {w['sent']} | {w['ok']} | {w['429']} ({w['429_openai_shaped']}) | "
                     f"{w['5xx']} | {w['other']} | {w['p50_ms']:,.0f} | {w['p99_ms']:,.0f} | "
                     f"{w['p50_429_ms']:,.0f} | {w['completions_per_s']:.1f} | "
                     f"{w['tokens_per_s']:,.0f} | {w['wall_s']:.1f} |")
    fmt = lambda v: "never" if v is None else f"{v:.1f} s"  # noqa: E731
    lines += ["", f"**Replica killed mid-load**: {k['clients']} closed-loop clients (half "
                  "streaming); SIGKILL to one replica's process (pid from /health).", "",
              "| requests | ok | failed (kind: count) | Serve notices | replacement RUNNING | "
              "replacement answers | ok/s before | ok/s kill → answers | ok/s after |",
              "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
              f"| {k['requests']} | {k['ok']} | "
              f"{', '.join(f'{kind}: {n}' for kind, n in k['failed_kinds'].items()) or 'none'} | "
              f"{fmt(k['noticed_s'])} | {fmt(k['running_s'])} | {fmt(k['answered_s'])} | "
              f"{k['ok_per_s_before']:.1f} | {k['ok_per_s_during']:.1f} | "
              f"{k['ok_per_s_after']:.1f} |",
              "", f"Requests each replica held just before the kill (/health `in_flight`): "
                  f"{k.get('in_flight_before_kill')}. Failed requests (start, end in s from the "
                  f"kill, outcome): {k['failed']}.",
              "", R.get("notes", ""), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a student directory (default: build one)")
    ap.add_argument("--waves", type=int, default=3)
    ap.add_argument("--wave-size", type=int, default=300)
    ap.add_argument("--clients", type=int, default=32, help="closed-loop clients, kill phase")
    ap.add_argument("--kill-after-s", type=float, default=5.0)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--notes", default="", help="the paragraph under the tables")
    ap.add_argument("--render", action="store_true",
                    help="only rewrite the section from results/load.json (with --notes)")
    args = ap.parse_args()
    results = REPO / "benchmarks" / "results" / "load.json"
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
        student = load_student(path, threads=1)
        cfg = student.model.config
        R = {"date": time.strftime("%Y-%m-%d"), "machine": machine_facts(),
             "model": {"path": args.model or "built",
                       "params": sum(p.numel() for p in student.model.parameters()),
                       "desc": f"{cfg.num_hidden_layers} × {cfg.hidden_size} Llama, "
                               f"{cfg.vocab_size // 1024}k vocab"},
             "max_tokens": args.max_tokens, "prompt_tokens": args.prompt_tokens,
             "notes": args.notes, "load_avg_start": os.getloadavg()[0]}
        prompts = make_prompts(student, 64, args.prompt_tokens)
        del student
        R["serve"] = run(path, prompts, args)
    R["load_avg_end"] = os.getloadavg()[0]
    text = markdown(R)
    print(text)
    results.parent.mkdir(exist_ok=True)
    results.write_text(json.dumps(R, indent=1))
    log(f"wrote {write_section(SECTION, text)}")


if __name__ == "__main__":
    main()
