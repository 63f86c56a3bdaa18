"""Shared fixtures: a tiny real teacher (built here, nothing downloaded), JSONL writers, one Ray."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
# Hermetic: every Ray these tests start is their own, whatever runs beside them — never a cluster
# that `ray start` runs on this machine, nor one a leftover RAY_ADDRESS names (the CLI and the
# pipeline read these in-process and in the subprocesses tests spawn; orchestrator/driver/cluster.py).
os.environ["RAYDISTILL_RAY"] = "private"
os.environ.pop("RAY_ADDRESS", None)
# As if the venv were activated (README): `raydistill` on PATH is this program, so the hints the
# program prints name it `raydistill` (orchestrator/program.py; tests of that set PATH themselves).
os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]])


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """A 2-layer, 128-wide Llama (head_dim 64, as vLLM's CPU kernels need) with a 1024-token BPE
    tokenizer trained on a few stdlib modules; LM head sharpened so top-k has few ties."""
    from orchestrator.driver import tiny

    out = tmp_path_factory.mktemp("tiny-teacher")
    texts = list(tiny.chunks_of_text(tiny.stdlib_sources()[:60]))
    tok = tiny.train_tokenizer(texts, out, vocab_size=1024)
    cfg = tiny.llama_config(len(tok), layers=2, hidden=128, heads=2, max_positions=256)
    model = tiny.build_model(cfg, seed=0)
    tiny.sharpen(model, scale=6.0)
    model.save_pretrained(str(out), safe_serialization=True)
    return str(out)


def agree(a, b, *, atol):
    """Two SoftLabels hold the same top-k: equal ids except where the reference `b`'s log-probs
    tie (within atol), and log-probs within atol."""
    import numpy as np

    assert a.topk_ids.shape == b.topk_ids.shape
    diff = a.topk_ids != b.topk_ids
    near_tie = np.zeros_like(diff)
    lp = b.topk_logprobs
    near_tie[:, 1:] |= np.abs(lp[:, 1:] - lp[:, :-1]) < atol
    near_tie[:, :-1] |= np.abs(lp[:, :-1] - lp[:, 1:]) < atol
    assert not (diff & ~near_tie).any(), f"{(diff & ~near_tie).sum()} ids differ beyond ties"
    np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=atol)


def write_jsonl(path, rows) -> str:
    with open(path, "w") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def texts():
    """~100 short real texts (stdlib source pieces)."""
    from orchestrator.driver import tiny

    pieces = list(tiny.chunks_of_text(tiny.stdlib_sources()[60:90], max_chars=600))
    return pieces[:100]


@pytest.fixture(scope="session")
def ray_session():
    """One private local Ray for the whole session (init/shutdown per test costs seconds each);
    address="local": a new Ray even where `ray start` runs one or left its address file."""
    import logging

    import ray

    ctx = ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                   logging_level=logging.ERROR, object_store_memory=256 * 1024 * 1024)
    yield ctx
    ray.shutdown()


def capture_folder(out, kind: str = "main") -> Path:
    """The folder of an output_dir's one `kind` capture (captures/<kind>-<fingerprint>/)."""
    from orchestrator.shards.dirs import find_capture

    return Path(find_capture(str(out), kind=kind))


def capture_config(tmp_path, model, data, **overrides):
    """A Config for tests: explicit fields, small shards, cheap actors."""
    from orchestrator.config import load_config

    sets = {"teacher.model": model, "data.path": data, "output_dir": str(tmp_path / "out"),
            "teacher.backend": "hf", "teacher.k": 8, "teacher.num_cpus": 0.5,
            "capture.samples_per_shard": 8, "data.max_length": 128,
            # capture-only tests: no held-out split, no behaviour-cloning samples
            "data.eval_fraction": 0, "train.baselines": "[]"}
    sets.update(overrides)
    return load_config(None, [f"{k}={v}" for k, v in sets.items()])


@pytest.fixture
def s3_server(monkeypatch):
    """A local S3-compatible server (moto), started and stopped by this fixture."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1")
    bucket = f"caps-{uuid.uuid4().hex[:12]}"  # moto keeps its store per process: one bucket a test
    client.create_bucket(Bucket=bucket)
    yield f"s3://{bucket}/run1?endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    server.stop()


def train_config(out_dir, model, data, **overrides):
    """A Config for training tests: a tiny capture with a held-out split, a nano student, a few
    steps, cheap workers (2 CPUs)."""
    from orchestrator.config import load_config

    sets = {"teacher.model": model, "data.path": data, "output_dir": str(out_dir),
            "teacher.backend": "hf", "teacher.k": 8, "teacher.num_cpus": 0.5,
            "teacher.max_new_tokens": 16, "capture.samples_per_shard": 8, "data.max_length": 128,
            "data.eval_fraction": 0.1, "train.baselines": "[hard, bc]",
            "train.bc_prompt_tokens": 8, "student.preset": "nano", "train.max_steps": 12,
            "train.eval_every": 6, "train.log_every": 3, "train.batch_size": 4,
            "train.num_workers": 1, "train.eval_samples": 16, "train.warmup_steps": 2}
    sets.update(overrides)
    return load_config(None, [f"{k}={v}" for k, v in sets.items()])


@pytest.fixture(scope="session")
def captured(tmp_path_factory, tiny_teacher, texts, ray_session):
    """One finished capture (main, held-out split, behaviour-cloning samples) that training tests
    share read-only; each test trains into its own experiment directory."""
    from orchestrator.driver.pipeline import capture

    root = tmp_path_factory.mktemp("captured")
    data = write_jsonl(root / "data.jsonl", [{"id": i, "text": t} for i, t in enumerate(texts)])
    cfg = train_config(root / "out", tiny_teacher, data)
    capture(cfg)
    return {"root": root, "data": data, "out": str(root / "out"), "model": tiny_teacher}


@pytest.fixture(scope="session")
def students(tmp_path_factory):
    """Serving tests: two tiny students (same tokenizer, different seeds) saved as Hugging Face
    directories, and a sweep directory whose winners.json lists them:
    {"sweep": sweep dir with winners.json, "paths": {id: model dir}} — 1 × 128 Llamas,
    1024-token BPE, context 256."""
    import shutil

    from orchestrator.driver import tiny
    from orchestrator.winners import write_winners

    sweep = tmp_path_factory.mktemp("sweep")
    tok_dir = sweep / "tokenizer"
    texts = list(tiny.chunks_of_text(tiny.stdlib_sources()[:20]))
    tok = tiny.train_tokenizer(texts, tok_dir, vocab_size=1024)
    paths = {}
    for rank, (name, seed) in enumerate([("t0001-1x128", 0), ("t0002-1x128", 1)], start=1):
        out = sweep / "trials" / name / "model"
        shutil.copytree(tok_dir, out)
        cfg = tiny.llama_config(len(tok), layers=1, hidden=128, heads=2, max_positions=256)
        tiny.build_model(cfg, seed=seed).save_pretrained(str(out), safe_serialization=True)
        paths[name] = str(out)
    write_winners(str(sweep), [{"id": name, "path": f"trials/{name}/model", "rank": rank,
                                "metrics": {"eval_kl": 0.5 + rank}}
                               for rank, name in enumerate(paths, start=1)],
                  metric="eval_kl", mode="min")
    return {"sweep": str(sweep), "paths": paths}



def free_port() -> int:
    """A TCP port nothing listens on right now (for a test's own server)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_range(n: int) -> int:
    """First of `n` consecutive free ports (a test's own `ray start` head's worker ports), drawn
    from 20000 up to the kernel's ephemeral range (where `free_port` ports come from: a range
    reaching into it once held the dashboard's port and `ray start` refused it), away from Ray's
    default worker range (10002-19999) other Rays use."""
    import secrets

    top = 32768
    try:
        top = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    top = max(top, 20000 + 2 * n)
    for _ in range(50):
        base = 20000 + secrets.randbelow((top - 20000) // n) * n
        socks = []
        try:
            for port in range(base, base + n):
                socks.append(socket.socket())
                socks[-1].bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no free range of worker ports")


def serve_settings(**overrides):
    """ServeConfig for tests: a free port, half a CPU per replica, small limits."""
    from orchestrator.config import ServeConfig

    base = {"port": free_port(), "replica_cpus": 0.5, "max_batch_size": 8,
            "batch_wait_timeout_s": 0.05, "max_tokens": 200, "max_prompt_tokens": 100}
    return ServeConfig(**(base | overrides))


def server_up(url: str) -> bool:
    """The server at `url` answers /health with 200 (Serve answers 404 while it starts)."""
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until(ready, *, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.25)


def assert_split_main_truncated_heldout(out, model: str, texts: dict[str, str], *,
                                        max_length: int) -> None:
    """The main capture in `out` holds every one of its records split into `#p<j>` pieces of at
    most `max_length` tokens that together are the tokenizer's tokens of the record (none
    truncated; a 1-token tail has nothing to predict and is dropped); the held-out capture of
    `out` holds each of its records once, truncated to its first `max_length` tokens (the
    documented policy); each shard's metadata says which it did. `texts`: sample id → text of
    every record of both captures."""
    from collections import defaultdict

    import pyarrow.parquet as pq

    from orchestrator.shards.format import META_KEY, read_shards
    from orchestrator.teacher_info import load_tokenizer

    tok = load_tokenizer(model)
    pieces = defaultdict(dict)
    for r in read_shards(str(out)):
        sid, _, part = r["sample_id"].partition("#p")
        assert len(r["input_ids"]) <= max_length
        pieces[sid][int(part or 0)] = list(r["input_ids"])
    assert any(len(p) > 1 for p in pieces.values()), "no long text was split"
    for sid, parts in pieces.items():
        assert sorted(parts) == list(range(len(parts)))
        whole = tok(texts[sid], add_special_tokens=True)["input_ids"]
        joined = [t for j in range(len(parts)) for t in parts[j]]
        assert joined == whole or (joined == whole[:-1] and len(whole) % max_length == 1), sid
    held = list(read_shards(str(out), capture="heldout"))
    assert held and not [r["sample_id"] for r in held if "#" in r["sample_id"]], "held-out split"
    assert not set(pieces) & {r["sample_id"] for r in held}  # disjoint splits
    assert any(len(tok(texts[r["sample_id"]])["input_ids"]) > max_length for r in held)
    for r in held:
        whole = tok(texts[r["sample_id"]], add_special_tokens=True)["input_ids"]
        assert list(r["input_ids"]) == whole[:max_length]
    for policy, kind in (("split", "main"), ("truncate", "heldout")):
        for shard in (capture_folder(out, kind) / "shards").glob("*.parquet"):
            meta = json.loads(pq.read_schema(shard).metadata[META_KEY])
            assert (meta["long_text"], meta["max_length"], meta["capture"]) == \
                (policy, max_length, kind), shard


def stop_ray_head(head) -> None:
    """Stop a test's own `ray start --head --block` process (a subprocess.Popen): SIGTERM it (it
    drains and stops what it started), wait, then kill by pid whatever it started that outlived
    it. Never `ray stop`, which would stop every cluster on the machine."""
    import contextlib
    import signal
    import subprocess

    import psutil

    if head.poll() is not None:
        return
    try:
        started = psutil.Process(head.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        started = []
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        head.kill()
        head.wait()
    _, alive = psutil.wait_procs(started, timeout=15)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    _, alive = psutil.wait_procs(alive, timeout=10)
    assert not alive, f"processes of the test cluster survived: {alive}"


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and stderr + stdout of the `raydistill` CLI run in this process (argparse exits
    with SystemExit); a refused command never prints a traceback."""
    from orchestrator.driver.cli import main

    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    text = out.err + out.out
    assert "Traceback" not in text, text
    return code, text


def interrupt_train_then_resume(args: list[str], *, ray_address: str, output_dir) -> str:
    """`raydistill <args>` (a `train` command) in a subprocess: once a new experiment's KD student
    has a checkpoint Ray Train registered (in its snapshot, not just uploaded), Ctrl-C; the driver
    exits 2 naming `--resume <experiment>`, and the same command with that `--resume` finishes.
    Returns the experiment's name. The subprocess is stopped by its own handle on failure."""
    import signal
    import subprocess

    env = dict(os.environ, RAY_ADDRESS=ray_address)
    exe = [sys.executable, "-m", "orchestrator.driver.cli"]
    exps = Path(output_dir) / "experiments"
    exps.mkdir(exist_ok=True)
    before = set(os.listdir(exps))
    proc = subprocess.Popen([*exe, *args], env=env, stderr=subprocess.PIPE, text=True)
    try:
        exp, deadline = None, time.time() + 240
        while exp is None and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
            for name in set(os.listdir(exps)) - before:
                snap = exps / name / "kd" / "checkpoint_manager_snapshot.json"
                if snap.exists() and '"checkpoint_dir_name"' in snap.read_text():
                    exp = name
        assert exp is not None, f"no checkpoint appeared (exit code {proc.poll()})"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 2, err
    assert f"--resume {exp}" in err, err
    done = subprocess.run([*exe, *args, "--resume", exp], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    return exp
