"""Host a run's students behind OpenAI-compatible HTTP routes on Ray Serve.

    raydistill serve RUN_DIR [--top N] [--set serve.port=8001]

`run_server` (the CLI's entry) finds the models, connects to Ray (RAY_ADDRESS, else a local Ray
it starts), starts the HTTP proxy on serve.host:serve.port, deploys the application, prints how
to query it and blocks until SIGINT/SIGTERM, then removes the application and stops what it
started. `build_app` returns the bound application for callers that `serve.run` it themselves in
an existing Ray (tests); `start`/`stop` do the same around a caller's own Ray (the demo).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
import time

from orchestrator.config import ServeConfig
from orchestrator.errors import RaydistillError
from orchestrator.console import quiet_third_party
from orchestrator.winners import ServedModel

APP_NAME = "raydistill"
READY_TIMEOUT_S = 120.0


def build_app(models: list[ServedModel], settings: ServeConfig, *, api_key: str | None = None):
    """The bound Serve application (one deployment) hosting `models` with `settings`."""
    if not models:
        raise RaydistillError("no models to serve; pass a run directory that holds students")
    from serve.generate import check_weights
    from serve.openai_api import bind

    for m in models:  # refuse here, before any replica starts, rather than 500 per request
        try:
            check_weights(m.path)
        except ValueError as e:
            raise RaydistillError(f"cannot serve {m.id}: {e}") from None
    return bind(models, settings, api_key=api_key)


def start(models: list[ServedModel], settings: ServeConfig, *, api_key: str | None = None) -> str:
    """Deploy in the current Ray (ray.init already called); returns the base URL once /health
    answers. The HTTP port must be free (RaydistillError otherwise)."""
    from ray import serve

    check_port(settings.host, settings.port)
    quiet_third_party()  # among others, the controller's "failed" task on every normal stop
    with _serve_info_off():
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(build_app(models, settings, api_key=api_key), name=APP_NAME, route_prefix="/",
                  blocking=False)
    url = base_url(settings)
    _wait_ready(url)
    return url


def stop() -> None:
    """Delete the application and shut Serve down (the Ray it ran in stays up)."""
    from ray import serve

    with _serve_info_off():
        try:
            serve.delete(APP_NAME)
        finally:
            serve.shutdown()


@contextlib.contextmanager
def _serve_info_off():
    """Serve's INFO lines in this process only repeat what the caller prints: `Started Serve in
    namespace "serve"`, `Application … is ready at …`, `Deleting app …`, and `Connecting to
    existing Serve app … New http_options/controller_options will not be applied`, untrue here
    (`serve.run` finds the instance `serve.start` just started with them). Warnings and errors
    pass."""
    log = logging.getLogger("ray.serve")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


def base_url(settings: ServeConfig) -> str:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    return f"http://{host}:{settings.port}"


def banner(url: str, models: list[ServedModel], settings: ServeConfig, *, keyed: bool) -> str:
    """What `raydistill serve` prints once the routes answer."""
    key = (f"requests need `Authorization: Bearer ${settings.api_key_env}`" if keyed
           else f"no API key; set ${settings.api_key_env} to require one")
    lines = [f"serving {len(models)} model(s) at {url}  ({key})"]
    lines += [f"  {m.id}" + (f"  {_metrics(m)}" if m.metrics else "") for m in models]
    lines += ["", "routes: GET /health, GET /v1/models, POST /v1/completions, "
              "POST /v1/chat/completions (OpenAI format; chat needs a chat template)",
              "try:", f'  raydistill query "def f(" --url {url} --model {models[0].id} --stream',
              "  python - <<'EOF'", "  from openai import OpenAI",
              f'  client = OpenAI(base_url="{url}/v1", api_key="none")',
              f'  out = client.completions.create(model="{models[0].id}", prompt="def f(", '
              "max_tokens=32, temperature=0)",
              "  print(out.choices[0].text)", "  EOF", "", "Ctrl-C stops the server."]
    return "\n".join(lines)


def _metrics(m: ServedModel) -> str:
    shown = [f"{k}={v:.4g}" for k, v in list(m.metrics.items())[:3] if isinstance(v, (int, float))]
    return ", ".join(shown)


def check_port(host: str, port: int) -> None:
    """RaydistillError naming the port and the fix when something already listens on it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise RaydistillError(
                f"port {port} on {host} is not free ({e.strerror}); stop what uses it or pick "
                f"another port: --set serve.port={port + 1 if port < 65535 else 8001}") from None


def _wait_ready(url: str, *, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Poll GET /health until the proxy routes to a live replica."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError) as e:
            last = str(e)
        time.sleep(0.25)
    raise RaydistillError(f"the server at {url} did not answer /health within {timeout_s:.0f} s "
                          f"({last}); see the Ray Serve logs under /tmp/ray/session_latest/logs")


def wait_for_signal() -> None:
    """Block until SIGINT or SIGTERM; the previous handlers are restored afterwards."""
    stop_event = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop_event.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop_event.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
