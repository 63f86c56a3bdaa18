"""A pool of teacher actors fed from a work queue of units; each unit comes back as one shard.

Restart policy: Ray does not restart a teacher actor by itself (max_restarts=0). When an actor dies
(process killed, node lost, engine crash) the pool kills what is left of it, starts a replacement
with the same spec, and puts the actor's unfinished units back at the front of the queue. A unit is
given up after `max_unit_failures` failures, which stops the capture with the last error — never
silently. A unit whose task raises (bad input reaching the engine) counts as a failure the same way,
except a storage error (disk full, no permission): it stops the capture at once with its message.

Errors cross Ray intact: the actor is a `TeacherWorker` behind `_Teacher`, whose methods raise only
errors that unpickle on the driver (`orchestrator.errors.remote_errors`), so the user sees the
original type and text. An engine that fails to start is reported by `ready()`, not by Ray's
actor-creation failure (which keeps only a traceback string).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable

import ray
from ray.exceptions import RayActorError, RayTaskError

from orchestrator.shards.specs import CaptureSpec, EngineSpec
from actors.engine_process import engine_core_in_this_process
from actors.teacher import TeacherWorker
from orchestrator.errors import (ConfigError, DataError, RaydistillError, ShardError, is_transient,
                                 remote_cause, remote_errors)
from orchestrator.shards.manifest import ShardInfo


class _Teacher:
    """The teacher actor's body: a TeacherWorker whose errors cross Ray intact (RemoteError)."""

    def __init__(self, spec: EngineSpec):
        engine_core_in_this_process()
        self.worker, self.start_error = None, None
        try:
            with remote_errors("teacher.start"):
                self.worker = TeacherWorker(spec)
        except RaydistillError as e:  # kept for ready(): a failed creation loses the exception
            self.start_error = e

    def ready(self) -> dict:
        if self.start_error is not None:
            raise self.start_error
        with remote_errors("teacher.ready"):
            return self.worker.ready()

    def process(self, unit: int, records: list, capture: CaptureSpec) -> ShardInfo:
        with remote_errors("teacher.process"):
            return self.worker.process(unit, records, capture)

    def score_rollouts(self, prompts: list, generated: dict, *, k: int,
                       sample_ids: list[str]) -> dict:
        if self.start_error is not None:
            raise self.start_error
        with remote_errors("teacher.score_rollouts"):
            return self.worker.score_rollouts(prompts, generated, k=k, sample_ids=sample_ids)

    def close(self) -> None:
        if self.worker is not None:
            with remote_errors("teacher.close"):
                self.worker.close()


TeacherActor = ray.remote(max_restarts=0, max_task_retries=0)(_Teacher)


class TeacherPool:
    def __init__(self, spec: EngineSpec, *, num_actors: int, num_cpus: float, num_gpus: float,
                 max_inflight: int = 2, max_unit_failures: int = 3,
                 runtime_env: dict | None = None, log: Callable[[str], None] = print):
        self.spec = spec
        self.options = {"num_cpus": num_cpus, "num_gpus": num_gpus}
        if runtime_env:
            self.options["runtime_env"] = runtime_env
        self.max_inflight = max_inflight
        self.max_unit_failures = max_unit_failures
        self.log = log
        self.actors = [self._start() for _ in range(num_actors)]
        self.ready_info: list[dict] = [{} for _ in range(num_actors)]
        self.replacements = 0

    def _start(self):
        return TeacherActor.options(**self.options).remote(self.spec)

    def wait_ready(self) -> dict:
        """Block until every engine is up; returns the first actor's limits (vocab, max length)."""
        self.ready_info = wait_started([a.ready.remote() for a in self.actors])
        return self.ready_info[0]

    def actor_handles(self) -> list:
        return list(self.actors)

    def run(self, units: Iterable[tuple[int, list]],
            on_shard: Callable[[ShardInfo], None], *, capture: CaptureSpec,
            may_submit: Callable[[float], bool] | None = None) -> None:
        """Process every unit of one capture; `on_shard` is called in the driver as each shard is
        published.

        capture: that capture's own settings (output, k, length, long-text policy, shard
        metadata), sent with every unit — the engine is shared, the settings are not;
        may_submit(seconds_waited): backpressure — no new unit is sent while it returns False.
        """
        self._check(capture)
        capture_ref = ray.put(capture)  # once, not per unit (Ray resolves it for each task)
        queue = collections.deque(units)
        failures: collections.Counter[int] = collections.Counter()
        inflight: dict[ray.ObjectRef, tuple[int, tuple[int, list]]] = {}
        per_actor = collections.Counter()
        waited = 0.0
        while queue or inflight:
            allowed = may_submit is None or may_submit(waited)
            waited = 0.0
            for slot in range(len(self.actors)):
                while allowed and queue and per_actor[slot] < self.max_inflight:
                    unit = queue.popleft()
                    ref = self.actors[slot].process.remote(*unit, capture_ref)
                    inflight[ref] = (slot, unit)
                    per_actor[slot] += 1
            if not inflight:  # paused by backpressure with nothing running
                time.sleep(0.5)
                waited = 0.5
                continue
            done, _ = ray.wait(list(inflight), num_returns=1, timeout=None if allowed else 1.0)
            if not done:
                continue
            ref = done[0]
            slot, unit = inflight.pop(ref)
            per_actor[slot] -= 1
            try:
                on_shard(ray.get(ref))
            except RayActorError as e:
                self._fail(unit, failures, e, queue)
                self._replace(slot, inflight, per_actor, queue)
            except RayTaskError as e:
                if isinstance(e.cause, ShardError):  # disk full, no permission: retrying won't help
                    raise ShardError(str(e.cause)) from None
                if isinstance(e.cause, DataError):  # a record the teacher cannot take: the same
                    raise DataError(str(e.cause)) from None  # every time

                self._fail(unit, failures, e, queue)

    def _check(self, capture: CaptureSpec) -> None:
        """A capture asks no more of the engine than its ready limits (engine length, k)."""
        info = next((i for i in self.ready_info if i), None)
        if info is None:
            raise RuntimeError("TeacherPool.run before wait_ready")
        if capture.mode != info["mode"]:
            raise RaydistillError(f"a {capture.mode}-mode capture cannot run on the "
                                  f"{info['mode']}-mode teachers")
        if capture.k > info["max_k"] or capture.max_length > info["max_length"]:
            raise ConfigError(
                f"the capture into {capture.output_dir} needs k={capture.k} and sequences of "
                f"{capture.max_length} tokens, but the teacher engine was started for k ≤ "
                f"{info['max_k']} and {info['max_length']} tokens; raise teacher.max_model_len "
                "or lower data.max_length / teacher.k")

    def _fail(self, unit, failures, error, queue) -> None:
        index = unit[0]
        failures[index] += 1
        cause = remote_cause(error)
        if failures[index] >= self.max_unit_failures:
            raise RaydistillError(
                f"work unit {index} failed {failures[index]} times; last error: {_text(cause)}. "
                f"Finished shards are kept: {_advice(cause)}") from cause
        self.log(f"unit {index} failed ({_text(cause)[:200]}); retrying")
        queue.appendleft(unit)

    def _replace(self, slot, inflight, per_actor, queue) -> None:
        """Replace a dead actor and requeue every unit it still had."""
        dead = self.actors[slot]
        for ref, (s, unit) in list(inflight.items()):
            if s == slot:
                inflight.pop(ref)
                queue.appendleft(unit)
        per_actor[slot] = 0
        ray.kill(dead, no_restart=True)
        self.actors[slot] = self._start()
        self.ready_info[slot] = wait_started([self.actors[slot].ready.remote()])[0]
        self.replacements += 1
        self.log(f"teacher actor {slot} died; started a replacement")

    def shutdown(self) -> None:
        """Stop the engines cleanly, then the actors (by handle)."""
        closing = [a.close.remote() for a in self.actors]
        try:
            ray.get(closing, timeout=30)
        except Exception:  # noqa: BLE001 — a dead actor cannot close; it is killed below anyway
            pass
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []


def wait_started(refs: list) -> list[dict]:
    """The actors' `ready()` answers (teacher or rollout actors); an engine that failed to start stops the capture with its
    cause (a deterministic one — a bad model file, a setting the engine refuses — says so)."""
    try:
        return ray.get(refs)
    except (RayTaskError, RayActorError) as e:
        cause = remote_cause(e)
        raise RaydistillError(f"a teacher actor failed to start: {_text(cause)}. "
                              f"Finished shards are kept: {_advice(cause)}") from cause


def _advice(cause: BaseException) -> str:
    """A rerun resumes a capture; say so only when it can get past the cause."""
    if is_transient(cause):
        return "rerun the same command to resume"
    return "fix the cause, then rerun the same command (a rerun alone fails the same way)"


def _text(error: BaseException) -> str:
    """One line for a failure: our own errors as they read, others as `Type: last line`."""
    if isinstance(error, RaydistillError):
        return str(error)
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[-1]}" if lines else type(error).__name__
