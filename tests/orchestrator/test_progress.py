"""Output a person can read when it is not a terminal (`raydistill demo 2>&1 | tee log`): plain
progress lines at a steady interval instead of live bars, long lines never hard-wrapped, and
third-party noise filtered without hiding what matters."""

from __future__ import annotations

import io
import time

import pytest
from rich.console import Console

from orchestrator import console as term
from orchestrator.driver import progress
from orchestrator.errors import ConfigError
from orchestrator.shards.manifest import ShardInfo

LONG_PATH = "/home/someone/.cache/raydistill/runs/quickstart/experiments/" \
            "exp-20261203-101500-ab12/plots/loss.png"


@pytest.fixture
def log(monkeypatch):
    """The module's console writing to a file (not a terminal), progress lines every 0.1 s."""
    out = io.StringIO()
    monkeypatch.setattr(term, "console", term.make_console(out))
    monkeypatch.setenv(term.INTERVAL_ENV, "0.1")
    return out


def test_a_long_path_is_never_wrapped_when_output_is_not_a_terminal():
    out = io.StringIO()
    console = term.make_console(out)
    assert not console.is_terminal
    line = f"  plots: {LONG_PATH}, {LONG_PATH.replace('loss', 'metrics')}"
    assert len(line) > 2 * console.width
    console.print(line)
    assert out.getvalue() == line + "\n"


def test_the_progress_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(term.INTERVAL_ENV, raising=False)
    assert term.progress_interval() == term.DEFAULT_INTERVAL_S == 30
    monkeypatch.setenv(term.INTERVAL_ENV, "5")
    assert term.progress_interval() == 5.0
    for bad in ("soon", "0", "-3", "inf"):
        monkeypatch.setenv(term.INTERVAL_ENV, bad)
        with pytest.raises(ConfigError, match=rf"RAYDISTILL_PROGRESS_INTERVAL .*{bad!r}.*=30"):
            term.progress_interval()


def test_a_time_budgeted_loop_prints_plain_lines_at_a_steady_interval(log):
    with progress.StepProgress("training demo teacher", steps=1000, seconds=480) as bar:
        bar.update(12, 0.1, 5.4321)
        time.sleep(0.35)
        bar.update(1000, 1.0, 2.5)
    lines = log.getvalue().splitlines()
    assert 3 <= len(lines) <= 5, lines
    assert lines[0].startswith("training demo teacher: step 12/1000, loss 5.43, 0s, ~")
    assert lines[-1].startswith("training demo teacher: step 1000/1000, loss 2.50, 0s (stops")
    assert lines[0].endswith("left (stops at 8m00s)")
    assert "━" not in log.getvalue()  # no bar drawn


def test_a_terminal_gets_the_live_bar_and_no_plain_lines(monkeypatch):
    out = io.StringIO()
    monkeypatch.setenv("TERM", "xterm-256color")  # rich draws no live bars on a dumb terminal
    monkeypatch.setattr(term, "console", Console(file=out, force_terminal=True, width=100))
    monkeypatch.setenv(term.INTERVAL_ENV, "0.1")
    with progress.StepProgress("training demo teacher", steps=1000, seconds=480) as bar:
        bar.update(12, 0.1, 5.4321)
        time.sleep(0.35)
    assert "━" in out.getvalue() and "training demo teacher: step" not in out.getvalue()


def test_a_capture_prints_shards_samples_and_rate(log):
    info = ShardInfo(unit=2, file="shard-00002.parquet", rows=8, tokens=1000,
                     labelled_tokens=990, bytes=40_000, sha256="0" * 64)
    with progress.CaptureProgress(total_units=5, done_units=2, label="held-out capture") as p:
        p.advance(info)
        time.sleep(0.25)
    first = log.getvalue().splitlines()[0]
    assert first.startswith("held-out capture: 3/5 shards, 8 samples, ") and "tok/s" in first


def test_a_quiet_capture_prints_nothing(log):
    with progress.CaptureProgress(total_units=5, done_units=0, quiet=True):
        time.sleep(0.25)
    assert log.getvalue() == ""


def test_training_prints_each_students_step_and_loss_from_the_board(log, ray_session):
    import ray

    from orchestrator.train.board import ShardBoard

    board = ray.remote(ShardBoard).options(num_cpus=0).remote(max_ahead=1)
    ray.get(board.train_update.remote("kd", {"step": 40, "loss": 2.5, "tokens_per_s": 1234.0,
                                             "data_wait_share": 0.05,
                                             "eval_student_nll": 4.25}))
    ray.get(board.publish.remote(3))
    with progress.TrainProgress(["kd", "hard"], total=300, board=board, capture_total=10):
        time.sleep(1.6)  # the board is polled every second
        text = log.getvalue()
        assert ("train kd: step 40/300 · loss 2.50 · 1,234 tok/s · wait 5% · held-out 4.25 · "
                "capture 3/10 · ") in text
        assert "train hard: step 0/300 · starting · " in text
        ray.get(board.train_done.remote("kd"))
        time.sleep(1.6)
    after = log.getvalue()[len(text):]
    assert after.count("train kd: done at 40/300 · loss 2.50") == 1  # said once, then quiet
    assert after.count("train hard: step 0/300") >= 2


def test_rays_expected_noise_is_dropped_and_its_other_messages_pass(capsys):
    """What the raylet publishes to the driver: the worker-pool warning (a run starts that many
    processes by design) and the Serve controller's self-kill on every normal stop are dropped;
    anything else, such as a worker killed for memory, still prints."""
    import ray._private.worker as ray_worker

    term.quiet_third_party()
    term.quiet_third_party()  # idempotent: wrapped once

    def publish(line: str) -> str:
        ray_worker.print_to_stdstream({"lines": [line], "pid": "raylet", "is_err": False},
                                      ignore_prefix=False)
        return capsys.readouterr().out

    assert publish("WARNING: 12 PYTHON worker processes have been started on node: d5988 with "
                   "address: 192.0.2.2, which is 6x the maximum expected startup concurrency "
                   "(2). This could be a result of using a large number of actors") == ""
    assert publish("Task ServeController.graceful_shutdown failed. There are infinite retries "
                   "remaining, so the task will be retried. Error: The actor is dead because "
                   "it was killed by `ray.kill`.") == ""
    oom = ("Task was killed due to the node running low on memory. Memory on the node "
           "(IP: 192.0.2.2) where the task was running was 22.9GB / 23.5GB")
    assert oom in publish(oom)
    assert "graceful_shutdown failed" in publish(
        "Task ServeController.graceful_shutdown failed. Error: ValueError: boom")


def test_transformers_bars_are_off_in_a_log_and_kept_on_a_terminal(monkeypatch):
    """`save_pretrained`'s "Writing model shards" bar redraws with carriage returns: one
    unreadable line in a log."""
    from transformers.utils import logging as hf_logging

    try:
        hf_logging.enable_progress_bar()
        monkeypatch.setenv("TERM", "xterm-256color")
        monkeypatch.setattr(term, "console", Console(file=io.StringIO(), force_terminal=True))
        term.quiet_third_party()
        assert hf_logging.is_progress_bar_enabled()
        monkeypatch.setattr(term, "console", term.make_console(io.StringIO()))
        term.quiet_third_party()
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()


def test_an_on_policy_students_line_shows_its_loop():
    """The on-policy figures a train worker reports become one progress field."""
    m = {"onpolicy_samples_per_s": 3.25, "onpolicy_generate_share": 0.41,
         "onpolicy_score_share": 0.12, "onpolicy_sync_share": 0.004, "onpolicy_train_share": 0.7,
         "onpolicy_wait_share": 0.25, "onpolicy_staleness": 1.0}
    assert progress.on_policy_status(m) == (
        "on-policy 3.2 samples/s (rollout 41%, scoring 12%, sync 0%, training 70%, waiting 25%; "
        "staleness 1.0)")
