"""`raydistill serve`: find the students of a run, connect to Ray (the driver's cluster rules), host
them with `serve.app` until interrupted; `port_or_free` for the demo's `publish`."""

from __future__ import annotations

import os

from orchestrator.config import ServeConfig
from orchestrator.driver.cluster import connect, disconnect
from orchestrator.winners import find_models
from serve.app import check_port, wait_for_signal, banner, start, stop


def run_server(run_dir: str, settings: ServeConfig, *, top: int | None = None) -> int:
    """`raydistill serve`: serve the best `top` (default serve.top) students until interrupted."""
    models = find_models(run_dir, top=top or settings.top)
    api_key = os.environ.get(settings.api_key_env) or None
    check_port(settings.host, settings.port)
    started_ray = connect()
    try:
        url = start(models, settings, api_key=api_key)
        print(banner(url, models, settings, keyed=api_key is not None), flush=True)
        wait_for_signal()
        print("stopping the server ...", flush=True)
        stop()
    finally:
        disconnect(started_ray)
    return 0


def port_or_free(host: str, port: int) -> int:
    """`port` if it is free, else one the OS picks (the demo must not fail on a busy 8000)."""
    import socket

    from orchestrator.console import say

    with socket.socket() as s:
        try:
            s.bind((host, port))
            return port
        except OSError:
            s.bind((host, 0))
            say(f"port {port} is busy; serving on {s.getsockname()[1]} instead")
            return s.getsockname()[1]
