"""Errors cross Ray intact: an exception whose constructor cannot be re-run from its args (like
huggingface_hub's StrictDataclassClassValidationError) raised in a teacher actor, a Ray Train
worker or a Tune trial reaches the user as one message naming its type and text — never a
pickling error — with `--resume` advice only for what a rerun can fix."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.conftest import capture_config, write_jsonl
from orchestrator.errors import (DivergedError, RaydistillError, RemoteError, ShardError,
                                 carried, is_transient, remote_cause, remote_errors)

ROOT = Path(__file__).resolve().parents[2]

# Written into a test's tmp dir and put on PYTHONPATH, so Ray workers import it; the fault hook
# (RAYDISTILL_TEST_FAULT=WHERE=nasty_fault:fail) calls fail() inside the worker.
NASTY_MODULE = '''
class Nasty(Exception):
    """Like StrictDataclassClassValidationError: the constructor needs a keyword argument, so
    unpickling (which calls Nasty(*args)) fails."""

    def __init__(self, message, *, cause):
        super().__init__(message)
        self.cause = cause


def fail():
    raise Nasty("layer_types has 3 entries for 1 layer", cause=ValueError("inner"))
'''
NASTY_TEXT = "nasty_fault.Nasty: layer_types has 3 entries for 1 layer"


class Nasty(Exception):
    def __init__(self, message, *, cause):
        super().__init__(message)
        self.cause = cause


class LockHolder(Exception):
    """Holds an attribute that cannot be pickled at all."""

    def __init__(self, message):
        super().__init__(message)
        self.lock = threading.Lock()


class BadStr(Exception):
    def __str__(self):
        raise RuntimeError("no text")


class KeywordError(RaydistillError):
    """One of our own errors that does not round-trip: carried must wrap it too."""

    def __init__(self, *, field):
        super().__init__(f"bad {field}")


def _raised(error: BaseException) -> BaseException:
    """`error` with a real traceback."""
    try:
        raise error
    except BaseException as e:  # noqa: BLE001
        return e


def _strict_dataclass_error() -> BaseException:
    """The real exception of the issue: a Qwen2 config whose layer_types disagree with its depth."""
    from transformers import Qwen2Config

    try:
        Qwen2Config(num_hidden_layers=1, layer_types=["full_attention"] * 3, hidden_size=128,
                    num_attention_heads=2, num_key_value_heads=2, intermediate_size=256,
                    vocab_size=300)
    except Exception as e:  # noqa: BLE001
        return e
    pytest.fail("transformers accepted an inconsistent layer_types")


# --------------------------------------------------------------------------- no Ray

@pytest.mark.parametrize("make", [
    lambda: Nasty("needs a keyword", cause=1),
    lambda: LockHolder("holds a lock"),
    lambda: BadStr(),
    lambda: KeywordError(field="x"),
    _strict_dataclass_error,
], ids=["keyword-only", "unpicklable-attribute", "broken-str", "our-own-keyword-only",
        "StrictDataclassClassValidationError"])
def test_awkward_exceptions_round_trip_as_remote_errors(make):
    error = _raised(make())
    if not isinstance(error, BadStr):  # pickles, but its text cannot be read
        with pytest.raises(Exception):  # what Ray does with the original: it does not survive
            pickle.loads(pickle.dumps(error))
    sent = carried(error)
    assert isinstance(sent, RemoteError)
    back = pickle.loads(pickle.dumps(sent))
    assert type(back) is RemoteError and not back.transient
    assert (back.type_name, back.message, back.traceback) == \
        (sent.type_name, sent.message, sent.traceback)
    assert back.type_name.endswith(type(error).__qualname__)
    assert "Traceback" in back.traceback and "_raised" in back.traceback
    if not isinstance(error, BadStr):
        assert str(back) == f"{back.type_name}: {error}"


def test_the_issue_s_error_keeps_its_qualified_type_and_cause_text():
    back = pickle.loads(pickle.dumps(carried(_raised(_strict_dataclass_error()))))
    assert back.type_name == "huggingface_hub.errors.StrictDataclassClassValidationError"
    assert "must be equal to the number of `layer_types` (3)" in back.message


def test_our_own_picklable_errors_pass_through_as_they_are():
    for error in (DivergedError("loss is nan; lower train.lr"), ShardError("disk full")):
        assert carried(error) is error
    with pytest.raises(DivergedError):
        with remote_errors("x"):
            raise DivergedError("loss is nan")
    with pytest.raises(KeyboardInterrupt):
        with remote_errors("x"):
            raise KeyboardInterrupt


def test_only_lost_processes_and_connections_are_transient():
    from ray.exceptions import ActorDiedError

    assert is_transient(ConnectionResetError()) and is_transient(TimeoutError())
    assert is_transient(ActorDiedError())
    assert carried(_raised(ConnectionRefusedError("peer gone"))).transient
    for error in (ValueError("bad shape"), TypeError("x"), OSError(28, "No space left"),
                  Nasty("x", cause=1), DivergedError("nan"), _strict_dataclass_error()):
        assert not is_transient(error) and not is_transient(carried(_raised(error)))


def test_train_failure_advice_fits_the_cause():
    """`--resume` only when a rerun can get past the error (orchestrator/train/launch.py)."""
    from ray.exceptions import ActorDiedError

    from orchestrator.train.launch import _failure

    def message(cause: BaseException) -> str:
        outer = RuntimeError("Training failed due to worker errors")
        outer.worker_failures = {0: cause}  # Ray Train's WorkerGroupError carries them so
        return str(_failure(outer, label="kd", storage="/s", name="kd"))

    deterministic = message(carried(_raised(Nasty("bad config", cause=1))))
    assert f"{__name__}.Nasty: bad config" in deterministic and "--resume" not in deterministic
    assert "fails the same way" in deterministic
    diverged = _failure(DivergedError("loss is nan; lower train.lr"), label="kd", storage="/s",
                        name="kd")
    assert type(diverged) is DivergedError and "--resume" not in str(diverged)
    for transient in (carried(_raised(ConnectionResetError("peer reset"))), ActorDiedError()):
        text = message(transient)
        assert "--resume" in text and "Checkpoints are kept under /s/kd" in text
    assert "ConnectionResetError: peer reset" in message(carried(_raised(ConnectionResetError(
        "peer reset"))))


def test_debug_prints_the_worker_s_traceback(capsys):
    from orchestrator.driver.cli import _print_worker_traceback

    remote = carried(_raised(Nasty("bad config", cause=1)))
    try:
        raise RaydistillError(f"training failed: {remote}") from remote
    except RaydistillError as e:
        _print_worker_traceback(e)
    err = capsys.readouterr().err
    assert "the Ray worker's traceback:" in err and 'raise error' in err and "Nasty: bad config" in err


def test_remote_cause_finds_the_worker_error_inside_ray_s_wrappers(ray_session):
    """A real Ray task: the driver gets RayTaskError(RemoteError); the cause is the RemoteError."""
    import ray
    from ray import cloudpickle

    @ray.remote(num_cpus=0)
    def task():
        with remote_errors("task"):
            raise LockHolder("the worker's error")

    module = sys.modules[__name__]  # workers cannot import this test module: send it by value
    cloudpickle.register_pickle_by_value(module)
    try:
        with pytest.raises(RaydistillError) as info:
            ray.get(task.remote())
    finally:
        cloudpickle.unregister_pickle_by_value(module)
    cause = remote_cause(info.value)
    assert type(cause) is RemoteError and str(cause).endswith("LockHolder: the worker's error")


# --------------------------------------------------------------------------- real Ray workers

def _nasty_env(tmp_path: Path, where: str) -> dict:
    (tmp_path / "nasty_fault.py").write_text(NASTY_MODULE)
    path = os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {"RAYDISTILL_TEST_FAULT": f"{where}=nasty_fault:fail", "PYTHONPATH": path}


def _cli(args: list[str], env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    """The real CLI in its own process and its own local Ray (whose workers inherit `env`)."""
    full = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | env
    return subprocess.run([sys.executable, "-m", "orchestrator.driver.cli", *args], env=full, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _assert_one_clear_message(done: subprocess.CompletedProcess, *expected: str) -> None:
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("raydistill: error:")]
    assert len(lines) == 1, done.stderr[-3000:]
    for text in (NASTY_TEXT, *expected):
        assert text in lines[0], lines[0]
    assert "--resume" not in lines[0] and "rerun the same command to resume" not in lines[0]
    assert "Traceback" not in done.stderr and "TypeError" not in done.stderr
    assert "missing 1 required keyword-only argument" not in done.stdout + done.stderr


def test_a_teacher_engine_that_fails_to_start_is_named(tmp_path, tiny_teacher, dataset,
                                                       ray_session):
    """A real teacher actor (runtime_env carries the hook) whose start raises Nasty."""
    from actors.pool import TeacherPool
    from orchestrator.shards.plan import plan_captures

    cfg = capture_config(tmp_path, tiny_teacher, dataset)
    spec = plan_captures(cfg)[0].engine_spec()
    pool = TeacherPool(spec, num_actors=1, num_cpus=0.5, num_gpus=0, log=lambda m: None,
                       runtime_env={"env_vars": _nasty_env(tmp_path, "teacher.start")})
    try:
        with pytest.raises(RaydistillError) as info:
            pool.wait_ready()
    finally:
        pool.shutdown()
    text = str(info.value)
    assert text.startswith("a teacher actor failed to start: " + NASTY_TEXT)
    assert "a rerun alone fails the same way" in text and "--resume" not in text


@pytest.mark.slow
def test_a_teacher_actor_s_error_reaches_the_cli_intact(tmp_path, tiny_teacher, dataset):
    """`raydistill capture`: every unit's task raises Nasty inside the real teacher actor."""
    cfg = tmp_path / "capture.yaml"
    cfg.write_text(json.dumps({
        "teacher": {"model": tiny_teacher, "backend": "hf", "k": 8, "num_cpus": 0.5},
        "data": {"path": dataset, "max_length": 128, "eval_fraction": 0},
        "capture": {"samples_per_shard": 50, "max_unit_failures": 2},
        "train": {"baselines": []}, "output_dir": str(tmp_path / "out")}))
    done = _cli(["capture", str(cfg)], _nasty_env(tmp_path, "teacher.process"))
    _assert_one_clear_message(done, "failed 2 times; last error:",
                              "a rerun alone fails the same way")


@pytest.mark.slow
def test_a_train_worker_s_error_reaches_the_cli_intact(captured, tmp_path):
    """`raydistill train`: the real Ray Train worker raises Nasty as it starts."""
    cfg = _config_file(tmp_path, captured, train={"baselines": [], "max_failures": 0})
    done = _cli(["train", str(cfg)], _nasty_env(tmp_path, "train"))
    _assert_one_clear_message(done, "training of the kd student failed: ",
                              "fails the same way")


@pytest.mark.slow
def test_an_on_policy_scorer_that_fails_to_start_is_named(captured, tmp_path):
    """`raydistill train` with on-policy samples: the teacher actor that scores them raises Nasty
    as it starts (in the background: the student trains meanwhile). The student's first
    on-policy step fails, and the error the user gets is the start's, not the step's."""
    cfg = _config_file(tmp_path, captured,
                       train={"baselines": [], "max_failures": 0, "on_policy": 0.5},
                       on_policy={"backend": "hf", "start_step": 2, "max_new_tokens": 8,
                                  "prompt_tokens": 8, "rollout_cpus": 0.25,
                                  "teacher_cpus": 0.25})
    done = _cli(["train", str(cfg)], _nasty_env(tmp_path, "teacher.start"))
    _assert_one_clear_message(done, "a teacher actor failed to start: ",
                              "a rerun alone fails the same way")


@pytest.mark.slow
def test_a_tune_trial_s_error_reaches_the_cli_intact(captured, tmp_path):
    """`raydistill tune`: both trials raise Nasty in their Tune actors; the sweep fails with the
    first cause and never suggests serving."""
    cfg = _config_file(tmp_path, captured, train={"baselines": [], "max_failures": 0},
                       tune={"space": {"train.lr": {"grid": [0.002, 0.003]}},
                             "scheduler": "fifo", "max_concurrent_trials": 1})
    done = _cli(["tune", str(cfg)], _nasty_env(tmp_path, "trial"))
    _assert_one_clear_message(done, "all 2 trials of the sweep failed; the first, ")
    assert "serve them" not in done.stdout + done.stderr
    out = " ".join((done.stdout + done.stderr).split())  # the console wraps long lines
    assert out.count(f"failed: {NASTY_TEXT}") == 2  # each trial's line names the cause


def _config_file(tmp_path: Path, captured: dict, **sections) -> Path:
    """A YAML (JSON) config over the shared capture: nothing is recaptured."""
    body = {
        "teacher": {"model": captured["model"], "backend": "hf", "k": 8, "num_cpus": 0.5,
                    "max_new_tokens": 16},
        "data": {"path": captured["data"], "max_length": 128, "eval_fraction": 0.1},
        "capture": {"samples_per_shard": 8},
        "student": {"preset": "nano"},
        "train": {"max_steps": 4, "eval_every": 2, "log_every": 2, "batch_size": 4,
                  "num_workers": 1, "eval_samples": 16, "bc_prompt_tokens": 8},
        "output_dir": captured["out"]}
    for name, values in sections.items():
        body[name] = body.get(name, {}) | values
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(body))
    return path


@pytest.fixture
def dataset(tmp_path, texts):
    return write_jsonl(tmp_path / "data.jsonl", [{"id": f"t{i}", "text": t}
                                                  for i, t in enumerate(texts[:40])])
