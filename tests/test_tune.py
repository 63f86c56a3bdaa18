"""Search spaces (loading, validation before any trial) and real Ray Tune sweeps over one capture:
no recapture, the leaderboard / Pareto plot / winners, the placement groups of stopped trials
released, Optuna, and an interrupted sweep resumed."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import capture_folder, train_config
from orchestrator.errors import ConfigError

PNG = b"\x89PNG\r\n\x1a\n"
SIZES = {"grid": [{"preset": "nano"}, {"preset": "micro"}]}


# --------------------------------------------------------------------------- spaces (no Ray)

def test_shipped_spaces_load_and_every_combination_is_a_valid_config(tiny_teacher, tmp_path):
    from orchestrator.driver.sweeps import check_space as _check_space
    from tune_spaces import available, load_space

    assert {"default", "sizes", "temperature", "loss", "onpolicy"} <= set(available())
    cfg = train_config(tmp_path, tiny_teacher, str(tmp_path / "d.jsonl"))
    for name in available():
        space = load_space(name)
        assert space.axes and space.grid_size() >= 1
        _check_space(cfg, space)  # raises on any invalid combination
    assert load_space("default").grid_size() == 8
    assert load_space("temperature").to_tune()["train.temperature"] == {
        "grid_search": [1.0, 2.0, 4.0]}


def test_a_space_from_a_file_an_include_and_an_inline_mapping(tmp_path):
    from tune_spaces import load_space

    f = tmp_path / "mine.yaml"
    f.write_text("include: [temperature]\nparams:\n  train.lr: {loguniform: [0.001, 0.01]}\n")
    space = load_space(str(f))
    assert {a.key for a in space.axes} == {"train.temperature", "train.lr"}
    assert space.grid_size() == 3 and len(space.corners()) == 6
    inline = load_space({"train.alpha": {"uniform": [0.2, 0.8]}, "student": SIZES})
    assert inline.name == "inline" and inline.grid_size() == 2


@pytest.mark.parametrize("spec, message", [
    ("nope", "neither a space in tune_spaces/ .*default.*nor a YAML file"),
    ({"train.max_steps": {"grid": [1, 2]}}, "train.max_steps' cannot vary between trials; "
                                            "searchable keys: .*train.temperature"),
    ({"train.temperature": [1, 2]}, "must be one distribution, e.g. {grid: \\[1, 2\\]}"),
    ({"train.temperature": {"normal": [1, 2]}}, "kinds: grid, choice, uniform"),
    ({"train.lr": {"loguniform": [0, 0.1]}}, "loguniform needs low > 0"),
    ({"train.alpha": {"uniform": [0.9, 0.1]}}, "needs \\[low, high\\] numbers with low < high"),
    ({"student": {"grid": [{"width": 3}]}}, "every student value must map student fields"),
    ({"train.loss": {"grid": []}}, "needs a non-empty list"),
])
def test_malformed_spaces_are_refused_with_the_fix(spec, message):
    from tune_spaces import load_space

    with pytest.raises(ConfigError, match=message):
        load_space(spec)


def test_invalid_combinations_are_rejected_before_any_trial_starts(tiny_teacher, tmp_path):
    from orchestrator.driver import pipeline

    space = {"student.hidden": {"grid": [128, 192]}, "student.heads": {"grid": [2, 5]},
             "train.temperature": {"uniform": [0.0, 2.0]}}
    cfg = train_config(tmp_path, tiny_teacher, str(tmp_path / "d.jsonl"),
                       **{"tune.space": json.dumps(space)})
    with pytest.raises(ConfigError) as info:
        pipeline.tune(cfg)  # before Ray, before any capture
    text = str(info.value)
    assert "6 of 8 combinations are invalid" in text
    assert "student.heads (5) must divide student.hidden (128)" in text
    assert "train.temperature must be > 0" in text
    assert not (tmp_path / "sweeps").exists()


def test_tune_settings_are_validated(tiny_teacher, tmp_path):
    for key, value, message in (("tune.metric", "loss", "must be a held-out metric"),
                                ("tune.search", "hyperopt", "must be one of basic | optuna"),
                                ("tune.reduction_factor", 1, "must be > 1"),
                                ("tune.top", 0, "must be at least 1")):
        with pytest.raises(ConfigError, match=message):
            train_config(tmp_path, tiny_teacher, "d.jsonl", **{key: value})


# ------------------------------------------------- names, status lines, the Pareto plot (no Ray)

def _base_spec(teacher: str = "teacher"):
    from orchestrator.kd.losses import LossSpec
    from orchestrator.shapes import resolve_shape
    from orchestrator.train.specs import (DataSpec, EvalSpec, OptimSpec, RunSpec, StudentSpec,
                                          TrainSpec)

    return TrainSpec(
        student=StudentSpec(teacher_model=teacher, shape=resolve_shape(preset="nano"),
                            init_from_teacher=False),
        data=DataSpec(shards_uri="s", units=[], streaming=False, expect={}),
        loss=LossSpec(kind="fkl", temperature=1.0, alpha=0.5, beta=0.5, tail="bucket"),
        optim=OptimSpec(lr=1e-3, warmup_steps=0, batch_size=4, grad_accum=1, max_steps=12,
                        seed=0),
        eval=EvalSpec(every=6, heldout_uri=None, samples=16),
        run=RunSpec(log_every=6))


def _trial(tag: str, config: dict, *, status: str = "PENDING", result: dict | None = None):
    """A real Tune Trial as the controller holds it (a stub: no trainable looked up)."""
    from ray.tune.experiment import Trial

    from tune_spaces.sweep import trial_name

    trial = Trial("_trial", stub=True, config=config, experiment_tag=tag,
                  trial_id=f"af281_{int(tag.split('_')[0]):05d}",
                  trial_name_creator=lambda t: trial_name(t, base=_base_spec(),
                                                          student={"preset": "nano"}))
    trial.status = status
    if result is not None:
        trial.update_last_result(result)
    return trial


def test_a_trial_has_one_readable_name_from_tunes_counter():
    """Tune's own id (`af281_00003`) never shows: the trial's name is its counter, size, loss
    and temperature, for a grid trial and a searcher's alike."""
    grid = _trial("3_student=preset=micro,train.temperature=2.0",
                  {"student": {"preset": "micro"}, "train.temperature": 2.0})
    searched = _trial("12_train.lr=0.001", {"train.lr": 0.001, "train.loss": "jsd"})
    assert str(grid) == "t03-2x128-fkl-T2" and str(searched) == "t12-1x128-jsd-T1"
    bad = _trial("4_student.heads=5", {"student.heads": 5})  # heads must divide hidden
    assert str(bad) == "t04"


def test_a_trials_params_change_only_the_specs_they_belong_to():
    """Every field a space may vary (spaces.STUDENT_KEYS, TRAIN_KEYS) lands on its own small
    spec; the sweep's data, evaluation and run settings are the base run's."""
    from dataclasses import replace

    from orchestrator.shapes import resolve_shape
    from tune_spaces.spaces import TRAIN_KEYS
    from tune_spaces.sweep import spec_for

    base = _base_spec()
    params = {"student": {"preset": "micro"}, "student.init_from_teacher": True,
              "train.loss": "jsd", "train.temperature": 2.0, "train.alpha": 0.9,
              "train.beta": 0.3, "train.tail": "renormalize", "train.lr": 5e-4,
              "train.warmup_steps": 3, "train.batch_size": 2, "train.grad_accum": 4,
              "train.seed": 11, "train.on_policy": 0.0}
    assert {k.removeprefix("train.") for k in params if k.startswith("train.")} == \
        set(TRAIN_KEYS)
    spec = spec_for(base, student={"preset": "nano"}, params=params)
    assert spec.student == replace(base.student, shape=resolve_shape(preset="micro"),
                                   init_from_teacher=True)
    assert (spec.loss.kind, spec.loss.temperature, spec.loss.alpha, spec.loss.beta,
            spec.loss.tail) == ("jsd", 2.0, 0.9, 0.3, "renormalize")
    assert (spec.optim.lr, spec.optim.warmup_steps, spec.optim.batch_size,
            spec.optim.grad_accum, spec.optim.seed, spec.optim.max_steps) == (5e-4, 3, 2, 4, 11, 12)
    assert (spec.data, spec.eval, spec.run) == (base.data, base.eval, base.run)
    assert spec_for(base, student={"preset": "nano"}, params={}) == base
    assert spec.on_policy is None  # a share of 0: offline only


def test_a_trials_on_policy_params_set_its_share_divergence_and_rollouts():
    """train.on_policy, on_policy.loss / beta / temperature / max_new_tokens / sync_every: a
    trial's on-policy spec is the sweep's (its actors) with them; a share of 0 drops it; the
    trial's name says its share and divergence."""
    from dataclasses import replace

    from orchestrator.kd.losses import LossSpec
    from orchestrator.train.specs import OnPolicySpec
    from tune_spaces.spaces import ON_POLICY_KEYS
    from tune_spaces.sweep import spec_for, trial_label

    template = OnPolicySpec(share=1.0, loss=LossSpec("rkl", 1.0, 1.0, 0.5, "renormalize"),
                            rollout_actors=("a",), teacher_actors=("t",))
    base = replace(_base_spec(), on_policy=template)
    params = {"train.on_policy": 0.5, "on_policy.loss": "jsd", "on_policy.beta": 0.2,
              "on_policy.temperature": 0.7, "on_policy.max_new_tokens": 9,
              "on_policy.sync_every": 2}
    assert {k.removeprefix("on_policy.") for k in params if "." in k and
            k.startswith("on_policy.")} == set(ON_POLICY_KEYS)
    spec = spec_for(base, student={"preset": "nano"}, params=params)
    o = spec.on_policy
    assert (o.share, o.loss.kind, o.loss.beta, o.temperature, o.max_new_tokens, o.sync_every) == \
        (0.5, "jsd", 0.2, 0.7, 9, 2)
    assert o.rollout_actors == ("a",) and spec.loss == base.loss  # the offline loss untouched
    assert trial_label(3, spec) == "t03-1x128-fkl-T1-op0.5jsd"
    assert spec_for(base, student={"preset": "nano"},
                    params={"train.on_policy": 0.0}).on_policy is None


def test_the_sweep_status_line_counts_trials_and_names_the_best_so_far():
    from tune_spaces.sweep_lines import sweep_status

    trials = [
        _trial("0_a", {}, status="TERMINATED", result={"step": 12, "eval_kl": 0.5, "wall_s": 9}),
        _trial("1_b", {"train.temperature": 2.0}, status="TERMINATED",
               result={"step": 6, "eval_kl": 0.4}),  # stopped early: never reached wall_s
        _trial("2_c", {"student": {"preset": "micro"}}, status="RUNNING",
               result={"step": 6, "eval_kl": 0.7}),
        _trial("3_d", {}, status="ERROR", result={"step": 6, "eval_kl": 0.1}),
        _trial("4_e", {}),
    ]
    line = sweep_status(trials, metric="eval_kl", mode="min", elapsed=750)
    assert line == ("sweep: 3/5 trials done (1 finished, 1 stopped early, 1 failed), 1 running, "
                    "1 pending · best so far t01-1x128-fkl-T2 eval_kl 0.4000 at step 6 · 12m30s")
    assert "best so far t02" in sweep_status(trials, metric="eval_kl", mode="max", elapsed=1)
    # Tune creates trials as it goes: the planned ones not created yet are pending
    assert sweep_status(trials[:2], metric="eval_kl", mode="min", elapsed=1, total=4).startswith(
        "sweep: 2/4 trials done (1 finished, 1 stopped early, 0 failed), 0 running, 2 pending")


def _row(name: str, status: str, *, metric=None, params_m=None, latency=None, step=12,
         pareto=False, error=None) -> dict:
    return {"id": name, "status": status, "metric": metric, "params_m": params_m,
            "latency_ms_per_token": latency, "step": step, "pareto": pareto, "error": error}


def test_the_pareto_plot_shows_every_trial_with_its_status_and_axes_in_words():
    from tune_spaces.leaderboard import pareto_figure

    rows = [_row("t00-1x128-fkl-T1", "finished", metric=0.40, params_m=0.6, latency=2.0,
                 pareto=True),
            _row("t01-2x128-fkl-T1", "finished", metric=0.45, params_m=0.9, latency=3.0),
            _row("t02-1x128-fkl-T2", "stopped", metric=0.70, params_m=0.6, step=6),
            _row("t03-2x128-fkl-T2", "stopped", metric=0.80, params_m=0.9, step=6),
            _row("t04-2x256-fkl-T4", "error", error="diverged")]
    fig = pareto_figure(rows, metric="eval_kl")
    size, latency = fig.axes
    assert size.get_ylabel() == "held-out KL(teacher ‖ student), nats/token"
    assert size.get_xlabel() == "parameters (millions)"
    assert latency.get_xlabel().startswith("latency (ms/token")
    assert sum(len(c.get_offsets()) for c in size.collections) == 4  # stopped ones included
    assert sum(len(c.get_offsets()) for c in latency.collections) == 2  # only they have latency
    legend = [t.get_text() for t in size.get_legend().get_texts()]
    assert sorted(legend) == ["Pareto front", "finished", "stopped early (last evaluation)"]
    notes = " ".join(t.get_text() for t in [*fig.texts, *size.texts])
    assert "5 trials: 2 finished, 2 stopped early, 1 failed — failed: t04-2x256-fkl-T4" in notes
    assert "t02-1x128-fkl-T2 (step 6)" in notes


def test_a_students_size_is_counted_from_its_shape_alone(tiny_teacher):
    from transformers import AutoConfig

    from orchestrator.kd.student import build_student
    from orchestrator.shapes import resolve_shape
    from tune_spaces.leaderboard import shape_params

    shape = resolve_shape(preset="nano")
    model, info = build_student(AutoConfig.from_pretrained(tiny_teacher), shape)
    assert shape_params(tiny_teacher, vars(shape)) == model.num_parameters() == info.parameters


# --------------------------------------------------------------------------- sweeps (Ray)

def _capture_files(out: str) -> dict:
    """Every file of the main and held-out captures with its modification time."""
    files = {}
    for kind in ("main", "heldout"):
        root = capture_folder(out, kind)
        for p in [root / "manifest.json", *sorted((root / "shards").glob("*"))]:
            files[str(p)] = p.stat().st_mtime_ns
    return files


@pytest.mark.slow
def test_a_sweep_reuses_the_capture_and_writes_leaderboard_plot_and_winners(captured,
                                                                             ray_session, capsys,
                                                                             monkeypatch):
    import ray
    from transformers import AutoModelForCausalLM

    from orchestrator.driver import pipeline
    from orchestrator.winners import find_models

    before = _capture_files(captured["out"])
    monkeypatch.setenv("RAYDISTILL_PROGRESS_INTERVAL", "2")
    cfg = train_config(captured["out"], captured["model"], captured["data"], **{
        "tune.space": json.dumps({"student": SIZES, "train.temperature": {"grid": [1.0, 2.0]}}),
        "tune.max_concurrent_trials": 1, "tune.latency_tokens": 4, "tune.top": 2})
    sweep_dir = Path(pipeline.tune(cfg))
    assert _capture_files(captured["out"]) == before  # capture once: nothing rewritten

    rows = list(csv.DictReader(open(sweep_dir / "leaderboard.csv")))
    assert len(rows) == 4 and [r["rank"] for r in rows] == ["1", "2", "3", "4"]
    finished = [r for r in rows if r["status"] == "finished"]
    assert len(finished) >= 2  # ASHA may stop the others after step 6
    assert {r["status"] for r in rows} <= {"finished", "stopped"}
    kls = [float(r["eval_kl"]) for r in finished]
    assert kls == sorted(kls)  # ranked by the metric
    for r in finished:
        assert r["step"] == "12" and float(r["latency_ms_per_token"]) > 0
        assert float(r["params_m"]) > 0 and Path(r["model_dir"], "model.safetensors").exists()
    for r in rows:
        if r["status"] == "stopped":  # no model, but its size counted from its shape
            assert r["step"] == "6" and r["model_dir"] == "" and float(r["params_m"]) > 0
    # one name per trial: progress lines, Tune's folder, the Train run, the leaderboard
    out = "".join(capsys.readouterr())
    assert not re.search(r"\b[0-9a-f]{5}_\d{5}\b", out)  # Tune's trial ids never show
    assert re.search(r"sweep: [0-3]/4 trials done \(\d finished, \d stopped early, 0 failed\), "
                     r"1 running, \d pending · ", out)  # the sweep's status every interval
    for r in rows:
        assert f"  {r['id']} " in out and (sweep_dir / r["id"] / "params.json").exists()
        assert (sweep_dir / "trials" / r["id"]).is_dir()
        if r["status"] == "finished":
            assert r["model_dir"] == str(sweep_dir / "trials" / r["id"] / "model")
    assert (sweep_dir / "pareto.png").read_bytes()[:8] == PNG
    md = (sweep_dir / "leaderboard.md").read_text()
    assert all(r["id"] in md for r in rows) and "teacher NLL" in md

    winners = find_models(str(sweep_dir))
    assert 1 <= len(winners) <= 2
    assert winners[0].id == finished[0]["id"]  # the best is always on the Pareto front
    model = AutoModelForCausalLM.from_pretrained(winners[0].path, use_safetensors=True)
    assert model.config.num_hidden_layers in (1, 2)
    assert find_models(captured["out"])[0].path == winners[0].path  # newest sweep of output_dir

    # trials Tune stopped gave their Train workers' CPUs back
    deadline = time.time() + 20
    while ray.available_resources().get("CPU", 0) < 2.0 - 1e-6 and time.time() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == pytest.approx(2.0)


@pytest.mark.slow
def test_an_optuna_sweep(captured, ray_session):
    from orchestrator.driver import pipeline

    cfg = train_config(captured["out"], captured["model"], captured["data"], **{
        "tune.space": json.dumps({"train.lr": {"loguniform": [0.001, 0.01]}}),
        "tune.search": "optuna", "tune.num_samples": 2, "tune.scheduler": "fifo",
        "tune.max_concurrent_trials": 1, "tune.metric": "eval_top1", "tune.winners": "top",
        "tune.top": 1, "train.max_steps": 6, "train.eval_every": 3, "tune.latency_tokens": 2})
    sweep_dir = Path(pipeline.tune(cfg))
    rows = list(csv.DictReader(open(sweep_dir / "leaderboard.csv")))
    assert [r["status"] for r in rows] == ["finished", "finished"]
    lrs = {float(r["lr"]) for r in rows}
    assert len(lrs) == 2 and all(0.001 <= lr <= 0.01 for lr in lrs)
    top1 = [float(r["eval_top1"]) for r in rows]
    assert top1 == sorted(top1, reverse=True)  # eval_top1: higher is better
    winners = json.loads((sweep_dir / "winners.json").read_text())
    assert winners["mode"] == "max" and len(winners["models"]) == 1


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_an_interrupted_sweep_resumes_without_redoing_finished_trials(sig, captured, ray_session,
                                                                      tmp_path):
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(json.dumps({
        "teacher": {"model": captured["model"], "backend": "hf", "k": 8, "num_cpus": 0.5,
                    "max_new_tokens": 16},
        "data": {"path": captured["data"], "max_length": 128, "eval_fraction": 0.1},
        "capture": {"samples_per_shard": 8},
        "train": {"max_steps": 8, "eval_every": 4, "log_every": 4, "batch_size": 4,
                  "baselines": [], "eval_samples": 16, "bc_prompt_tokens": 8},
        "tune": {"space": {"train.temperature": {"grid": [1.0, 2.0]}},
                 "scheduler": "fifo", "max_concurrent_trials": 1, "latency_tokens": 2},
        "output_dir": captured["out"]}))
    env = dict(os.environ, RAY_ADDRESS=ray_session.address_info["address"])
    exe = [sys.executable, "-m", "orchestrator.driver.cli"]
    sweeps = Path(captured["out"]) / "sweeps"
    sweeps.mkdir(exist_ok=True)
    before = set(os.listdir(sweeps))
    proc = subprocess.Popen([*exe, "tune", str(cfg)], env=env, stderr=subprocess.PIPE, text=True)
    first = None
    deadline = time.time() + 240
    while first is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        for name in set(os.listdir(sweeps)) - before:
            done = list((sweeps / name / "trials").glob("*/done.json"))
            if done:
                first, sweep = done[0], name
    assert first is not None, "no trial finished"
    proc.send_signal(sig)  # Ctrl-C, or the driver killed outright (its trials die with it)
    _, err = proc.communicate(timeout=120)
    if sig == signal.SIGINT:
        assert proc.returncode == 2, err
        assert f"--resume {sweep}" in err
    else:
        assert proc.returncode == -signal.SIGKILL
    stamp = first.stat().st_mtime_ns
    done = subprocess.run([*exe, "tune", str(cfg), "--resume", sweep], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(open(sweeps / sweep / "leaderboard.csv")))
    assert sorted(r["status"] for r in rows) == ["finished"] * 2, done.stderr
    assert sorted(float(r["temperature"]) for r in rows) == [1.0, 2.0]
    assert first.stat().st_mtime_ns == stamp  # the finished trial was not trained again


@pytest.mark.slow
def test_a_crashing_trial_is_reported_and_the_sweep_continues(captured, ray_session, capsys):
    """An lr of 1e30 makes the student's loss non-finite at its second step: that trial fails
    (training stops before the NaN is checkpointed), the other one finishes and wins."""
    from orchestrator.driver import pipeline

    cfg = train_config(captured["out"], captured["model"], captured["data"], **{
        "tune.space": json.dumps({"train.lr": {"grid": [1e30, 0.002]}}),
        "tune.scheduler": "fifo", "tune.max_concurrent_trials": 1, "tune.top": 2,
        "tune.latency_tokens": 2, "train.max_steps": 6, "train.eval_every": 3,
        "train.max_failures": 0})
    sweep_dir = Path(pipeline.tune(cfg))
    out = "".join(capsys.readouterr())
    rows = {float(r["lr"]): r for r in csv.DictReader(open(sweep_dir / "leaderboard.csv"))}
    assert rows[0.002]["status"] == "finished" and rows[0.002]["rank"] == "1"
    assert rows[1e30]["status"] == "error" and rows[1e30]["model_dir"] == ""
    assert "diverged" in rows[1e30]["error"] and "lower train.lr" in rows[1e30]["error"].lower()
    assert "failed" in out and "diverged" in out and "--resume" not in rows[1e30]["error"]
    winners = json.loads((sweep_dir / "winners.json").read_text())["models"]
    assert [w["id"] for w in winners] == [rows[0.002]["id"]]  # a failed trial never wins
    flat = " ".join(out.split())  # the console wraps long lines
    assert f"1 of 2 trials failed; the first, {rows[1e30]['id']}: " in flat
    assert "serve them with `raydistill serve" in flat


@pytest.mark.slow
def test_a_sweep_whose_trials_all_failed_fails_naming_the_first_cause(captured, ray_session,
                                                                      capsys):
    """Every trial diverges (lr 1e30): `tune` is an error naming the first trial's cause, the
    leaderboard still lists them, and serving is never suggested."""
    from orchestrator.driver import pipeline
    from orchestrator.errors import DivergedError, RaydistillError

    cfg = train_config(captured["out"], captured["model"], captured["data"], **{
        "tune.space": json.dumps({"train.lr": {"grid": [1e30, 2e30]}}),
        "tune.scheduler": "fifo", "tune.max_concurrent_trials": 1, "train.max_steps": 4,
        "train.eval_every": 2, "train.max_failures": 0})
    with pytest.raises(RaydistillError) as info:
        pipeline.tune(cfg)
    text = str(info.value)
    assert not isinstance(info.value, DivergedError)
    assert text.startswith("all 2 trials of the sweep failed; the first, t00-")
    assert "diverged" in text
    assert "lower train.lr" in text.lower() and "--resume" not in text
    sweep_dir = Path(text.rsplit("(leaderboard: ", 1)[1].rstrip(")"))
    rows = list(csv.DictReader(open(sweep_dir / "leaderboard.csv")))
    assert [r["status"] for r in rows] == ["error", "error"]
    out = " ".join("".join(capsys.readouterr()).split())
    assert "serve them" not in out and "raydistill serve" not in out


@pytest.mark.slow
def test_an_on_policy_sweep_ranks_offline_and_on_policy_trials(captured, ray_session):
    """A space over train.on_policy and on_policy.loss: the sweep starts the rollout and scoring
    actors once (transformers rollouts here), the on-policy trials train on the student's own
    samples (their histories have the on-policy figures), the offline one on the shards only,
    and all are ranked in one leaderboard."""
    from orchestrator.driver import pipeline
    from orchestrator.train.launch import load_done

    cfg = train_config(captured["out"], captured["model"], captured["data"], **{
        "tune.space": json.dumps({"train.on_policy": {"grid": [0.0, 1.0]},
                                  "on_policy.loss": {"grid": ["rkl"]}}),
        "tune.max_concurrent_trials": 1, "tune.latency_tokens": 4, "tune.scheduler": "fifo",
        "on_policy.backend": "hf", "on_policy.max_new_tokens": 8, "on_policy.prompt_tokens": 8,
        "on_policy.rollout_cpus": 0.25, "on_policy.teacher_cpus": 0.25})
    sweep_dir = Path(pipeline.tune(cfg))
    rows = list(csv.DictReader(open(sweep_dir / "leaderboard.csv")))
    assert sorted(r["id"] for r in rows) == ["t00-1x128-fkl-T1", "t01-1x128-fkl-T1-op1rkl"]
    assert all(r["status"] == "finished" and r["step"] == "12" for r in rows)
    for r in rows:
        history = load_done(str(sweep_dir / "trials" / r["id"]))["history"]
        on = [h for h in history if "onpolicy_samples_per_s" in h]
        assert bool(on) == r["id"].endswith("op1rkl"), r["id"]
        if on:
            assert on[-1]["onpolicy_kd"] > 0 and on[-1]["kd"] == 0.0


def test_an_on_policy_sweep_over_student_shapes_is_refused_before_any_trial(tiny_teacher,
                                                                            tmp_path):
    """The sweep's rollout actors are built for one student architecture: a space that varies
    the student while its trials learn from their own samples is refused, naming the way out;
    the same space with trials that end before on_policy.start_step is fine (offline trials)."""
    from orchestrator.driver.sweeps import check_space
    from tune_spaces import load_space

    space = load_space({"student": SIZES})
    cfg = train_config(tmp_path, tiny_teacher, str(tmp_path / "d.jsonl"),
                       **{"train.on_policy": 0.5, "tune.max_steps": 10})
    with pytest.raises(ConfigError, match="varies student and its trials learn from their own "
                                          "samples.*sweep the student with train.on_policy 0"):
        check_space(cfg, space)
    check_space(train_config(tmp_path, tiny_teacher, str(tmp_path / "d.jsonl"), **{
        "train.on_policy": 0.5, "tune.max_steps": 10, "on_policy.start_step": 10}), space)
    check_space(cfg, load_space("onpolicy"))  # one student, on-policy settings varied


def test_a_sweep_counts_the_rollout_actors_its_space_may_need(tiny_teacher, tmp_path):
    """A config with train.on_policy 0 whose space draws λ > 0 starts rollout actors: the CPU
    check counts them (the largest share drawn), and a space whose trials end before
    on_policy.start_step needs none."""
    from orchestrator.driver.sweeps import sweep_share
    from tune_spaces import load_space

    data = str(tmp_path / "d.jsonl")
    offline = train_config(tmp_path, tiny_teacher, data, **{"tune.max_steps": 10})
    assert sweep_share(offline, load_space("onpolicy")) == 1.0  # λ ∈ {0.5, 1}
    assert sweep_share(offline, load_space({"train.on_policy": {"grid": [0, 0.25]}})) == 0.25
    assert sweep_share(offline, load_space({"train.alpha": {"grid": [0.5, 1.0]}})) == 0.0
    late = train_config(tmp_path, tiny_teacher, data,
                        **{"tune.max_steps": 10, "on_policy.start_step": 10})
    assert sweep_share(late, load_space("onpolicy")) == 0.0
