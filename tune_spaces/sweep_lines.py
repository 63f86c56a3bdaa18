"""What a sweep prints (a Ray Tune callback): one line per evaluation and per finished trial,
the sweep's status every RAYDISTILL_PROGRESS_INTERVAL seconds, a failed trial's cause in one line;
and the reaper of the Train placement groups of trials Tune stopped. Used by tune_spaces/sweep.py.
"""

from __future__ import annotations

import os
import time

from orchestrator.errors import RaydistillError, remote_cause
from orchestrator.console import duration, progress_interval, say


def sweep_lines(metric: str, mode: str, *, total: int):
    """One line per evaluation and per finished trial instead of Tune's tables, the sweep's
    status every RAYDISTILL_PROGRESS_INTERVAL seconds; and the reaper of the Train placement
    groups of trials Tune stopped."""
    from ray.tune import Callback

    class Lines(Callback):
        def __init__(self):
            self.groups: dict[str, str] = {}
            self.interval = progress_interval()
            self.t0 = self.last = time.monotonic()

        def setup(self, **info):
            self.t0 = self.last = time.monotonic()

        def on_step_end(self, iteration, trials, **info):
            now = time.monotonic()
            if now - self.last >= self.interval:
                self.last = now
                say(sweep_status(trials, metric=metric, mode=mode, elapsed=now - self.t0,
                                 total=total))

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if result.get("placement_group"):
                self.groups[trial.trial_id] = result["placement_group"]
            say(f"  {trial} {_params_text(trial.config)}: step {result.get('step')} "
                f"{metric} {result.get(metric, float('nan')):.4f}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            say(f"  {trial} {'finished' if _finished(trial) else 'stopped early'}")
            _reap(self.groups.pop(trial.trial_id, None))

        def on_trial_error(self, iteration, trials, trial, **info):
            say(f"  [red]{trial} failed[/]: {_trial_error(trial)}")
            _reap(self.groups.pop(trial.trial_id, None))

        def on_trial_recover(self, iteration, trials, trial, **info):
            _reap(self.groups.pop(trial.trial_id, None))

    return Lines()


def sweep_status(trials: list, *, metric: str, mode: str, elapsed: float,
                 total: int | None = None) -> str:
    """The sweep in one line: `sweep: 3/8 trials done (2 finished, 1 stopped early, 0 failed),
    1 running, 4 pending · best so far t01-1x128-fkl-T2 eval_kl 0.4321 at step 12 · 12m30s`.
    total: the trials the sweep plans (Tune creates them as it goes); those not created yet count
    as pending."""
    from ray.tune.experiment import Trial

    count = {"finished": 0, "stopped": 0, "failed": 0, "running": 0, "pending": 0}
    best = None
    for t in trials:
        if t.status == Trial.TERMINATED:
            count["finished" if _finished(t) else "stopped"] += 1
        elif t.status == Trial.ERROR:
            count["failed"] += 1
        elif t.status == Trial.PENDING:
            count["pending"] += 1
        else:
            count["running"] += 1
        value = (t.last_result or {}).get(metric)
        if t.status != Trial.ERROR and isinstance(value, (int, float)) and value == value:
            if best is None or (value < best[0] if mode == "min" else value > best[0]):
                best = (value, t)
    count["pending"] += max(0, (total or 0) - len(trials))
    done = count["finished"] + count["stopped"] + count["failed"]
    line = (f"sweep: {done}/{max(total or 0, len(trials))} trials done "
            f"({count['finished']} finished, {count['stopped']} stopped early, "
            f"{count['failed']} failed), {count['running']} running, {count['pending']} pending")
    if best is not None:
        value, t = best
        line += f" · best so far {t} {metric} {value:.4f} at step {t.last_result.get('step')}"
    return f"{line} · {duration(elapsed)}"


def _trial_error(trial) -> str:
    """A failed trial's cause in one line, from the error Tune pickled (ours always unpickles)."""
    try:
        path = trial.pickled_error_file  # the local copy: storage is synced later
        if path and os.path.exists(path):
            import ray.cloudpickle as cloudpickle

            with open(path, "rb") as f:
                return error_text(cloudpickle.load(f))
        lines = (trial.get_error() or "").strip().splitlines()
        if lines:
            return lines[-1][:500]
    except Exception:  # noqa: BLE001 — no readable error file: point at it instead
        pass
    return trial.error_file or "see its log"


def _finished(trial) -> bool:
    return bool(trial.last_result) and "wall_s" in trial.last_result


def _reap(group_hex: str | None) -> None:
    """Remove the placement group of a trial's Train workers after Tune stopped the trial.

    HACK (Ray 2.60): a placement group outlives the actor that created it (it is scoped to the
    job), and Train V2's PlacementGroupCleaner only removes it through the dashboard's state API.
    When Tune kills a trial (ASHA) on a cluster without a dashboard, the group of its Train
    workers would keep its CPUs reserved for the rest of the sweep and starve the next trials.
    A group the trial removed itself (it finished) is left alone."""
    if not group_hex:
        return
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import (PlacementGroup, placement_group_table,
                                          remove_placement_group)

    info = placement_group_table().get(group_hex)
    if info and info.get("state") != "REMOVED":
        remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(group_hex))))


def _params_text(params: dict) -> str:
    parts = []
    for key, value in params.items():
        if isinstance(value, dict):
            parts.append("/".join(f"{k}={v}" for k, v in value.items() if k != "intermediate"))
        else:
            short = key.rsplit(".", 1)[-1]
            parts.append(f"{short}={value:.3g}" if isinstance(value, float) else f"{short}={value}")
    return " ".join(parts)


def error_text(error: BaseException) -> str:
    """A failed trial's cause in one line: the trial's own error (type and text, see RemoteError),
    or the last line of Tune's."""
    cause = remote_cause(error)
    if isinstance(cause, RaydistillError):
        return str(cause)[:500]
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1]}"[:500] if text else type(cause).__name__
