"""The progress of the driver's long steps (the demo teacher's build, a capture, the students'
training, a sweep's trials).

On a terminal the progress shows as rich's live bars. When output is not a terminal the bars would
print nothing until they end, so a plain line is printed instead every
`RAYDISTILL_PROGRESS_INTERVAL` seconds (default 30); `orchestrator.console` holds `say` and the
rest every layer shares.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from orchestrator import console as term
from orchestrator.console import duration, live, progress_interval, say
from orchestrator.shards.manifest import ShardInfo


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
                            TimeRemainingColumn(), console=term.console)
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
                            TimeElapsedColumn(), console=term.console, transient=False)
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
                            TimeElapsedColumn(), console=term.console, transient=False)
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
                if m.get("onpolicy_samples_per_s"):  # (0 before on_policy.start_step)
                    parts.append(on_policy_status(m))
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


def on_policy_status(m: dict) -> str:
    """An on-policy student's loop in one progress field: samples/s and the shares of the
    trainer's time in rollout, scoring, weight sync and training, staleness."""
    return (f"on-policy {m['onpolicy_samples_per_s']:.1f} samples/s (rollout "
            f"{m['onpolicy_generate_share']:.0%}, scoring {m['onpolicy_score_share']:.0%}, sync "
            f"{m['onpolicy_sync_share']:.0%}, training {m['onpolicy_train_share']:.0%}, waiting "
            f"{m['onpolicy_wait_share']:.0%}; staleness {m['onpolicy_staleness']:.1f})")
