"""Connecting to Ray: the cluster RAY_ADDRESS names, else a local one started here.

Used by the driver (orchestrator/pipeline.py) and by `raydistill serve` (serve/app.py).
"""

from __future__ import annotations

import logging
import os


def connect() -> bool:
    """Connect to RAY_ADDRESS if set, else start a local Ray; True if this call started or
    connected (the caller then disconnects), False if Ray was already initialised."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False,
                 logging_level=logging.ERROR)
    else:
        ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                 object_store_memory=256 * 1024 * 1024)
    return True


def disconnect(started: bool) -> None:
    """Undo `connect()` (stops a local Ray it started; leaves a cluster running)."""
    if started:
        import ray

        ray.shutdown()
