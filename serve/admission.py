"""Admission control for one serving replica: bounded work, a bounded wait, and a fast 429.

    admission = Admission(working=16, waiting=64)  # max_ongoing_requests, max_queued_requests
    ticket = admission.admit()        # ApiError(429) at once when 16 + 64 requests are held
    try:
        await ticket.slot()           # one of the 16 working slots, before any model work
        ...
    finally:
        ticket.release()

Why here and not Ray Serve's own `max_queued_requests`: Serve answers its overflow 503 (a 5xx) or,
configured, 429 with a plain-text body; clients of an OpenAI-compatible server expect 429 with
`Retry-After` and OpenAI's error body, which the official clients turn into RateLimitError and
retry. serve/openai_api.py sets Serve's limits above these so that they are not reached first.
Plain asyncio, no Ray: a replica runs its requests on one event loop.
"""

from __future__ import annotations

import asyncio

from serve.protocol import ApiError

RETRY_AFTER_S = 1
"""The `Retry-After` (seconds) of a 429: a batch of small completions takes about that long."""


class Admission:
    """Admission control of one replica: `admit` raises a 429 once `limit` requests are held
    (working plus waiting); an admitted request awaits one of `working` slots before model work.
    waiting < 0: no limit (serve.max_queued_requests=-1). Plain asyncio: one event loop."""

    def __init__(self, *, working: int, waiting: int):
        self.working, self.waiting = working, waiting
        self.limit = None if waiting < 0 else working + waiting
        self.held = self.peak = self.admitted = self.rejected = 0
        self.slots = asyncio.Semaphore(working)

    def admit(self) -> Ticket:
        if self.limit is not None and self.held >= self.limit:
            self.rejected += 1
            raise ApiError(
                429, f"the server is at capacity: this replica already holds {self.held} "
                     f"requests (serve.max_ongoing_requests={self.working} working + "
                     f"serve.max_queued_requests={self.waiting} waiting); retry after "
                     f"{RETRY_AFTER_S} s (Retry-After), or raise serve.max_ongoing_requests, "
                     "serve.max_queued_requests or serve.max_replicas",
                kind="rate_limit_error", code="server_at_capacity")
        self.held += 1
        self.admitted += 1
        self.peak = max(self.peak, self.held)
        return Ticket(self)

    def as_dict(self) -> dict:
        return {"in_flight": self.held, "peak_in_flight": self.peak, "admitted": self.admitted,
                "rejected_429": self.rejected, "admission_limit": self.limit}


class Ticket:
    """One admitted request: `await slot()` before model work, `release()` (idempotent) at the
    end, whichever way it ends."""

    def __init__(self, admission: Admission):
        self._admission = admission
        self._slot = self._released = False

    async def slot(self) -> None:
        if not self._slot:
            await self._admission.slots.acquire()
            self._slot = True

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._admission.held -= 1
        if self._slot:
            self._admission.slots.release()
