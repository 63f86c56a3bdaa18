"""The run's status board: a plain class the pipeline wraps in a small Ray actor so that the
driver, the teacher pool and the train workers of one streaming run can see each other.

- the capture publishes progress and, if it fails, why (readers waiting for a shard stop then);
- the students' shard readers report each shard they have read, train workers their metrics;
- the capture asks `may_capture` before sending more work: it pauses while it is more than
  `max_ahead` shards ahead of the readers (backpressure), and runs freely once training is done.
"""

from __future__ import annotations


class ShardBoard:
    def __init__(self, *, max_ahead: int, consumer: str = "kd"):
        self.max_ahead = max_ahead
        self.consumer = consumer
        self.published = 0
        self.failure: str | None = None
        self.read_by: dict[str, set[int]] = {}
        self.reads: dict[str, int] = {}  # every shard read, again in later epochs too
        self.metrics: dict[str, dict] = {}
        self.done: set[str] = set()
        self.paused_s = 0.0

    def publish(self, shards: int) -> None:
        self.published = shards

    def capture_failed(self, message: str) -> None:
        self.failure = message

    def capture_failure(self) -> str | None:
        return self.failure

    def shard_read(self, label: str, unit: int) -> None:
        self.read_by.setdefault(label, set()).add(unit)
        self.reads[label] = self.reads.get(label, 0) + 1

    def train_update(self, label: str, metrics: dict) -> None:
        self.metrics[label] = metrics

    def train_done(self, label: str) -> None:
        self.done.add(label)

    def may_capture(self, waited_s: float = 0.0) -> bool:
        """False while the capture is `max_ahead` shards ahead of the consuming students."""
        self.paused_s += waited_s
        if self.consumer in self.done:
            return True
        return self.published - len(self.read_by.get(self.consumer, ())) < self.max_ahead

    def snapshot(self) -> dict:
        return {"published": self.published, "failure": self.failure,
                "read": {k: len(v) for k, v in self.read_by.items()},
                "shard_reads": dict(self.reads),
                "metrics": dict(self.metrics), "done": sorted(self.done),
                "capture_paused_s": self.paused_s}
