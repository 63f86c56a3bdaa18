"""What the terminal shows, for every layer: one `say` for messages, whether output is a live
terminal or a log (`live`), the interval of plain progress lines, and the filters of third-party
noise. The progress bars of the driver's long steps are `orchestrator.driver.progress`.

When output is not a terminal (`raydistill demo 2>&1 | tee log`, a CI log, a job's log) long
lines — paths above all — are never broken at rich's default 80 columns.
"""

from __future__ import annotations

import math
import os
import re

from rich.console import Console

from orchestrator.errors import ConfigError

INTERVAL_ENV = "RAYDISTILL_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 30.0


def make_console(file=None) -> Console:
    """A console on stderr (or `file`). When it is not a terminal, lines are never hard-wrapped:
    rich would otherwise break them at 80 columns, paths included (`plots/loss.pn⏎g`)."""
    out = Console(file=file, stderr=file is None, highlight=False)
    out.soft_wrap = not out.is_terminal
    return out


console = make_console()


def say(message: str) -> None:
    console.print(message)


def live() -> bool:
    """Whether progress shows as live bars (an interactive terminal) or as plain lines."""
    return console.is_terminal and not console.is_dumb_terminal


def progress_interval() -> float:
    """Seconds between plain progress lines (RAYDISTILL_PROGRESS_INTERVAL, default 30)."""
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return DEFAULT_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{INTERVAL_ENV} must be a number of seconds greater than 0, got "
                          f"{raw!r}; e.g. {INTERVAL_ENV}=30, or unset it for the default "
                          f"({DEFAULT_INTERVAL_S:g} s)")
    return value


def duration(seconds: float) -> str:
    """`42s`, `7m05s`, `1h02m`."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


# --------------------------------------------------------------------------- third-party noise

RAYLET_NOISE = (
    # the raylet, each time a node's worker processes pass another multiple of 4× its CPUs (8 on
    # 2 cores): a run's teacher actors, status board, shard readers, Train controllers and workers
    # and Tune trials are that many processes by design
    re.compile(r"WARNING: \d+ PYTHON worker processes have been started on node"),
    # Ray core, on every normal `serve.shutdown()`: Serve's controller ends its graceful shutdown
    # by `ray.kill`ing itself (ray/serve/_private/controller.py), so its own pending
    # `graceful_shutdown` task "fails" and, the controller being retried forever, is reported
    re.compile(r"Task ServeController\.graceful_shutdown failed\. .*killed by `ray\.kill`"),
)
"""Messages Ray publishes to the driver that need no action; each matches one message."""


def quiet_third_party() -> None:
    """Filter the third-party messages every normal run prints and that need no action; each
    filter matches one message exactly, so anything else (errors above all) passes through."""
    _filter_raylet_messages()
    if not live():
        # transformers' own tqdm bars ("Writing model shards" on every save) redraw in place
        # with carriage returns: in a log they are one unreadable line, and say nothing of note
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _filter_raylet_messages() -> None:
    """HACK (Ray 2.60): the driver prints what the raylet and Ray core publish to it (`(raylet)
    …` lines on stdout) from `ray._private.worker.print_to_stdstream`, with no logger or setting
    to filter them by, so that function is wrapped to drop the `RAYLET_NOISE` messages; the
    others (a worker killed for memory, a node that died) still print."""
    import ray._private.worker as ray_worker

    original = ray_worker.print_to_stdstream
    if getattr(original, "raydistill_filter", False):
        return

    def print_to_stdstream(data, ignore_prefix: bool):
        if data.get("pid") == "raylet":
            lines = [ln for ln in data.get("lines", [])
                     if not any(p.search(ln) for p in RAYLET_NOISE)]
            if not lines:
                return None
            data = {**data, "lines": lines}
        return original(data, ignore_prefix=ignore_prefix)

    print_to_stdstream.raydistill_filter = True
    ray_worker.print_to_stdstream = print_to_stdstream
