"""What one replica of the serving deployment (serve/openai_api.py) keeps beside its routes: a
validated prompt waiting for its batch (`Job`), the counters /health reports (`Stats`), and the
merge of several prompts' delta streams (`merged`, a request with a list of prompts). Plain
Python, importable without Ray Serve; a module of its own so that Ray Serve, which pickles the
deployment class, finds these names by import in every replica."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from serve.generate import Delta, Sampling, Student


@dataclass(frozen=True)
class Job:
    """One prompt of one request, validated and tokenized, waiting for its batch."""

    model_id: str
    student: Student
    prompt_ids: list[int]
    sampling: Sampling


class Stats:
    """Counters this replica reports on /health (batch sizes show that batching happens)."""

    def __init__(self):
        self.requests = self.prompts = self.batches = self.batched_rows = 0
        self.max_batch_size = self.completion_tokens = self.errors = 0
        self.started = time.time()

    def batch(self, size: int) -> None:
        self.batches += 1
        self.batched_rows += size
        self.max_batch_size = max(self.max_batch_size, size)

    def as_dict(self) -> dict:
        return {"requests": self.requests, "prompts": self.prompts, "batches": self.batches,
                "max_batch_size": self.max_batch_size,
                "mean_batch_size": round(self.batched_rows / self.batches, 2) if self.batches else 0,
                "completion_tokens": self.completion_tokens, "errors": self.errors,
                "uptime_s": round(time.time() - self.started, 1)}


async def merged(streams: list[AsyncIterator[Delta]]) -> AsyncIterator[tuple[int, Delta]]:
    """(index, delta) from several streams as they arrive (a request with a list of prompts)."""
    if len(streams) == 1:
        async for d in streams[0]:
            yield 0, d
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[Delta]) -> None:
        try:
            async for d in stream:
                await queue.put((index, d))
            await queue.put((index, None))
        except Exception as e:  # noqa: BLE001 - re-raised by the reader
            await queue.put((index, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            index, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for t in tasks:
            t.cancel()
