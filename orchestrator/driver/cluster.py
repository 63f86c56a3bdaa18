"""Connecting to Ray the way Ray's own tools choose a cluster (`ray.init()`'s address resolution):

1. `RAY_ADDRESS` set → that cluster.
2. Else a cluster started with `ray start` on this machine → that cluster, said in one line. Ray
   records the last `ray start`'s address in `<Ray temp dir>/ray_current_cluster` (the temp dir:
   `$RAY_TMPDIR/ray`, else `$TMPDIR/ray`, else `/tmp/ray`) and counts it as running when a raylet
   on this machine serves it — the check `ray start` itself makes before starting a second head.
3. Else a private Ray started here for this command and stopped at its end; a stale address file
   (its cluster stopped or was killed) is ignored with one line saying so.

`RAYDISTILL_RAY=private` (or a command's `--local-ray`) skips step 2: a private Ray even where
`ray start` runs one. `RAY_ADDRESS` still wins, so a Ray Job's driver (Ray sets it there) stays on
its cluster.

Used by the driver (orchestrator/driver/pipeline.py) and by `raydistill serve` (serve/app.py).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from orchestrator.errors import ConfigError

PRIVATE_RAY_ENV = "RAYDISTILL_RAY"
"""`private`: a private local Ray even where `ray start` runs a cluster; `auto` (or unset): Ray's
convention, as above."""
_MODES = ("auto", "private")
PRIVATE_OBJECT_STORE_BYTES = 256 * 1024 * 1024
_SAID: set[str] = set()


@dataclass(frozen=True)
class Target:
    """Where `connect()` goes: `address` of an existing cluster, or None for a private Ray;
    `note`: the line that tells the user (empty when there is nothing to say)."""

    address: str | None
    note: str = ""


def choose() -> Target:
    """Where this command's Ray runs (see the module docstring); starts nothing."""
    mode = os.environ.get(PRIVATE_RAY_ENV, "").strip().lower() or "auto"
    if mode not in _MODES:
        raise ConfigError(f"{PRIVATE_RAY_ENV}={os.environ[PRIVATE_RAY_ENV]!r} is not one of "
                          f"{', '.join(_MODES)}; set {PRIVATE_RAY_ENV}=private for a private Ray "
                          "or unset it")
    if os.environ.get("RAY_ADDRESS"):
        return Target(os.environ["RAY_ADDRESS"])
    if mode == "private":
        return Target(None)
    recorded, live, address_file = _local_cluster()
    if recorded and live:
        return Target(recorded, f"Ray: using the `ray start` cluster on this machine "
                                f"({recorded}); --local-ray for a private one")
    if recorded:
        return Target(None, f"Ray: {address_file} names {recorded}, where no Ray runs any more "
                            "(a stopped or killed `ray start`); starting a private Ray (delete "
                            "that file to silence this line)")
    return Target(None)


def connect() -> bool:
    """Connect to the cluster `choose()` picks, or start a private Ray; True if this call started
    or connected (the caller then disconnects), False if Ray was already initialised."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    target = choose()
    if target.note and target.note not in _SAID:  # once per process (the demo connects 3 times)
        from orchestrator.console import say

        _SAID.add(target.note)
        say(target.note)
    if target.address is None:
        _start_private(ray)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False,
                 logging_level=logging.ERROR)
    else:
        # address=None: Ray resolves the same `ray start` cluster and, as for any cluster it
        # finds itself, turns on token authentication when a token exists (an explicit address
        # would not, and a token-protected head would refuse the driver)
        ray.init(address=None, log_to_driver=False, logging_level=logging.ERROR)
    return True


NODE_START_TIMEOUT = "The current node timed out during startup"
"""Ray's error when its raylet has not registered within a fixed 30 s (ray/_private/node.py)."""


def _start_private(ray, *, attempts: int = 3) -> None:
    """A new local Ray: address="local" starts one even if an address file exists (ray.init()
    would try it). HACK (Ray 2.60): a new node waits a fixed 30 s, with no setting, for its raylet
    to register; on a machine loaded by other work it can take longer, so the start is retried
    (`attempts` in all) after stopping what the failed one left, saying so."""
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address="local", include_dashboard=False, log_to_driver=False,
                     logging_level=logging.ERROR, object_store_memory=PRIVATE_OBJECT_STORE_BYTES)
            return
        except Exception as e:  # noqa: BLE001 — Ray raises a bare Exception for this
            if NODE_START_TIMEOUT not in str(e) or attempt == attempts:
                raise
            ray.shutdown()
            from orchestrator.console import say

            say(f"Ray's local node did not start within Ray's fixed 30 s (a loaded machine?); "
                f"starting it again ({attempt + 1}/{attempts})")


def disconnect(started: bool) -> None:
    """Undo `connect()` (stops a local Ray it started; leaves a cluster running)."""
    if started:
        import ray

        ray.shutdown()


def _local_cluster() -> tuple[str | None, bool, str]:
    """(the address the last `ray start` recorded, whether a raylet on this machine serves it,
    the address file). Ray's own helpers — a private API, on purpose: `ray start` uses exactly
    these two to refuse a second head on a running one; where they are missing (another Ray
    layout) there is no local cluster and a private Ray starts, never a crash."""
    try:
        from ray._private import services
        try:
            from ray._common.utils import get_ray_address_file
        except ImportError:  # older Rays kept it in ray._private.utils
            from ray._private.utils import get_ray_address_file
    except ImportError:
        return None, False, ""
    find_recorded = getattr(services, "find_bootstrap_address", None)
    find_live = getattr(services, "find_gcs_addresses", None)
    if find_recorded is None or find_live is None:
        return None, False, ""
    recorded = find_recorded(None)
    if not recorded:
        return None, False, get_ray_address_file(None)
    if hasattr(find_live, "cache_clear"):  # Ray caches what it found, not what it did not
        find_live.cache_clear()
    return recorded, recorded in find_live(), get_ray_address_file(None)
