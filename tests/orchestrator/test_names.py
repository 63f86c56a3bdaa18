"""orchestrator.names: one way to name runs — the names users see stay as they were."""

from __future__ import annotations

import re

from orchestrator import names

STAMP = r"\d{8}-\d{6}-[0-9a-f]{4}"


def test_run_names_job_ids_and_folders():
    assert re.fullmatch(f"exp-{STAMP}", names.run_name("exp"))
    assert re.fullmatch(f"sweep-{STAMP}", names.run_name("sweep"))
    assert re.fullmatch(f"raydistill-tune-{STAMP}", names.job_id("tune"))
    assert names.experiment_dir("s3://b/out/", "exp-1") == "s3://b/out/experiments/exp-1"
    assert names.sweep_dir("/r/out", "sweep-1") == "/r/out/sweeps/sweep-1"


def test_trial_labels():
    assert names.trial_label(3, layers=2, hidden=256, loss="jsd", temperature=2.0) == \
        "t03-2x256-jsd-T2"
    assert names.trial_label(12, layers=1, hidden=64, loss="kl", temperature=1.5) == \
        "t12-1x64-kl-T1.5"
    assert names.trial_label(4) == "t04"  # a combination that cannot be built


def test_a_new_experiment_is_named_by_names(tmp_path):
    """The driver names a new experiment with names.run_name (what --resume takes)."""
    from orchestrator.config import Config
    from orchestrator.driver.experiments import experiment

    cfg = Config(output_dir=str(tmp_path))
    assert re.fullmatch(f"exp-{STAMP}", experiment(cfg, None))
