"""The recipes: the one place that holds the whole config, calls `ray.init` and starts actors.

Each recipe reads top to bottom:
- `capture`: validate → plan the captures (main, held-out, behaviour-cloning samples) → start
  teachers → capture → record.                                   `raydistill capture CONFIG`
- `train`: check the captures are complete and genuine → train the KD student and the baselines
  on Ray Train → evaluate → report.                              `raydistill train CONFIG`
- `run`: plan → capture the held-out split → stream: teachers capture while the KD student trains
  on the shards already published (backpressure both ways) → baselines → report.
                                                                  `raydistill run CONFIG`
- `tune`: validate the space → capture once (only what is missing) → one Ray Tune trial per point
  of the space on the same shards (ASHA on the held-out metric) → latency of the finished
  students → leaderboard, Pareto plot, winners.                  `raydistill tune CONFIG`
- `publish`: serve a run's winners (Ray Serve, OpenAI routes), ask the best one a prompt through
  the openai client, stop.                     (the demo; `raydistill serve RUN_DIR` stays up)

The steps live in small driver modules named for what they do: `capture_run` (teachers),
`streaming` (the capture thread of `run`), `students` (the KD student and baselines on Ray Train),
`experiments` (name, resume, report), `sweeps` (what `tune` needs around `tune_spaces`), `serving`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace

from orchestrator.config import Config
from orchestrator.console import progress_interval, quiet_third_party, say
from orchestrator.driver.capture_run import Teachers
from orchestrator.driver.experiments import experiment as _experiment
from orchestrator.driver.experiments import interruptible, report
from orchestrator.driver.preflight import check_resources, check_shards, check_student
from orchestrator.driver.streaming import CaptureThread
from orchestrator.driver.specs import train_spec
from orchestrator.driver.students import train_students
from orchestrator.driver.sweeps import (capture_once, check_space, leaderboard, save_config,
                                        sweep_on_policy, sweep_settings, sweep_share, sweep_verdict,
                                        trial_steps)
from orchestrator.errors import ConfigError
from orchestrator.names import SWEEPS_DIR, run_name, sweep_dir as _sweep_dir
from orchestrator.program import command_name
from orchestrator.shards.manifest import Manifest
from orchestrator.shards.plan import CaptureKind, heldout_config, plan_captures


def capture(cfg: Config, *, fresh: bool = False, repair: bool = False) -> Manifest:
    """Capture soft labels for every record of `cfg.data` into `cfg.output_dir`, resumably — and
    the held-out split (evaluation) and behaviour-cloning samples the students will need."""
    check_student(cfg)  # a pretrained student that cannot learn from this teacher: before any work
    plans = plan_captures(cfg, fresh=fresh, repair=repair, command="capture")
    started_ray = _init_ray()
    try:
        with Teachers() as teachers:
            for plan in plans:
                teachers.capture(plan)
    finally:
        _stop_ray(started_ray)
    return plans[0].manifest


def train(cfg: Config, *, resume: str | None = None) -> str:
    """Train the KD student and the baselines on complete captures; returns the report's path."""
    experiment = _experiment(cfg, resume)  # a bad --resume is refused before any other work
    check_student(cfg)
    plans = plan_captures(cfg, command="train")
    for plan in plans:
        if plan.todo:
            m = plan.manifest
            raise ConfigError(
                f"the {'' if plan.kind is CaptureKind.MAIN else plan.label + ' '}capture in "
                f"{plan.cfg.output_dir} is incomplete "
                f"({len(m.shards)}/{m.total_units} shards); run `{command_name()} capture CONFIG` "
                f"first, or `{command_name()} run CONFIG` to capture and train together")
        check_shards(plan, verify_all=True)
    started_ray = _init_ray()
    try:
        check_resources(cfg, teachers=False)
        with interruptible(experiment):
            results = train_students(cfg, plans, experiment, board=None, streaming=False,
                                     only=("kd", *cfg.train.baselines))
        return report(cfg, plans, experiment, results)
    finally:
        _stop_ray(started_ray)


def run(cfg: Config, *, fresh: bool = False, resume: str | None = None) -> str:
    """Capture and train together: the KD student consumes shards as the teachers publish them."""
    import ray

    from orchestrator.train.board import ShardBoard

    experiment = _experiment(cfg, resume)
    check_student(cfg)
    plans = plan_captures(cfg, fresh=fresh, command="run")
    main, held = plans[0], [p for p in plans if p.kind is CaptureKind.HELDOUT]
    later = [p for p in plans if p.kind is CaptureKind.BC]
    for plan in plans:
        if plan.manifest.shards:
            check_shards(plan, verify_all=False)
    started_ray = _init_ray()
    try:
        check_resources(cfg, teachers=bool(main.todo))
        max_ahead = max(cfg.train.max_shards_ahead, 2 * max(1, cfg.train.num_workers))
        board = ray.remote(ShardBoard).options(num_cpus=0).remote(max_ahead=max_ahead)
        board.publish.remote(len(main.manifest.shards))
        with interruptible(experiment), Teachers() as teachers:
            for plan in held:
                teachers.capture(plan)
            streaming = bool(main.todo)
            if not streaming:
                teachers.capture(main)  # says it is complete; nothing to stream
            # the capture thread then goes on to the baselines' captures while the KD student
            # still trains, so the teacher's CPUs are never idle
            work = [main] if streaming else []
            work += [p for p in later if p.todo]
            worker = CaptureThread(teachers, work, board) if work else None
            try:
                kd = train_students(cfg, [main, *held], experiment, board=board,
                                    streaming=streaming, only=("kd",),
                                    beside_teachers=worker is not None)
            finally:
                if worker is not None:
                    worker.finish()
            snap = ray.get(board.snapshot.remote())
        if streaming:
            say(f"streaming: the capture paused {snap['capture_paused_s']:.0f}s waiting for the "
                "students (backpressure)")
        with interruptible(experiment):
            results = kd | train_students(cfg, plans, experiment, board=None, streaming=False,
                                          only=tuple(cfg.train.baselines))
        return report(cfg, plans, experiment, results, streaming={"streamed": streaming, **snap})
    finally:
        _stop_ray(started_ray)


def tune(cfg: Config, *, resume: str | None = None, fresh: bool = False) -> str:
    """Sweep students over `cfg.tune.space` on one capture (`fresh`: delete the captures in
    output_dir and capture again first); returns the sweep directory."""
    from tune_spaces import load_space
    from tune_spaces.spaces import STUDENT_KEYS
    from tune_spaces.sweep import run_sweep

    if "://" in cfg.output_dir:
        raise ConfigError(f"tune needs a local (or shared-filesystem) output_dir, got "
                          f"{cfg.output_dir}; sweeps on object storage are not supported yet")
    space = load_space(cfg.tune.space)
    check_space(cfg, space)
    sweep = resume or run_name("sweep")
    sweep_dir = _sweep_dir(cfg.output_dir, sweep)
    if resume and not os.path.isdir(sweep_dir):
        raise ConfigError(f"--resume {resume}: no sweep of that name in "
                          f"{cfg.output_dir}/{SWEEPS_DIR}; omit --resume to start a new one")
    capture_cfg = replace(cfg, train=replace(cfg.train, baselines=[]))  # KD students only
    if heldout_config(capture_cfg) is None:  # refused before any capture is opened
        raise ConfigError("tune ranks students on held-out metrics: set data.eval_path, or "
                          "data.eval_fraction > 0")
    plans = plan_captures(capture_cfg, fresh=fresh, command="tune")
    held = next(p for p in plans if p.kind is CaptureKind.HELDOUT)
    started_ray = _init_ray()
    try:
        capture_once(capture_cfg, plans)
        settings = sweep_settings(cfg)
        check_resources(replace(cfg, train=replace(  # the rollout actors the space may need
            cfg.train, num_workers=settings.num_workers, on_policy=sweep_share(cfg, space))),
            teachers=False, extra=cfg.tune.trial_cpus)
        base = train_spec(cfg, plan=plans[0], held=held, alpha=cfg.train.alpha, board=None,
                          streaming=False, label="kd")
        steps, every = trial_steps(cfg)
        base = replace(base, optim=replace(base.optim, max_steps=steps), eval=replace(
            base.eval, every=every, samples=cfg.tune.eval_samples or cfg.train.eval_samples))
        student = {k: getattr(cfg.student, k) for k in STUDENT_KEYS}
        os.makedirs(sweep_dir, exist_ok=True)
        save_config(cfg, os.path.join(sweep_dir, "config.yaml"))
        say(f"sweep {sweep}: {space.describe()} — {space.grid_size() * cfg.tune.num_samples} "
            f"trial(s) × up to {base.optim.max_steps} steps, ranked by {settings.metric} "
            f"({cfg.tune.scheduler}, {cfg.tune.search})")
        with sweep_on_policy(cfg, space, plans[0], sweep_dir=sweep_dir) as actors:
            if actors is not None:  # shared by the trials (each sends its own weights)
                base = replace(base, on_policy=actors.spec())
            outcomes = run_sweep(base, space=space, student=student, sweep_dir=sweep_dir,
                                 settings=settings, resume=resume is not None)
        paths = leaderboard(cfg, outcomes, settings=settings, sweep_dir=sweep_dir,
                            title=f"sweep {sweep} ({space.name})")
        sweep_verdict(outcomes, winner_ids=paths["winner_ids"], sweep_dir=sweep_dir)
        return sweep_dir
    finally:
        _stop_ray(started_ray)


def publish(cfg: Config, run_dirs: str | list[str], *, prompt: str, top: int | None = None,
            max_tokens: int = 48) -> None:
    """Serve the best `top` (default serve.top) students of `run_dirs` (an experiment and a
    sweep, say) ranked together by held-out NLL, ask the best one `prompt` (streamed, greedy)
    through the official openai client, then stop the server."""
    from orchestrator.driver.serving import port_or_free
    from orchestrator.winners import models_of, why_served
    from serve.app import start, stop
    from serve.client import query

    dirs = [run_dirs] if isinstance(run_dirs, str) else list(run_dirs)
    found, dirs, notes = models_of(dirs)
    models = found[:top or cfg.serve.top]
    settings = replace(cfg.serve, port=port_or_free(cfg.serve.host, cfg.serve.port))
    started_ray = _init_ray()
    serve_log = logging.getLogger("ray.serve")
    serve_log.disabled = True  # Serve's INFO lines in this process: the demo prints its own
    try:
        url = start(models, settings)
        try:
            say(f"serving {', '.join(m.id for m in models)} at {url}/v1 (OpenAI-compatible)")
            for line in why_served(models, found=found, dirs=dirs) + notes:
                say(line)
            say(f"[bold]prompt[/] ({models[0].id}): {prompt!r}")
            query(prompt, url=url, model=models[0].id, max_tokens=max_tokens, temperature=0.0,
                  stream=True, api_key=os.environ.get(cfg.serve.api_key_env))
        finally:
            stop()
    finally:
        serve_log.disabled = False
        _stop_ray(started_ray)


def _init_ray() -> bool:
    from orchestrator.driver.cluster import connect

    progress_interval()  # a bad RAYDISTILL_PROGRESS_INTERVAL fails here, before any compute
    quiet_third_party()
    return connect()


def _stop_ray(started: bool) -> None:
    from orchestrator.driver.cluster import disconnect

    disconnect(started)
