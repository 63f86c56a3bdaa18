"""Ray Jobs: run `raydistill run|tune|capture` on a cluster, then list, follow or stop the jobs.

    raydistill submit CONFIG --address http://HEAD:8265 [--set k=v] [--no-wait] [--pip] \\
        [-- run|tune|capture ARGS...]
    raydistill jobs [list|logs ID|stop ID] --address http://HEAD:8265

The config is validated here first, so a bad one never reaches the cluster. The project directory
(the one holding raydistill's pyproject.toml) is the job's `working_dir`; the config must lie inside
it (e.g. examples/) and not be excluded from the upload (.gitignore, .rayignore, the excludes
below). Paths *inside* the config (teacher.model, data.path, output_dir) are read on the cluster:
they must exist there (shared storage or s3://).

The address is --address, else RAY_JOB_ADDRESS, else RAY_ADDRESS when it is an http(s) URL.

Token authentication (Ray 2.60). A cluster runs in token mode when RAY_AUTH_MODE=token, or when
RAY_AUTH_MODE is unset and a token exists where `ray start --head` looks (a plain `ray.init()`
always enables it and writes ~/.ray/auth_token). In token mode the dashboard refuses every route
but a few public ones (/api/authentication_mode, /api/healthz, …) unless the request carries
`Authorization: Bearer <token>` (401 without a token, 403 with a wrong one). Ray's own
JobSubmissionClient only adds that header when *this* process runs with RAY_AUTH_MODE=token, so
we do not rely on it: we ask the public /api/authentication_mode route, and in token mode send the
header ourselves with the token found, as Ray's C++ loader finds it, in:
`RAY_AUTH_TOKEN` (the token), else `RAY_AUTH_TOKEN_PATH` (a file), else `~/.ray/auth_token`
(what `ray start`/`ray get-auth-token --generate` write; on the head node `ray get-auth-token`
prints it). On the machine that runs the head nothing is needed; elsewhere copy the token there.

The job runs `python -m orchestrator.driver.cli ...` with the `python` on the cluster's PATH: start the
head (`ray start --head`) with the environment that has raydistill's dependencies activated, or
use pip below.

pip: with pip=True the runtime_env asks for the project's dependencies (minus Ray, which the
cluster has). Measured on Ray 2.60 (2 cores, all deps already installed on the cluster):
- cluster Python in a venv (the usual case): Ray does not make a virtualenv that inherits
  site-packages; it *copies the whole venv* (`_clonevirtualenv`, 3.7 GB here, 34 s), then runs
  `pip install -r` in the copy (~7 s, every requirement "already satisfied", so no network is
  needed: it passes with PIP_NO_INDEX=1). The first job of a session waits ~43 s (a no-pip job:
  2 s); later jobs with the same list reuse the copy (3.6 s). The copy lives in the session's
  temp dir until Ray's URI cache evicts it.
- cluster Python not in a venv (system/conda/container): `virtualenv --system-site-packages
  --no-download`, which inherits the installed packages (seconds).
So pip is opt-in (`--pip`): the default runs the job in the cluster's own environment; use --pip
for clusters whose Python lacks raydistill's dependencies.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator import names
from orchestrator.errors import RaydistillError
from orchestrator.program import command_name
from orchestrator.storage import storage_env

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

COMMANDS = ("run", "tune", "capture")
EXCLUDES = [".venv", ".git", "/runs", "**/__pycache__", "*.pyc", "benchmarks/results",
            "*.egg-info", ".pytest_cache", ".raydistill-cache", "/build", "/.whl"]
"""What never travels in the working_dir upload (besides .gitignore / .rayignore entries)."""
_TOKEN_HELP = ("copy the head node's token (`ray get-auth-token` on the head) into "
               "~/.ray/auth_token, or set RAY_AUTH_TOKEN=<token> or RAY_AUTH_TOKEN_PATH=<file>")
_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


# ----------------------------------------------------------------------------- submit

def submit(config: str, *, address: str | None, command: list[str], overrides: list[str],
           follow: bool, pip: bool) -> int:
    """Validate `config` here, submit `raydistill <command> CONFIG` as a Ray Job, and (follow)
    stream its logs: 0 when it succeeded, 1 when it failed or was stopped, 130 on Ctrl-C."""
    from orchestrator.config import load_config

    command = list(command) or ["run"]
    if command[0] not in COMMANDS:
        raise RaydistillError(f"`{command_name()} submit ... -- {command[0]}` is not a job "
                              f"command; use one of {', '.join(COMMANDS)} "
                              "(e.g. `-- tune --space sizes`)")
    cfg = load_config(config, overrides)  # ConfigError propagates: nothing reaches the cluster
    project = project_root()
    rel = _config_in_project(Path(config), project=project)
    _warn_relative_output(config, overrides)
    client, address = _connect(address)
    job_id = names.job_id(command[0])
    entrypoint = shlex.join(["python", "-m", "orchestrator.driver.cli", command[0], rel,
                             *[a for o in overrides for a in ("--set", o)], *command[1:]])
    env = runtime_env(project=project, output_dir=cfg.output_dir, pip=pip)
    try:
        client.submit_job(entrypoint=entrypoint, submission_id=job_id, runtime_env=env,
                          metadata={"raydistill_command": shlex.join(command), "config": rel})
    except RuntimeError as e:  # e.g. an upload over the cluster's size limit
        raise RaydistillError(f"the cluster at {address} refused the job: {e}; if the upload is "
                              "too large, list big files of the project in .rayignore") from None
    print(f"submitted {job_id} to {address}\n  {entrypoint}")
    me = command_name()
    print(f"  follow: {me} jobs logs {job_id} --address {address}\n"
          f"  stop:   {me} jobs stop {job_id} --address {address}", flush=True)
    if not follow:
        return 0
    return _follow(client, job_id, address=address)


def _warn_relative_output(config: str, overrides: list[str]) -> None:
    """A relative output_dir resolves, on the cluster, inside the job's copy of the working_dir,
    which Ray deletes with the job: say so before submitting."""
    import yaml

    value = next((o.partition("=")[2] for o in reversed(overrides)
                  if o.partition("=")[0].strip() == "output_dir"), None)
    if value is None:
        with open(config) as f:
            value = (yaml.safe_load(f) or {}).get("output_dir")
    if isinstance(value, str) and "://" not in value and not value.startswith(("/", "~", "$")):
        print(f"warning: output_dir {value!r} is relative: on the cluster it lands in the job's "
              "temporary copy of the project, deleted with the job; pass --set "
              "output_dir=/shared/path or s3://bucket/prefix to keep the results", file=sys.stderr)


def project_root() -> Path:
    """The directory holding raydistill's pyproject.toml (the job's working_dir)."""
    import orchestrator

    root = Path(orchestrator.__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or 'name = "raydistill"' not in pyproject.read_text():
        raise RaydistillError(f"raydistill is installed as a package ({root} holds no raydistill "
                              "pyproject.toml); `submit` uploads the project as the job's "
                              "working_dir, so run it from a source checkout (pip install -e .)")
    return root


def _config_in_project(config: Path, *, project: Path) -> str:
    """The config's path relative to the project, refusing one the upload would not carry."""
    path = config.resolve()
    if not path.is_relative_to(project):
        raise RaydistillError(f"config {config} lies outside the project ({project}), which is "
                              "what the job uploads; put it under the project, e.g. "
                              f"{project / 'examples' / path.name}")
    rel = path.relative_to(project)
    if _excluded(rel, project=project):
        raise RaydistillError(f"config {config} is excluded from the upload (.gitignore, "
                              f".rayignore or {', '.join(EXCLUDES)}); put it where the job "
                              "sees it, e.g. examples/")
    return rel.as_posix()


def _excluded(rel: Path, *, project: Path) -> bool:
    """Would Ray's working_dir upload skip `rel`? Mirrors ray._private.runtime_env.packaging's
    `_dir_travel`: the excludes plus each directory's .gitignore/.rayignore on the way down.
    (Uses Ray's private helpers; the hack keeps our answer equal to the uploader's.)"""
    from ray._private.runtime_env import packaging

    _quiet_ray_logs()
    include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    checks = [packaging._get_excludes(project, EXCLUDES)]
    node = project
    for part in rel.parts:
        checks += packaging.get_excludes_from_ignore_files(node, include_gitignore=include_gitignore)
        node = node / part
        if any(check(node) for check in checks):
            return True
    return False


def runtime_env(*, project: Path, output_dir: str, pip: bool) -> dict:
    """The job's runtime_env: the project as working_dir (minus venvs, runs, caches, a local
    output_dir inside it), quiet Ray, the driver's object-store credentials, and (pip) the
    project's dependencies without Ray."""
    excludes = list(EXCLUDES)
    if output_dir and "://" not in output_dir:
        out = Path(output_dir).resolve()
        if out.is_relative_to(project) and out != project:
            excludes.append("/" + out.relative_to(project).as_posix())
    env_vars = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env_vars |= storage_env()
    env: dict = {"working_dir": str(project), "excludes": excludes, "env_vars": env_vars}
    if pip:
        env["pip"] = pip_requirements(project)
    return env


def pip_requirements(project: Path) -> list[str]:
    """[project].dependencies of pyproject.toml without `ray[...]` (the cluster runs Ray)."""
    try:
        import tomllib  # Python 3.11+
    except ImportError:  # 3.10: the installed distribution's metadata holds the same list
        from importlib.metadata import requires

        deps = [r for r in requires("raydistill") or [] if "extra ==" not in r]
    else:
        deps = tomllib.loads((project / "pyproject.toml").read_text())["project"]["dependencies"]
    return [d for d in deps if not re.match(r"^\s*ray\s*(\[|[<>=!~;\s]|$)", d)]


# ----------------------------------------------------------------------------- connection

def _connect(address: str | None) -> tuple[JobSubmissionClient, str]:
    """A JobSubmissionClient for the cluster, with the auth header when the cluster wants one."""
    import requests
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    address = _address(address)
    _quiet_ray_logs()
    try:
        r = requests.get(f"{address}/api/authentication_mode", timeout=10)
    except requests.RequestException as e:
        raise RaydistillError(f"no Ray dashboard at {address} ({type(e).__name__}); start a "
                              "cluster with `ray start --head` or fix --address") from None
    try:
        mode = r.json().get("authentication_mode") if r.status_code == 200 else None
    except ValueError:  # something answers HTTP there, but not a Ray dashboard
        raise RaydistillError(f"no Ray dashboard at {address} (it answered HTTP {r.status_code} "
                              "but not as Ray); start a cluster with `ray start --head` or fix "
                              "--address") from None
    headers, source = {}, "this process's Ray settings"
    if mode == "token":
        token, source = _find_token()
        if token is None:
            raise RaydistillError(f"the Ray cluster at {address} uses token authentication and "
                                  f"no token was found here; {_TOKEN_HELP}")
        headers["Authorization"] = f"Bearer {token}"
    try:
        client = JobSubmissionClient(address, headers=headers)
        client.list_jobs()  # an authenticated route: a wrong token fails here, not mid-submit
    except AuthenticationError:
        raise RaydistillError(f"the Ray cluster at {address} refused the token from {source}; "
                              f"{_TOKEN_HELP}") from None
    except (ConnectionError, RuntimeError, requests.RequestException) as e:
        raise RaydistillError(f"no Ray dashboard at {address} ({e}); start a cluster with "
                              "`ray start --head` or fix --address") from None
    return client, address


def _quiet_ray_logs() -> None:
    """Ray's SDK logs every ignore file and upload at INFO; keep its warnings and errors."""
    for name, level in (("ray._private.runtime_env.packaging", logging.WARNING),
                        ("ray._private.runtime_env.working_dir", logging.ERROR),  # .git/.venv
                        ("ray.dashboard.modules.dashboard_sdk", logging.WARNING),
                        ("ray.dashboard.modules.job.sdk", logging.WARNING)):
        logging.getLogger(name).setLevel(level)


def _address(address: str | None) -> str:
    """--address, else RAY_JOB_ADDRESS, else an http(s) RAY_ADDRESS; `http://` added if bare."""
    for value in (address, os.environ.get("RAY_JOB_ADDRESS")):
        if value:
            return (value if "://" in value else f"http://{value}").rstrip("/")
    ray_address = os.environ.get("RAY_ADDRESS", "")
    if ray_address.startswith("http"):
        return ray_address.rstrip("/")
    raise RaydistillError("no Ray cluster given; pass --address http://HEAD:8265 (the "
                          "dashboard) or set RAY_JOB_ADDRESS")


def _find_token() -> tuple[str | None, str]:
    """(token, where it came from) in Ray's order: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH,
    ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        source = f"RAY_AUTH_TOKEN_PATH ({path})"
    else:
        path = Path.home() / ".ray" / "auth_token"
        source = str(path)
    try:
        token = path.read_text().strip()
    except OSError:
        return None, source
    return (token or None), source


# ----------------------------------------------------------------------------- jobs

def jobs(action: str, *, job_id: str | None, address: str | None) -> int:
    """`list` the cluster's jobs, print (and follow) one job's `logs`, or `stop` one."""
    if action not in ("list", "logs", "stop"):
        raise RaydistillError(f"unknown jobs action {action!r}; use list, logs ID or stop ID")
    if action != "list" and not job_id:
        raise RaydistillError(f"`{command_name()} jobs {action}` needs a job id; "
                              f"`{command_name()} jobs list` shows them")
    client, address = _connect(address)
    if action == "list":
        print(_table(client))
        return 0
    status = _status(client, job_id)
    if action == "logs":
        if status in _TERMINAL:
            print(client.get_job_logs(job_id), end="")
            return 0
        return _follow(client, job_id, address=address)
    return _stop(client, job_id, status=status)


def _table(client: JobSubmissionClient) -> str:
    """id, status, command, start time, duration of the submitted jobs, newest last."""
    rows = [("ID", "STATUS", "COMMAND", "STARTED", "DURATION")]
    now = time.time()
    for job in _submitted(client):
        start = (job.start_time or 0) / 1000
        end = (job.end_time or 0) / 1000 or now
        command = (job.metadata or {}).get("raydistill_command") or job.entrypoint
        rows.append((job.submission_id, str(job.status.value), command[:40],
                     time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start)) if start else "-",
                     _duration(end - start) if start else "-"))
    if len(rows) == 1:
        return (f"no jobs on this cluster yet; `{command_name()} submit CONFIG --address ...` "
                "starts one")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _submitted(client: JobSubmissionClient) -> list:
    """Submitted jobs (not bare drivers), oldest first."""
    jobs_ = [j for j in client.list_jobs() if j.submission_id]
    return sorted(jobs_, key=lambda j: j.start_time or 0)


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _status(client: JobSubmissionClient, job_id: str) -> str:
    """The job's status, or an error that lists the ids the cluster knows."""
    try:
        return str(client.get_job_status(job_id).value)
    except RuntimeError:
        recent = [j.submission_id for j in _submitted(client)][-5:]
        known = ", ".join(recent) if recent else "none yet"
        raise RaydistillError(f"no job {job_id!r} on this cluster; recent jobs: {known} "
                              f"(`{command_name()} jobs list` shows all)") from None


def _stop(client: JobSubmissionClient, job_id: str, *, status: str, wait_s: float = 60) -> int:
    """Stop a job and wait until the cluster says it stopped."""
    if status in _TERMINAL:
        print(f"{job_id} already finished: {status}")
        return 0
    client.stop_job(job_id)
    deadline = time.monotonic() + wait_s
    while (status := _status(client, job_id)) not in _TERMINAL:
        if time.monotonic() > deadline:
            raise RaydistillError(f"{job_id} is still {status} {wait_s:g} s after the stop "
                                  f"request; check it with `{command_name()} jobs list`")
        time.sleep(0.5)
    print(f"{job_id} stopped ({status})")
    return 0


def _follow(client: JobSubmissionClient, job_id: str, *, address: str) -> int:
    """Stream the job's logs to stdout until it ends: 0 succeeded, 1 failed/stopped, 130 Ctrl-C
    (the job keeps running)."""
    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        try:
            asyncio.run(tail())
        except RuntimeError:  # the log stream closed early; the status below still tells
            pass
        while (status := _status(client, job_id)) not in _TERMINAL:
            time.sleep(0.5)
    except KeyboardInterrupt:
        print(f"\nstopped following; {job_id} keeps running on the cluster. Stop it with "
              f"`{command_name()} jobs stop {job_id} --address {address}`", file=sys.stderr)
        return 130
    if status == "SUCCEEDED":
        print(f"{job_id} succeeded")
        return 0
    lines = [ln for ln in (client.get_job_info(job_id).message or "").splitlines() if ln.strip()]
    # Ray's message: "Job entrypoint command failed with exit code N, last available logs …"
    # followed by the log tail, whose last line is usually the error itself
    why = lines[0].split(", last available logs")[0] if lines else ""
    last = f"\n  {lines[-1]}" if len(lines) > 1 else ""
    print(f"{job_id} {status.lower()}: {why}{last}".rstrip(), file=sys.stderr)
    return 1
