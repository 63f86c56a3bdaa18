"""How runs are named, in one place: what `output_dir` holds and the names users see and pass to
`--resume`, `raydistill serve`, `raydistill jobs`:

    output_dir/experiments/exp-20261203-141500-a1b2/     `run` / `train` (run_name("exp"))
    output_dir/sweeps/sweep-20261203-142000-c3d4/        `tune`          (run_name("sweep"))
        trials/t03-2x256-jsd-T2/                         one trial       (trial_label)
    raydistill-run-20261203-143000-e5f6                  a Ray Job       (job_id)
"""

from __future__ import annotations

import os
import time

EXPERIMENTS_DIR = "experiments"
"""output_dir/experiments/<run_name("exp")>: one `run` or `train` (students, report)."""
SWEEPS_DIR = "sweeps"
"""output_dir/sweeps/<run_name("sweep")>: one `tune` (trials, leaderboard, winners)."""


def run_name(kind: str) -> str:
    """A fresh, sortable, unique name: `<kind>-YYYYmmdd-HHMMSS-<4 hex>` (local time)."""
    return f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"


def job_id(command: str) -> str:
    """A Ray Job's submission id: `raydistill-<command>-YYYYmmdd-HHMMSS-<4 hex>`."""
    return f"raydistill-{run_name(command)}"


def experiment_dir(output_dir: str, experiment: str) -> str:
    """Where an experiment's students, checkpoints and report live (a path or a URI)."""
    return f"{output_dir.rstrip('/')}/{EXPERIMENTS_DIR}/{experiment}"


def sweep_dir(output_dir: str, sweep: str) -> str:
    """Where a sweep's trials, leaderboard and winners live (a local path)."""
    return os.path.join(output_dir, SWEEPS_DIR, sweep)


def trial_label(index: int, *, layers: int | None = None, hidden: int | None = None,
                loss: str | None = None, temperature: float | None = None,
                on_policy: tuple[float, str] | None = None) -> str:
    """A sweep trial's short, readable, unique id: `t03-2x256-jsd-T2` (its folder, its Ray Train
    run, its leaderboard row and its served model's name), `t03-2x256-jsd-T2-op0.5rkl` with an
    on-policy share; `t03` alone for a trial whose combination cannot be built (it fails,
    named)."""
    if layers is None:
        return f"t{index:02d}"
    label = f"t{index:02d}-{layers}x{hidden}-{loss}-T{temperature:g}"
    return label + (f"-op{on_policy[0]:g}{on_policy[1]}" if on_policy else "")
