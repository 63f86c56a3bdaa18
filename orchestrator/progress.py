"""Terminal output: one `say` for messages and a rich progress bar for capture."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from orchestrator.manifest import ShardInfo

console = Console(stderr=True, highlight=False)


def say(message: str) -> None:
    console.print(message)


class CaptureProgress:
    """Shards written / total, samples, tokens per second."""

    def __init__(self, *, total_units: int, done_units: int, label: str = "capture",
                 quiet: bool = False):
        self.quiet = quiet  # another live display (training) owns the terminal
        self.bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(),
                            TextColumn("shards · {task.fields[samples]} samples · "
                                       "{task.fields[rate]} tok/s"),
                            TimeElapsedColumn(), console=console, transient=False)
        self.task = self.bar.add_task("capture", total=total_units, completed=done_units,
                                      samples=0, rate="-")
        self.samples = 0
        self.tokens = 0
        self.shards = 0
        self.bytes = 0
        self.t0 = self.t_last = time.time()

    def __enter__(self):
        self.t0 = self.t_last = time.time()
        if not self.quiet:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if not self.quiet:
            self.bar.__exit__(*exc)

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

    def summary(self) -> str:
        elapsed = max(self.t_last - self.t0, 1e-6)
        per_tok = self.bytes / max(self.tokens, 1)
        return (f"captured {self.shards} shards, {self.samples} samples, {self.tokens} tokens in "
                f"{elapsed:.0f}s ({self.tokens / elapsed:,.0f} tok/s, {per_tok:.1f} B/token)")


class TrainProgress:
    """Each student's steps, loss, data-wait share and last evaluation, polled from the run's
    board (the workers report there), plus the capture's progress in a streaming run."""

    def __init__(self, labels: list[str], *, total: int, board, capture_total: int | None = None):
        import threading

        self.board, self.capture_total = board, capture_total
        self.bar = Progress(TextColumn("train {task.description}"), BarColumn(),
                            MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                            TimeElapsedColumn(), console=console, transient=False)
        self.tasks = {label: self.bar.add_task(label, total=total, status="starting")
                      for label in labels}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self):
        self.bar.__enter__()
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=5)
        self._update()
        self.bar.__exit__(*exc)

    def _poll(self) -> None:
        while not self.stop.wait(1.0):
            self._update()

    def _update(self) -> None:
        import ray

        try:
            snap = ray.get(self.board.snapshot.remote(), timeout=5)
        except Exception:  # noqa: BLE001 — progress is best effort; training goes on
            return
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
