"""`raydistill submit` / `raydistill jobs` against a real Ray head node (`ray start --head`) with
token authentication on: jobs that succeed, fail, are stopped; auth, address and config errors.

The head node runs as a subprocess in its own session, on its own ports and temp dir, so it cannot
collide with the session's in-process Ray (tests/conftest.py `ray_session`). Teardown signals only
that process and kills by pid anything it started that outlived it: never `ray stop`, which stops
every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import io
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from orchestrator.driver import jobs as jobs_mod
from orchestrator.errors import ConfigError, RaydistillError
from orchestrator.driver.jobs import jobs, project_root, submit
from orchestrator.storage import filesystem
from orchestrator.shards.manifest import load_manifest
from tests.conftest import capture_folder, free_port, free_port_range, stop_ray_head, write_jsonl

pytestmark = pytest.mark.slow

PROJECT = project_root()
RAY = Path(sys.executable).with_name("ray")
RAYDISTILL = Path(sys.executable).with_name("raydistill")


@pytest.fixture(scope="module")
def cluster():
    """A 2-CPU head node with the dashboard and token auth, stopped (only it) at the end."""
    import requests

    tmp = Path(tempfile.mkdtemp(prefix="rdj", dir="/tmp"))  # short: Unix socket paths ≤ 107
    token = secrets.token_hex(32)
    (tmp / "token").write_text(token)
    dash, base = free_port(), free_port_range(100)
    ports = {"port": free_port(), "dashboard-port": dash, "node-manager-port": free_port(),
             "object-manager-port": free_port(), "ray-client-server-port": free_port(),
             "dashboard-agent-grpc-port": free_port(),
             "dashboard-agent-listen-port": free_port(), "runtime-env-agent-port": free_port(),
             "metrics-export-port": free_port(), "min-worker-port": base,
             "max-worker-port": base + 99}
    cmd = [str(RAY), "start", "--head", "--block", "--num-cpus=2", f"--temp-dir={tmp / 'ray'}",
           "--include-dashboard=true", *[f"--{k}={v}" for k, v in ports.items()]]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0",
               # `ray start` turns token auth on when a token exists (~/.ray/auth_token); say so
               # explicitly, with this cluster's own token, so the test neither depends on nor
               # touches the user's ~/.ray
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(tmp / "token"),
               # as if the venv were activated: a job's `python` is the cluster's Python
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               # proves the pip runtime_env needs no network when the deps are installed
               PIP_NO_INDEX="1")
    for key in ("RAY_AUTH_TOKEN", "RAY_ADDRESS"):
        env.pop(key, None)
    log = open(tmp / "head.log", "w")
    head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if requests.get(f"{address}/api/version", timeout=2).status_code in (200, 401):
                    break
            except requests.RequestException:
                pass
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the head node did not start: {(tmp / 'head.log').read_text()}")
            time.sleep(0.5)
        # token auth is on, and a request without the token is refused
        mode = requests.get(f"{address}/api/authentication_mode", timeout=5).json()
        assert mode == {"authentication_mode": "token"}
        assert requests.get(f"{address}/api/jobs/", timeout=5).status_code == 401
        yield {"address": address, "token": token, "token_file": str(tmp / "token"), "tmp": tmp}
    finally:
        stop_ray_head(head)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def scratch():
    """A directory inside the project (the job's working_dir uploads it), removed afterwards."""
    path = PROJECT / "tests" / ".jobs-scratch" / uuid.uuid4().hex[:8]
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):
        path.parent.rmdir()  # only when no other session's scratch is there


@pytest.fixture
def token_env(cluster, monkeypatch):
    """The client finds the cluster's token through RAY_AUTH_TOKEN_PATH."""
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", cluster["token_file"])
    return cluster


def _config(scratch: Path, out: Path, *, model: str, data: str, name: str) -> Path:
    """A capture config (hf teacher, small shards, 1 CPU) inside the project; absolute paths."""
    path = scratch / f"{name}.yaml"
    path.write_text(f"teacher: {{model: {model}, backend: hf, k: 8, num_cpus: 1}}\n"
                    f"data: {{path: {data}, max_length: 64, eval_fraction: 0}}\n"
                    "capture: {samples_per_shard: 8}\ntrain: {baselines: []}\n"
                    f"output_dir: {out}\n")
    return path


def _run(fn, *args, **kwargs) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = fn(*args, **kwargs)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def finished(cluster, scratch, tiny_teacher, texts, tmp_path_factory):
    """One capture job followed to success and one that fails on the cluster."""
    root = tmp_path_factory.mktemp("jobs")
    data = write_jsonl(root / "d.jsonl", [{"id": f"t{i}", "text": t} for i, t in enumerate(texts[:24])])
    cfg = _config(scratch, root / "out", model=tiny_teacher, data=data, name="ok")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_AUTH_TOKEN", raising=False)
        mp.setenv("RAY_AUTH_TOKEN_PATH", cluster["token_file"])
        ok = _run(submit, str(cfg), address=cluster["address"], command=["capture"],
                  overrides=[], follow=True, pip=False)
        # passes local validation, but the data file does not exist where the job runs
        bad = _run(submit, str(cfg), address=cluster["address"], command=["capture"],
                   overrides=[f"data.path={root / 'missing.jsonl'}"], follow=True, pip=False)
        listing = _run(jobs, "list", job_id=None, address=cluster["address"])
    return {"ok": ok, "bad": bad, "list": listing, "out": str(root / "out")}


def _job_id(stdout: str) -> str:
    return next(line.split()[1] for line in stdout.splitlines() if line.startswith("submitted "))


def test_capture_job_follows_to_success(finished):
    rc, out, err = finished["ok"]
    assert rc == 0, out + err
    job_id = _job_id(out)
    assert job_id.startswith("raydistill-capture-") and f"jobs stop {job_id}" in out
    assert "captured" in out and f"{job_id} succeeded" in out
    manifest = load_manifest(*filesystem(str(capture_folder(finished["out"]))))
    assert manifest is not None and manifest.complete and manifest.shards


def test_job_failing_on_the_cluster_returns_1(finished):
    rc, out, err = finished["bad"]
    assert rc == 1, out + err
    assert f"{_job_id(out)} failed: Job entrypoint command failed with exit code 2" in err
    assert "missing.jsonl does not exist" in err


def test_jobs_list_shows_both(finished):
    rc, out, _ = finished["list"]
    assert rc == 0
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:]}
    assert rows[_job_id(finished["ok"][1])] == "SUCCEEDED"
    assert rows[_job_id(finished["bad"][1])] == "FAILED"
    assert "capture" in out.splitlines()[1]


def _cli_submit(cluster, scratch, tiny_teacher, texts, tmp_path, *flags):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts[:8]])
    cfg = _config(scratch, tmp_path / "out", model=tiny_teacher, data=data, name="cli")
    env = dict(os.environ, RAY_AUTH_TOKEN=cluster["token"])
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    r = subprocess.run([str(RAYDISTILL), "submit", str(cfg.relative_to(PROJECT)), "--address",
                        cluster["address"], *flags, "--", "capture"], cwd=PROJECT, env=env,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "succeeded" in r.stdout
    assert load_manifest(*filesystem(str(capture_folder(tmp_path / "out")))).complete


def test_cli_submit(cluster, scratch, tiny_teacher, texts, tmp_path):
    """The CLI's default: the job runs in the cluster's Python environment."""
    _cli_submit(cluster, scratch, tiny_teacher, texts, tmp_path)


@pytest.mark.skipif(not os.environ.get("RAYDISTILL_TEST_PIP"),
                    reason="copies the 3.7 GB venv (Ray's pip runtime_env on a venv-based "
                           "cluster, ~45 s); run with RAYDISTILL_TEST_PIP=1")
def test_cli_submit_with_pip_runtime_env(cluster, scratch, tiny_teacher, texts, tmp_path):
    """--pip: Ray builds the job's environment (no network: PIP_NO_INDEX)."""
    _cli_submit(cluster, scratch, tiny_teacher, texts, tmp_path, "--pip")


def test_ctrl_c_leaves_the_job_running_then_stop(token_env, scratch, tiny_teacher, texts,
                                                tmp_path):
    address = token_env["address"]
    rows = [{"id": f"r{i}", "text": t} for i, t in enumerate(texts * 10)]  # keeps it busy
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = _config(scratch, tmp_path / "out", model=tiny_teacher, data=data, name="stop")
    proc = subprocess.Popen([str(RAYDISTILL), "submit", str(cfg), "--address", address,
                             "--", "capture"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    seen, deadline = [], time.monotonic() + 120
    while not any("Running entrypoint" in x for x in seen):
        assert time.monotonic() < deadline and proc.poll() is None, "".join(seen)
        with contextlib.suppress(queue.Empty):
            seen.append(lines.get(timeout=1))
    job_id = _job_id("".join(seen))
    proc.send_signal(signal.SIGINT)  # Ctrl-C while following
    assert proc.wait(timeout=30) == 130
    err = proc.stderr.read()
    assert f"{job_id} keeps running" in err and f"raydistill jobs stop {job_id}" in err

    rc, out, _ = _run(jobs, "stop", job_id=job_id, address=address)
    assert rc == 0 and f"{job_id} stopped (STOPPED)" in out
    _, listing, _ = _run(jobs, "list", job_id=None, address=address)
    assert f"{job_id}  STOPPED" in listing
    rc, logs, _ = _run(jobs, "logs", job_id=job_id, address=address)
    assert rc == 0 and "Running entrypoint" in logs
    with pytest.raises(RaydistillError, match=rf"no job 'nope'.*{job_id}"):
        jobs("logs", job_id="nope", address=address)


def test_token_from_the_default_file_missing_or_wrong(cluster, monkeypatch, tmp_path):
    address = cluster["address"]
    for key in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # ~/.ray/auth_token: the default place
    with pytest.raises(RaydistillError, match="uses token authentication and no token was found"
                       ".*RAY_AUTH_TOKEN=<token> or RAY_AUTH_TOKEN_PATH=<file>"):
        jobs("list", job_id=None, address=address)
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text(cluster["token"] + "\n")
    assert _run(jobs, "list", job_id=None, address=address)[0] == 0
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    with pytest.raises(RaydistillError, match="refused the token from RAY_AUTH_TOKEN.*"
                                              "ray get-auth-token"):
        jobs("list", job_id=None, address=address)


def test_unreachable_or_missing_address(monkeypatch):
    port = free_port()
    with pytest.raises(RaydistillError, match=rf"no Ray dashboard at http://127.0.0.1:{port} "
                                              r".*ray start --head.*--address"):
        jobs("list", job_id=None, address=f"127.0.0.1:{port}")
    for key in ("RAY_JOB_ADDRESS", "RAY_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a GCS address is not a dashboard
    with pytest.raises(RaydistillError, match="--address http://HEAD:8265"):
        jobs("stop", job_id="x", address=None)


def test_config_errors_never_reach_the_cluster(scratch, tiny_teacher, tmp_path):
    nowhere = f"http://127.0.0.1:{free_port()}"  # would fail later: these fail first
    outside = _config(tmp_path, tmp_path / "out", model=tiny_teacher, data="d.jsonl", name="c")
    with pytest.raises(RaydistillError, match="outside the project.*under the project, e.g. "):
        submit(str(outside), address=nowhere, command=[], overrides=[], follow=False, pip=False)
    inside = _config(scratch, tmp_path / "out", model=tiny_teacher, data="d.jsonl", name="c")
    with pytest.raises(ConfigError, match="teacher.k must be"):
        submit(str(inside), address=nowhere, command=["capture"], overrides=["teacher.k=0"],
               follow=False, pip=False)
    with pytest.raises(RaydistillError, match="not a job command; use one of run, tune, capture"):
        submit(str(inside), address=nowhere, command=["train"], overrides=[], follow=False,
               pip=False)
    ignored = PROJECT / "runs" / f"jobs-test-{uuid.uuid4().hex[:6]}.yaml"  # /runs/ is gitignored
    try:
        ignored.parent.mkdir(exist_ok=True)
        ignored.write_text(inside.read_text())
        with pytest.raises(RaydistillError, match="excluded from the upload"):
            submit(str(ignored), address=nowhere, command=[], overrides=[], follow=False,
                   pip=False)
    finally:
        ignored.unlink(missing_ok=True)


def test_runtime_env(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    env = jobs_mod.runtime_env(project=PROJECT, output_dir=str(PROJECT / "out" / "a"), pip=True)
    assert env["working_dir"] == str(PROJECT)
    assert {".venv", ".git", "/runs", "/out/a"} <= set(env["excludes"])
    assert env["env_vars"]["AWS_ACCESS_KEY_ID"] == "k"
    assert "AWS_SECRET_ACCESS_KEY" not in env["env_vars"]
    assert env["env_vars"]["RAY_USAGE_STATS_ENABLED"] == "0"
    assert "pyyaml" in env["pip"] and not any(p.startswith("ray") for p in env["pip"])
    assert "pip" not in jobs_mod.runtime_env(project=PROJECT, output_dir="s3://b/x", pip=False)
