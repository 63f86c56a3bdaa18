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

    def __init__(self, *, total_units: int, done_units: int):
        self.bar = Progress(TextColumn("capture"), BarColumn(), MofNCompleteColumn(),
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
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
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
