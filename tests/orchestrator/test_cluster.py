"""Where a command's Ray runs (orchestrator/driver/cluster.py), by Ray's convention: RAY_ADDRESS, else a
`ray start` cluster on this machine (said in one line), else a private Ray; a stale address file is
ignored; RAYDISTILL_RAY=private / --local-ray always start a private one.

The `ray start --head` cluster here is this test's own: its own ports, and its own Ray temp dir
(RAY_TMPDIR), so its address file is not /tmp/ray/ray_current_cluster and no other Ray on the
machine can find it. It is stopped through the `ray start --block` process it runs as, then by the
pids it started — never `ray stop`, which stops every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from orchestrator.driver import cluster
from orchestrator.driver.cli import main
from orchestrator.errors import ConfigError
from tests.conftest import free_port, free_port_range, stop_ray_head

ROOT = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).with_name("ray")
CONNECT = """
import json, ray
from orchestrator.driver.cluster import connect, disconnect
started = connect()
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "started": started}))
disconnect(started)
"""


@pytest.fixture
def ray_tmp(monkeypatch):
    """A Ray temp dir of this test's own (short: Unix socket paths must stay under 108 bytes);
    Ray's address file is `<it>/ray/ray_current_cluster`. RAY_TMPDIR points this process there."""
    tmp = Path(tempfile.mkdtemp(prefix="rdc", dir="/tmp"))
    monkeypatch.setenv("RAY_TMPDIR", str(tmp))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield tmp
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


def _write_address(ray_tmp: Path, address: str) -> Path:
    (ray_tmp / "ray").mkdir(exist_ok=True)
    (ray_tmp / "ray" / "ray_current_cluster").write_text(address)
    return ray_tmp / "ray" / "ray_current_cluster"


def test_the_mode_variable_is_checked(monkeypatch):
    monkeypatch.setenv("RAYDISTILL_RAY", "privat")
    with pytest.raises(ConfigError, match=r"RAYDISTILL_RAY='privat' is not one of auto, private; "
                                          r"set RAYDISTILL_RAY=private"):
        cluster.choose()


def test_ray_address_wins(ray_tmp, monkeypatch):
    _write_address(ray_tmp, f"127.0.0.1:{free_port()}")
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    for mode in ("private", "auto"):
        monkeypatch.setenv("RAYDISTILL_RAY", mode)
        assert cluster.choose() == cluster.Target("10.1.2.3:6379")


def test_a_stale_address_file_is_ignored(ray_tmp, monkeypatch):
    """An address file whose cluster is gone (nothing serves that port): a private Ray, and one
    line naming the file; RAYDISTILL_RAY=private never even mentions it."""
    dead = f"127.0.0.1:{free_port()}"
    path = _write_address(ray_tmp, dead)
    monkeypatch.setenv("RAYDISTILL_RAY", "auto")
    target = cluster.choose()
    assert target.address is None
    assert f"{path} names {dead}, where no Ray runs any more" in target.note
    monkeypatch.setenv("RAYDISTILL_RAY", "private")
    assert cluster.choose() == cluster.Target(None)
    monkeypatch.setenv("RAYDISTILL_RAY", "auto")
    path.unlink()
    assert cluster.choose() == cluster.Target(None)  # no file: nothing to say


def test_local_ray_flag_asks_for_a_private_ray(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYDISTILL_RAY", "auto")
    for command in ("capture", "train", "run", "tune"):
        monkeypatch.setenv("RAYDISTILL_RAY", "auto")
        assert main([command, str(tmp_path / "missing.yaml"), "--local-ray"]) == 2
        assert os.environ["RAYDISTILL_RAY"] == "private", command


def _connect_in_subprocess(ray_tmp: Path, **env) -> tuple[dict, str]:
    """Run `connect()` in a fresh Python (as a command would) with this Ray temp dir."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("RAYDISTILL_RAY", "RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    base |= {"RAY_TMPDIR": str(ray_tmp), "PYTHONPATH": f"{ROOT}{os.pathsep}"
             f"{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run([sys.executable, "-c", CONNECT], env=base | env, capture_output=True,
                       text=True, timeout=180, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


@contextlib.contextmanager
def _ray_head(ray_tmp: Path, token_path: Path):
    """`ray start --head --block` in its own session; yields (process, the address it recorded).
    Token authentication on (a token file exists, RAY_AUTH_MODE unset: Ray's default)."""
    ports = {"port": free_port(), "node-manager-port": free_port(),
             "object-manager-port": free_port(), "ray-client-server-port": free_port(),
             "dashboard-agent-grpc-port": free_port(),
             "dashboard-agent-listen-port": free_port(), "runtime-env-agent-port": free_port(),
             "metrics-export-port": free_port()}
    base = free_port_range(50)
    ports |= {"min-worker-port": base, "max-worker-port": base + 49}
    cmd = [str(RAY), "start", "--head", "--block", "--num-cpus=1", "--include-dashboard=false",
           "--disable-usage-stats", f"--temp-dir={ray_tmp / 'ray'}",
           *[f"--{k}={v}" for k, v in ports.items()]]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAYDISTILL_RAY")}
    env |= {"RAY_TMPDIR": str(ray_tmp), "RAY_AUTH_TOKEN_PATH": str(token_path),
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    address_file = ray_tmp / "ray" / "ray_current_cluster"
    log = open(ray_tmp / "head.log", "w")
    head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (address_file.is_file() and address_file.read_text().strip()):
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start failed: {(ray_tmp / 'head.log').read_text()}")
            time.sleep(0.5)
        yield head, address_file.read_text().strip()
    finally:
        stop_ray_head(head)
        log.close()


@pytest.mark.slow
def test_a_ray_start_cluster_is_used_and_said_private_mode_is_not_and_stale_after_it_stops(
        ray_tmp):
    token = ray_tmp / "token"
    token.write_text(os.urandom(32).hex())
    with _ray_head(ray_tmp, token) as (head, address):
        # Ray's convention: the running `ray start` cluster, said in one line
        seen, err = _connect_in_subprocess(ray_tmp, RAY_AUTH_TOKEN_PATH=str(token))
        assert seen == {"gcs": address, "started": True}
        assert f"Ray: using the `ray start` cluster on this machine ({address}); --local-ray " \
            "for a private one" in " ".join(err.split())
        # private on request (what the test suite's conftest sets): a Ray of its own
        for env in ({"RAYDISTILL_RAY": "private"}, {"RAYDISTILL_RAY": " Private "}):
            seen, err = _connect_in_subprocess(ray_tmp, RAY_AUTH_TOKEN_PATH=str(token), **env)
            assert seen["gcs"] != address and seen["started"], env
            assert "Ray:" not in err
        stop_ray_head(head)
    # the stopped cluster left its address file: ignored, said, a private Ray starts
    assert (ray_tmp / "ray" / "ray_current_cluster").read_text().strip() == address
    seen, err = _connect_in_subprocess(ray_tmp)
    assert seen["gcs"] != address and seen["started"]
    assert f"names {address}, where no Ray runs any more" in " ".join(err.split())


FLAKY_START = """
import json, ray
from orchestrator.driver import cluster
real, calls = ray.init, []
def init(*args, **kwargs):  # the first start fails as Ray's does on a loaded machine
    calls.append(kwargs.get("address"))
    if len(calls) == 1:
        raise Exception(cluster.NODE_START_TIMEOUT + ". This could happen because some of the "
                        "raylet failed to startup or the GCS has become overloaded.")
    return real(*args, **kwargs)
ray.init = init
started = cluster.connect()
print(json.dumps({"calls": calls, "up": ray.is_initialized()}))
cluster.disconnect(started)
"""


def test_a_private_ray_that_timed_out_starting_is_started_again(ray_tmp):
    """Ray gives a new node a fixed 30 s to register its raylet; under load the start is retried,
    and said, instead of failing the command."""
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    base |= {"RAY_TMPDIR": str(ray_tmp), "RAYDISTILL_RAY": "private",
             "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run([sys.executable, "-c", FLAKY_START], env=base, capture_output=True,
                       text=True, timeout=180, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out == {"calls": ["local", "local"], "up": True}
    assert "did not start within Ray's fixed 30 s" in " ".join(r.stderr.split())
