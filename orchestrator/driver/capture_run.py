"""Capture execution for the recipes (driver-internal: `pipeline` and its `streaming` and `sweeps`
helpers import it): `Teachers` runs planned captures (`orchestrator.shards.plan`) on teacher pools.

The engine and the captures are apart: a pool is started for an engine (`EngineSpec`: model,
backend, dtype, resources, mode) and reused by every capture of one command that needs the same
engine — the main capture and the held-out split share one — while each capture's own settings
(`CaptureSpec`: output, k, max_length, long_text, sampling, shard metadata) travel with its units.
So a held-out split that is truncated and a main capture that is split never inherit each other's
policy, whichever of them started the pool.
"""

from __future__ import annotations

import os
import time

from orchestrator.shards.plan import CapturePlan
from orchestrator.errors import RaydistillError
from orchestrator.shards.manifest import ShardInfo, save_manifest
from orchestrator.driver.progress import CaptureProgress
from orchestrator.console import say
from orchestrator.storage import storage_env


class Teachers:
    """The teacher actors of one command: a pool started on first use for a capture's engine (a
    scoring engine cannot sample) and reused by every capture on that engine; stopped on exit."""

    def __init__(self):
        self.pool = None
        self.engine = None

    def __enter__(self) -> Teachers:
        return self

    def __exit__(self, *exc) -> None:
        self._stop()

    def _stop(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        self.pool, self.engine = None, None

    def _pool_for(self, plan: CapturePlan):
        from actors.pool import TeacherPool

        engine = plan.engine_spec()
        if self.pool is not None and self.engine == engine:
            return self.pool
        self._stop()
        t, c = plan.cfg.teacher, plan.cfg.capture
        say(f"starting {t.num_actors} {t.backend} teacher actor(s) ({t.mode} mode) for {t.model}")
        t0 = time.time()
        self.pool = TeacherPool(engine, num_actors=t.num_actors, num_cpus=t.num_cpus,
                                num_gpus=t.num_gpus, max_inflight=c.max_inflight_per_actor,
                                max_unit_failures=c.max_unit_failures,
                                runtime_env=_actor_env(plan.cfg.output_dir), log=say)
        self.engine = engine
        info = self.pool.wait_ready()
        say(f"teachers ready in {time.time() - t0:.0f}s (engine: {info['max_length']} tokens, "
            f"k ≤ {info['max_k']})")
        return self.pool

    def capture(self, plan: CapturePlan, *, may_submit=None, on_published=None,
                quiet: bool = False) -> None:
        """Run one planned capture to the end (a no-op when it is complete)."""
        m = plan.manifest
        if not plan.todo:
            say(f"{plan.label}: complete, {len(m.shards)} shards in {plan.cfg.output_dir}")
            return
        pool = self._pool_for(plan)
        spec = plan.capture_spec()
        how = f", long texts {spec.long_text}" if spec.mode == "score" else ""
        say(f"{plan.label}: k={spec.k}, {spec.max_length} tokens{how} → {spec.output_dir}")
        progress = CaptureProgress(total_units=m.total_units, done_units=len(m.shards),
                                   label=plan.label, quiet=quiet)
        pool.log = progress.log

        def on_shard(info: ShardInfo) -> None:
            m.shards[info.unit] = info
            m.complete = len(m.shards) == m.total_units
            save_manifest(plan.fs, plan.root, m)
            progress.advance(info)
            if on_published is not None:
                on_published(len(m.shards))

        try:
            with progress:
                pool.run(plan.units(), on_shard, capture=spec, may_submit=may_submit)
        except KeyboardInterrupt:
            raise RaydistillError(
                f"interrupted: {len(m.shards)}/{m.total_units} {plan.label} shards are safely "
                "written; rerun the same command to capture the rest") from None
        plan.todo = [u for u in plan.todo if u not in m.shards]
        say(progress.summary())


def _actor_env(output_dir: str) -> dict | None:
    """Teacher actors write the shards themselves, possibly on other nodes: for an object-store
    output_dir, forward the storage credentials and endpoint the driver has (only those set)."""
    hook = {k: os.environ[k] for k in ("RAYDISTILL_TEST_TEACHER_DELAY_S",) if os.environ.get(k)}
    if "://" not in output_dir:
        return {"env_vars": hook} if hook else None
    env = hook | storage_env()
    return {"env_vars": env} if env else None
