"""Terminal output: one `say` for messages, and the progress of the long steps (the demo
teacher's build, a capture, the students' training, a sweep's trials).

On a terminal the progress shows as rich's live bars. When output is not a terminal
(`raydistill demo 2>&1 | tee log`, a CI log, a job's log) the bars would print nothing until
they end, so a plain line is printed instead every `RAYDISTILL_PROGRESS_INTERVAL` seconds
(default 30), and long lines — paths above all — are never broken at rich's default 80 columns.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from collections.abc import Callable

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from orchestrator.errors import ConfigError
from orchestrator.manifest import ShardInfo

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


class Heartbeat:
    """Prints `describe()` (one or more lines; None: nothing) every `interval` seconds from a
    background thread while the block runs. Off (a no-op) when `enabled` is false."""

    def __init__(self, describe: Callable[[], str | None], *, enabled: bool = True,
                 interval: float | None = None):
        self.describe = describe
        self.enabled = enabled
        self.interval = progress_interval() if interval is None else interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="raydistill-progress",
                                            daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                text = self.describe()
            except Exception:  # noqa: BLE001 — progress is best effort; the work goes on
                continue
            if text:
                say(text)


class _Shown:
    """rich's live `bar` on a terminal, else `describe()` as a plain line every interval;
    nothing at all when `quiet` (another display owns the output)."""

    def __init__(self, bar: Progress, describe: Callable[[], str | None], *, quiet: bool = False):
        self.bar = bar
        self.quiet = quiet
        self.is_live = not quiet and live()
        self.heartbeat = Heartbeat(describe, enabled=not quiet and not self.is_live)

    def __enter__(self):
        if self.is_live:
            self.bar.__enter__()
        self.heartbeat.__enter__()
        return self

    def __exit__(self, *exc):
        self.heartbeat.__exit__(*exc)
        if self.is_live:
            self.bar.__exit__(*exc)


class StepProgress:
    """A training loop of `steps` steps, optionally capped at `seconds` (the demo teacher's
    build): step, loss, elapsed and estimated time left. `update` has the signature of
    `tiny.train_lm`'s `on_step` (step, fraction done, loss)."""

    def __init__(self, label: str, *, steps: int, seconds: float | None = None):
        self.label, self.steps, self.seconds = label, steps, seconds
        self.step, self.fraction, self.loss, self.t0 = 0, 0.0, None, time.time()
        self.bar = Progress(TextColumn(label), BarColumn(),
                            TextColumn("step {task.fields[step]} · loss {task.fields[loss]}"),
                            TimeRemainingColumn(), console=console)
        self.task = self.bar.add_task(label, total=1.0, step=0, loss="-")
        self.shown = _Shown(self.bar, self.line)

    def __enter__(self) -> StepProgress:
        self.t0 = time.time()
        self.shown.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.shown.__exit__(*exc)
        if self.shown.heartbeat.enabled and exc[0] is None:
            say(self.line())  # a log ends with where the loop stopped, however short it was

    def update(self, step: int, fraction: float, loss: float) -> None:
        self.step, self.fraction, self.loss = step, fraction, loss
        self.bar.update(self.task, completed=fraction, step=step, loss=f"{loss:.2f}")

    def line(self) -> str:
        elapsed = time.time() - self.t0
        loss = f", loss {self.loss:.2f}" if self.loss is not None else ""
        left = ""
        if 0 < self.fraction < 1:
            left = f", ~{duration(elapsed / self.fraction - elapsed)} left"
        cap = f" (stops at {duration(self.seconds)})" if self.seconds else ""
        return (f"{self.label}: step {self.step}/{self.steps}{loss}, {duration(elapsed)}"
                f"{left}{cap}")


class CaptureProgress:
    """Shards written / total, samples, tokens per second."""

    def __init__(self, *, total_units: int, done_units: int, label: str = "capture",
                 quiet: bool = False):
        # quiet: another display (training, whose lines include the capture) owns the output
        self.label, self.total, self.done_before = label, total_units, done_units
        self.bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(),
                            TextColumn("shards · {task.fields[samples]} samples · "
                                       "{task.fields[rate]} tok/s"),
                            TimeElapsedColumn(), console=console, transient=False)
        self.task = self.bar.add_task("capture", total=total_units, completed=done_units,
                                      samples=0, rate="-")
        self.shown = _Shown(self.bar, self.line, quiet=quiet)
        self.samples = 0
        self.tokens = 0
        self.shards = 0
        self.bytes = 0
        self.t0 = self.t_last = time.time()

    def __enter__(self):
        self.t0 = self.t_last = time.time()
        self.shown.__enter__()
        return self

    def __exit__(self, *exc):
        self.shown.__exit__(*exc)

    def log(self, message: str) -> None:
        self.bar.console.print(message)

    def advance(self, info: ShardInfo) -> None:
        self.samples += info.rows
        self.tokens += info.tokens
        self.shards += 1
        self.bytes += info.bytes
        self.t_last = time.time()
        rate = self.tokens / max(self.t_last - self.t0, 1e-6)
        self.bar.update(self.task, advance=1, samples=self.samples, rate=f"{rate:,.0f}")

    def line(self) -> str:
        elapsed = max(time.time() - self.t0, 1e-6)
        return (f"{self.label}: {self.done_before + self.shards}/{self.total} shards, "
                f"{self.samples} samples, {self.tokens / elapsed:,.0f} tok/s, "
                f"{duration(elapsed)}")

    def summary(self) -> str:
        elapsed = max(self.t_last - self.t0, 1e-6)
        per_tok = self.bytes / max(self.tokens, 1)
        return (f"captured {self.shards} shards, {self.samples} samples, {self.tokens} tokens in "
                f"{elapsed:.0f}s ({self.tokens / elapsed:,.0f} tok/s, {per_tok:.1f} B/token)")


class TrainProgress:
    """Each student's steps, loss, data-wait share and last evaluation, polled from the run's
    board (the workers report there), plus the capture's progress in a streaming run."""

    def __init__(self, labels: list[str], *, total: int, board, capture_total: int | None = None):
        self.board, self.capture_total, self.total = board, capture_total, total
        self.bar = Progress(TextColumn("train {task.description}"), BarColumn(),
                            MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                            TimeElapsedColumn(), console=console, transient=False)
        self.tasks = {label: self.bar.add_task(label, total=total, status="starting")
                      for label in labels}
        self.shown = _Shown(self.bar, self.lines)
        self.done: set[str] = set()  # students whose training ended (the board says)
        self.said_done: set[str] = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.t0 = time.time()

    def __enter__(self):
        self.t0 = time.time()
        self.shown.__enter__()
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=5)
        self._update()
        self.shown.__exit__(*exc)

    def _poll(self) -> None:
        while not self.stop.wait(1.0):
            self._update()

    def _update(self) -> None:
        import ray

        try:
            snap = ray.get(self.board.snapshot.remote(), timeout=5)
        except Exception:  # noqa: BLE001 — progress is best effort; training goes on
            return
        self.done = set(snap.get("done", ()))
        for label, task in self.tasks.items():
            m = snap["metrics"].get(label)
            parts = []
            if m:
                parts.append(f"loss {m['loss']:.2f} · {m['tokens_per_s']:,.0f} tok/s · "
                             f"wait {m['data_wait_share']:.0%}")
                if "eval_student_nll" in m:
                    parts.append(f"held-out {m['eval_student_nll']:.2f}")
            if self.capture_total and label == "kd":
                parts.append(f"capture {snap['published']}/{self.capture_total}")
            if parts:
                self.bar.update(task, completed=m["step"] if m else 0, status=" · ".join(parts))

    def lines(self) -> str:
        """One plain line per student still training (and once when it is done):
        `train kd: step 120/300 · loss 2.31 · … · 4m10s`."""
        elapsed = duration(time.time() - self.t0)
        out = []
        for task in self.bar.tasks:
            label = task.description
            if label in self.said_done:
                continue
            if label in self.done:
                self.said_done.add(label)
            state = "done at" if label in self.done else "step"
            out.append(f"train {label}: {state} {task.completed:.0f}/{self.total} · "
                       f"{task.fields['status']} · {elapsed}")
        return "\n".join(out)


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
