"""What `tune` needs around `tune_spaces.run_sweep` (driver-internal): the space checked against
the config, the capture made once, the sweep's settings from the config, the leaderboard of the
finished trials and the sweep's last lines."""

from __future__ import annotations

from dataclasses import asdict, replace

from orchestrator.config import Config
from orchestrator.console import say
from orchestrator.driver.capture_run import Teachers
from orchestrator.driver.preflight import check_shards
from orchestrator.errors import ConfigError, RaydistillError
from orchestrator.program import command_name
from orchestrator.shards.plan import CapturePlan
from orchestrator.storage import write_atomic_local


def check_space(cfg: Config, space) -> None:
    """Every combination a trial can draw must be a valid config — before any trial starts."""
    from orchestrator.config import validate
    from orchestrator.driver.preflight import check_student
    from tune_spaces.spaces import on_policy_params, split_params, trial_student

    _check_on_policy_space(cfg, space)
    bad, models = [], {}
    corners = space.corners()
    for params in corners:
        s_fields, t_fields = split_params(params)
        student = trial_student(asdict(cfg.student), s_fields)
        trial = replace(cfg, student=replace(cfg.student, **student),
                        train=replace(cfg.train, **t_fields),
                        on_policy=replace(cfg.on_policy, **on_policy_params(params)))
        try:
            validate(trial)
        except ConfigError as e:
            bad.append(f"{_short_params(params)}: {e}")
        if trial.student.model:  # each pretrained student: its tokenizer, once
            models.setdefault((trial.student.model, trial.student.revision), trial)
    for (model, _), trial in models.items():
        try:
            check_student(trial)
        except ConfigError as e:
            bad.append(f"student.model={model}: {e}")
    if bad:
        listed = "\n  ".join(bad[:5]) + (f"\n  … and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ConfigError(f"search space {space.name}: {len(bad)} of {len(corners)} combinations "
                          f"are invalid; fix or remove them from the space:\n  {listed}")


def _shares(cfg: Config, space) -> list[float]:
    """The on-policy shares the trials of `space` can draw."""
    axis = next((a for a in space.axes if a.key == "train.on_policy"), None)
    return [float(x) for x in ([cfg.train.on_policy] if axis is None else axis.values)]


def _on_policy_trials(cfg: Config, space) -> bool:
    """Whether any trial of `space` learns from its own samples (a share > 0 that starts within
    the trial's steps)."""
    return (any(x > 0 for x in _shares(cfg, space))
            and cfg.on_policy.start_step < trial_steps(cfg)[0])


def sweep_share(cfg: Config, space) -> float:
    """The largest on-policy share a trial of `space` uses (0 when none learns on-policy): what
    the sweep's rollout actors are started for, and what its CPU check counts."""
    return max(_shares(cfg, space)) if _on_policy_trials(cfg, space) else 0.0


def _check_on_policy_space(cfg: Config, space) -> None:
    """On-policy trials share the sweep's rollout actors, whose engines are built for one student
    architecture: a space that varies the student cannot use them."""
    varied = [a.key for a in space.axes if a.key == "student" or a.key.startswith("student.")]
    if varied and _on_policy_trials(cfg, space):
        raise ConfigError(
            f"search space {space.name} varies {', '.join(varied)} and its trials learn from "
            "their own samples (train.on_policy > 0), but a sweep's rollout actors serve one "
            "student architecture; sweep the student with train.on_policy 0 (or "
            "on_policy.start_step ≥ the trials' steps), then sweep the on-policy settings for "
            "the chosen student")


def sweep_on_policy(cfg: Config, space, main: CapturePlan, *, sweep_dir: str):
    """The rollout and scoring actors every on-policy trial shares, when a trial can draw
    train.on_policy > 0 (a context that stops them), else a context of None."""
    from contextlib import nullcontext

    share = sweep_share(cfg, space)  # the template; each trial sets its own
    if not share:
        if any(x > 0 for x in _shares(cfg, space)):
            say(f"sweep: trials of {trial_steps(cfg)[0]} steps end before on_policy.start_step "
                f"{cfg.on_policy.start_step}: they train offline only (no rollout actors)")
        return nullcontext(None)
    from orchestrator.driver.onpolicy import OnPolicyActors

    return OnPolicyActors(replace(cfg, train=replace(cfg.train, on_policy=share)), main,
                          storage=sweep_dir, label="sweep")


def capture_once(cfg: Config, plans: list[CapturePlan]) -> None:
    """Capture only what is missing; every trial reads the same shards."""
    todo = [p for p in plans if p.todo]
    if todo:
        with Teachers() as teachers:
            for plan in todo:
                teachers.capture(plan)
    else:
        m = plans[0].manifest
        say(f"reusing the capture in {cfg.output_dir} ({len(m.shards)} shards, "
            f"{sum(s.rows for s in m.shards.values())} samples): no teacher started")
    for plan in plans:
        check_shards(plan, verify_all=True)


def trial_steps(cfg: Config) -> tuple[int, int]:
    """(steps per trial, steps between its evaluations)."""
    steps = cfg.tune.max_steps or cfg.train.max_steps
    return steps, min(cfg.tune.eval_every or cfg.train.eval_every, steps)


def sweep_settings(cfg: Config):
    """The `tune_spaces.SweepSettings` of `cfg.tune` and `cfg.train`."""
    from tune_spaces.sweep import SweepSettings, metric_mode

    tu, tr = cfg.tune, cfg.train
    if tr.num_workers == 0:
        say("tune: trials run their students on 1 Ray Train worker (train.num_workers 0, "
            "in-process mode, cannot report to Tune)")
    return SweepSettings(
        metric=tu.metric, mode=metric_mode(tu.metric), num_samples=tu.num_samples,
        max_concurrent_trials=tu.max_concurrent_trials, scheduler=tu.scheduler,
        grace_period=tu.grace_period or trial_steps(cfg)[1],
        reduction_factor=tu.reduction_factor, search=tu.search, trial_cpus=tu.trial_cpus,
        max_failures=tu.max_failures, num_workers=max(1, tr.num_workers), use_gpu=tr.use_gpu,
        cpus_per_worker=tr.cpus_per_worker, train_max_failures=tr.max_failures)


def save_config(cfg: Config, path: str) -> None:
    """The resolved config beside the sweep (its serve: section is what `raydistill serve` uses)."""
    import yaml

    write_atomic_local(path, yaml.safe_dump(asdict(cfg), sort_keys=False))


def leaderboard(cfg: Config, outcomes: list, *, settings, sweep_dir: str, title: str) -> dict:
    """Measure the finished students (parameters, latency), rank every trial, write the
    leaderboard (md, csv), the Pareto plot and winners.json, and print the ranking."""
    from tune_spaces.leaderboard import build_rows, measure, shape_params, write_leaderboard

    measured = {}
    for o in outcomes:
        if o.status == "finished":
            measured[o.label] = measure(o.model_dir, tokens=cfg.tune.latency_tokens)
        elif o.settings.get("model"):  # no model exported: a pretrained one's own count
            from transformers import AutoConfig

            from orchestrator.student_info import real_parameters

            measured[o.label] = {"params": real_parameters(AutoConfig.from_pretrained(
                o.settings["model"], local_files_only=True))}
        elif o.settings:  # no model exported: its size from its shape
            measured[o.label] = {"params": shape_params(cfg.teacher.model, o.settings)}
    rows = build_rows(outcomes, metric=settings.metric, mode=settings.mode, measured=measured)
    paths = write_leaderboard(sweep_dir, rows, metric=settings.metric, mode=settings.mode,
                              winners=cfg.tune.winners, top=cfg.tune.top, title=title)
    for r in rows:
        say(_describe_row(r, settings.metric))
    say(f"leaderboard: {paths['md']} (+ leaderboard.csv), Pareto plot: {paths['png']}")
    return paths


def sweep_verdict(outcomes: list, *, winner_ids: list[str], sweep_dir: str) -> None:
    """The sweep's last lines: a sweep whose every trial failed is an error naming the first
    cause (exit 2); some failures are counted; serving is suggested only when there are winners."""
    failed = [o for o in outcomes if o.status == "error"]
    first = f"the first, {failed[0].label}: {failed[0].error}" if failed else ""
    if failed and len(failed) == len(outcomes):
        raise RaydistillError(f"all {len(outcomes)} trials of the sweep failed; {first}. Fix the "
                              f"cause and start a new sweep (leaderboard: {sweep_dir})")
    if failed:
        say(f"[yellow]{len(failed)} of {len(outcomes)} trials failed[/]; {first}")
    if winner_ids:
        say(f"winners: {', '.join(winner_ids)} — serve them with `{command_name()} serve {sweep_dir}`")
    else:
        say("winners: none — no trial finished its training; nothing to serve")


def _short_params(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def _describe_row(r: dict, metric: str) -> str:
    value = r.get(metric)
    shown = f"{value:.4f}" if isinstance(value, float) else "–"
    extra = f", {r['params_m']:.2f}M params" if r["params_m"] is not None else ""
    if r["latency_ms_per_token"] is not None:
        extra += f", {r['latency_ms_per_token']:.2f} ms/token"
    mark = " [green]winner[/]" if r.get("winner") else ""
    status = r["status"] if r["status"] != "error" else f"[red]error[/]: {r['error']}"
    return f"  #{r['rank']} {r['id']}: {status} at step {r['step']}, {metric} {shown}{extra}{mark}"
