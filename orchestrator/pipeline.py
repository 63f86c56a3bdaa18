"""The driver: the one place that holds the whole config, calls `ray.init` and starts actors.

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
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import replace

from orchestrator.capture_plan import CaptureKind, CapturePlan, heldout_config, plan_captures
from orchestrator.capture_run import Teachers
from orchestrator.config import Config
from orchestrator.errors import ConfigError, RaydistillError
from orchestrator.manifest import Manifest, filesystem
from orchestrator.preflight import check_resources, check_shards, warn_if_not_smaller
from orchestrator.progress import TrainProgress, progress_interval, quiet_third_party, say
from orchestrator.program import command_name

EXPERIMENTS_DIR = "experiments"
SWEEPS_DIR = "sweeps"


def capture(cfg: Config, *, fresh: bool = False, repair: bool = False) -> Manifest:
    """Capture soft labels for every record of `cfg.data` into `cfg.output_dir`, resumably — and
    the held-out split (evaluation) and behaviour-cloning samples the students will need."""
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
        with _interruptible(experiment):
            results = _train_students(cfg, plans, experiment, board=None, streaming=False,
                                      only=("kd", *cfg.train.baselines))
        return _report(cfg, plans, experiment, results)
    finally:
        _stop_ray(started_ray)


def run(cfg: Config, *, fresh: bool = False, resume: str | None = None) -> str:
    """Capture and train together: the KD student consumes shards as the teachers publish them."""
    import ray

    from orchestrator.board import ShardBoard

    experiment = _experiment(cfg, resume)
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
        with _interruptible(experiment), Teachers() as teachers:
            for plan in held:
                teachers.capture(plan)
            streaming = bool(main.todo)
            if not streaming:
                teachers.capture(main)  # says it is complete; nothing to stream
            # the capture thread then goes on to the baselines' captures while the KD student
            # still trains, so the teacher's CPUs are never idle
            work = [main] if streaming else []
            work += [p for p in later if p.todo]
            worker = _CaptureThread(teachers, work, board) if work else None
            try:
                kd = _train_students(cfg, [main, *held], experiment, board=board,
                                     streaming=streaming, only=("kd",))
            finally:
                if worker is not None:
                    worker.finish()
            snap = ray.get(board.snapshot.remote())
        if streaming:
            say(f"streaming: the capture paused {snap['capture_paused_s']:.0f}s waiting for the "
                "students (backpressure)")
        with _interruptible(experiment):
            results = kd | _train_students(cfg, plans, experiment, board=None, streaming=False,
                                           only=tuple(cfg.train.baselines))
        return _report(cfg, plans, experiment, results,
                       streaming={"streamed": streaming, **snap})
    finally:
        _stop_ray(started_ray)


def tune(cfg: Config, *, resume: str | None = None, fresh: bool = False) -> str:
    """Sweep students over `cfg.tune.space` on one capture (`fresh`: delete this config's
    captures and capture again first); returns the sweep directory."""
    from tune_spaces import load_space
    from tune_spaces.leaderboard import build_rows, measure, shape_params, write_leaderboard
    from tune_spaces.sweep import run_sweep

    if "://" in cfg.output_dir:
        raise ConfigError(f"tune needs a local (or shared-filesystem) output_dir, got "
                          f"{cfg.output_dir}; sweeps on object storage are not supported yet")
    space = load_space(cfg.tune.space)
    _check_space(cfg, space)
    sweep = resume or _new_name("sweep")
    sweep_dir = os.path.join(cfg.output_dir, SWEEPS_DIR, sweep)
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
        _capture_once(plans)
        settings = _sweep_settings(cfg)
        check_resources(replace(cfg, train=replace(cfg.train, num_workers=settings.num_workers)),
                         teachers=False, extra=cfg.tune.trial_cpus)
        base = _loop_spec(cfg, plan=plans[0], held=held, alpha=cfg.train.alpha, board=None,
                          streaming=False, label="kd")
        steps, every = _trial_steps(cfg)
        base = replace(base, max_steps=steps, eval_every=every,
                       eval_samples=cfg.tune.eval_samples or cfg.train.eval_samples)
        student = {k: getattr(cfg.student, k) for k in
                   ("preset", "layers", "hidden", "heads", "intermediate", "init_from_teacher")}
        os.makedirs(sweep_dir, exist_ok=True)
        _save_config(cfg, os.path.join(sweep_dir, "config.yaml"))
        say(f"sweep {sweep}: {space.describe()} — {space.grid_size() * cfg.tune.num_samples} "
            f"trial(s) × up to {base.max_steps} steps, ranked by {settings.metric} "
            f"({cfg.tune.scheduler}, {cfg.tune.search})")
        outcomes = run_sweep(base, space=space, student=student, sweep_dir=sweep_dir,
                             settings=settings, resume=resume is not None)
        measured = {}
        for o in outcomes:
            if o.status == "finished":
                measured[o.label] = measure(o.model_dir, tokens=cfg.tune.latency_tokens)
            elif o.settings:  # no model exported: its size from its shape
                measured[o.label] = {"params": shape_params(cfg.teacher.model, o.settings)}
        rows = build_rows(outcomes, metric=settings.metric, mode=settings.mode, measured=measured)
        paths = write_leaderboard(sweep_dir, rows, metric=settings.metric, mode=settings.mode,
                                  winners=cfg.tune.winners, top=cfg.tune.top,
                                  title=f"sweep {sweep} ({space.name})")
        for r in rows:
            say(_describe_row(r, settings.metric))
        say(f"leaderboard: {paths['md']} (+ leaderboard.csv), Pareto plot: {paths['png']}")
        _sweep_verdict(outcomes, winner_ids=paths["winner_ids"], sweep_dir=sweep_dir)
        return sweep_dir
    finally:
        _stop_ray(started_ray)


def _sweep_verdict(outcomes: list, *, winner_ids: list[str], sweep_dir: str) -> None:
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


def _capture_once(plans: list[CapturePlan]) -> None:
    """Capture only what is missing; every trial reads the same shards."""
    todo = [p for p in plans if p.todo]
    if todo:
        with Teachers() as teachers:
            for plan in todo:
                teachers.capture(plan)
    else:
        m = plans[0].manifest
        say(f"reusing the capture in {plans[0].cfg.output_dir} ({len(m.shards)} shards, "
            f"{sum(s.rows for s in m.shards.values())} samples): no teacher started")
    for plan in plans:
        check_shards(plan, verify_all=True)


def _trial_steps(cfg: Config) -> tuple[int, int]:
    """(steps per trial, steps between its evaluations)."""
    steps = cfg.tune.max_steps or cfg.train.max_steps
    return steps, min(cfg.tune.eval_every or cfg.train.eval_every, steps)


def _sweep_settings(cfg: Config):
    from tune_spaces.sweep import SweepSettings, metric_mode

    tu, tr = cfg.tune, cfg.train
    if tr.num_workers == 0:
        say("tune: trials run their students on 1 Ray Train worker (train.num_workers 0, "
            "in-process mode, cannot report to Tune)")
    return SweepSettings(
        metric=tu.metric, mode=metric_mode(tu.metric), num_samples=tu.num_samples,
        max_concurrent_trials=tu.max_concurrent_trials, scheduler=tu.scheduler,
        grace_period=tu.grace_period or _trial_steps(cfg)[1],
        reduction_factor=tu.reduction_factor, search=tu.search, trial_cpus=tu.trial_cpus,
        max_failures=tu.max_failures, num_workers=max(1, tr.num_workers), use_gpu=tr.use_gpu,
        cpus_per_worker=tr.cpus_per_worker, train_max_failures=tr.max_failures)


def _check_space(cfg: Config, space) -> None:
    """Every combination a trial can draw must be a valid config — before any trial starts."""
    from orchestrator.config import validate
    from tune_spaces.spaces import split_params

    bad = []
    corners = space.corners()
    for params in corners:
        s_fields, t_fields = split_params(params)
        trial = replace(cfg, student=replace(cfg.student, **s_fields),
                        train=replace(cfg.train, **t_fields))
        try:
            validate(trial)
        except ConfigError as e:
            bad.append(f"{_short_params(params)}: {e}")
    if bad:
        listed = "\n  ".join(bad[:5]) + (f"\n  … and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ConfigError(f"search space {space.name}: {len(bad)} of {len(corners)} combinations "
                          f"are invalid; fix or remove them from the space:\n  {listed}")


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


def _save_config(cfg: Config, path: str) -> None:
    """The resolved config beside the sweep (its serve: section is what `raydistill serve` uses)."""
    from dataclasses import asdict

    import yaml

    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(asdict(cfg), f, sort_keys=False)
    os.replace(tmp, path)


def _new_name(prefix: str) -> str:
    from orchestrator.training import experiment_name

    return experiment_name(prefix)


def publish(cfg: Config, run_dirs: str | list[str], *, prompt: str, top: int | None = None,
            max_tokens: int = 48) -> None:
    """Serve the best `top` (default serve.top) students of `run_dirs` (an experiment and a
    sweep, say) ranked together by held-out NLL, ask the best one `prompt` (streamed, greedy)
    through the official openai client, then stop the server."""
    from orchestrator.winners import models_of, why_served
    from serve.app import start, stop
    from serve.client import query

    dirs = [run_dirs] if isinstance(run_dirs, str) else list(run_dirs)
    found, dirs, notes = models_of(dirs)
    models = found[:top or cfg.serve.top]
    settings = replace(cfg.serve, port=_port_or_free(cfg.serve.host, cfg.serve.port))
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


def _port_or_free(host: str, port: int) -> int:
    """`port` if it is free, else one the OS picks (the demo must not fail on a busy 8000)."""
    import socket

    with socket.socket() as s:
        try:
            s.bind((host, port))
            return port
        except OSError:
            s.bind((host, 0))
            say(f"port {port} is busy; serving on {s.getsockname()[1]} instead")
            return s.getsockname()[1]


class _CaptureThread:
    """Captures running beside the KD student's training (in the driver): the streamed main
    capture, paused by the board, then the baselines' captures."""

    def __init__(self, teachers: Teachers, plans: list[CapturePlan], board):
        import ray

        self.error: BaseException | None = None
        self.stop = threading.Event()

        def may_submit(waited: float) -> bool:
            if self.stop.is_set():
                raise RaydistillError("stopped: training ended before the capture")
            return ray.get(board.may_capture.remote(waited))

        def body() -> None:
            try:
                for plan in plans:  # the streamed capture (if any) first, under backpressure
                    if self.stop.is_set():
                        return
                    streamed = plan.kind is CaptureKind.MAIN
                    teachers.capture(plan, may_submit=may_submit if streamed else None,
                                     quiet=True, on_published=(lambda n: board.publish.remote(n))
                                     if streamed else None)
            except BaseException as e:  # noqa: BLE001 — handed to the main thread in finish()
                self.error = e
                board.capture_failed.remote(str(e) or type(e).__name__)

        self.thread = threading.Thread(target=body, name="capture", daemon=True)
        self.thread.start()

    def finish(self) -> None:
        """Wait for the capture (training is done or failed); re-raise its error."""
        import sys

        if sys.exc_info()[0] is not None:  # training failed: stop sending work
            self.stop.set()
        self.thread.join()
        if self.error is not None and not self.stop.is_set():
            raise self.error


def _train_students(cfg: Config, plans: list[CapturePlan], experiment: str, *, board,
                    streaming: bool, only: tuple[str, ...] = ("kd", "hard", "bc")) -> dict:
    """Train the KD student and/or the baselines (same budget, seed, student); label → result."""
    import ray

    from orchestrator.student import resolve_shape
    from orchestrator.training import fit_student

    t, s, tr = cfg.teacher, cfg.student, cfg.train
    by_kind = {p.kind: p for p in plans}
    main = by_kind[CaptureKind.MAIN]
    held = by_kind.get(CaptureKind.HELDOUT)
    bc = by_kind.get(CaptureKind.BC, main if t.mode == "sample" else None)
    shape = resolve_shape(preset=s.preset, layers=s.layers, hidden=s.hidden, heads=s.heads,
                          intermediate=s.intermediate)
    warn_if_not_smaller(t.model, shape)
    runs = {"kd": (main, tr.alpha), "hard": (main, 0.0), "bc": (bc, 0.0)}
    storage = f"{cfg.output_dir.rstrip('/')}/{EXPERIMENTS_DIR}/{experiment}"
    if board is None:
        from orchestrator.board import ShardBoard

        board = ray.remote(ShardBoard).options(num_cpus=0).remote(max_ahead=1)
    specs = {}
    for label in only:
        plan, alpha = runs[label]
        if label == "hard" and t.mode == "sample":
            say("[yellow]skipping the hard-label baseline[/]: a sample-mode capture holds no "
                "dataset text (its KD student already learns from teacher samples)")
            continue
        if plan is None:
            continue
        specs[label] = _loop_spec(cfg, plan=plan, held=held, alpha=alpha, board=board,
                                  streaming=streaming and label == "kd", label=label)
        what = {"kd": f"KD student ({tr.loss}, T={tr.temperature}, alpha={tr.alpha})",
                "hard": "hard-label baseline", "bc": "behaviour-cloning baseline"}[label]
        say(f"training the {what}: {shape.layers}×{shape.hidden}, {tr.max_steps} steps × "
            f"{tr.batch_size * tr.grad_accum} sequences on {max(tr.num_workers, 1)} worker(s)")
    if not specs:
        return {}

    def fit(label: str):
        result = fit_student(specs[label], storage=storage, name=label,
                             num_workers=tr.num_workers, use_gpu=tr.use_gpu,
                             cpus_per_worker=tr.cpus_per_worker, max_failures=tr.max_failures)
        board.train_done.remote(label)
        return result

    streamed = [sp for sp in specs.values() if sp.streaming]
    capture_total = main.manifest.total_units if streamed else None
    parallel = _students_at_once(cfg, len(specs))
    if parallel > 1:
        threads = max(1, int(tr.cpus_per_worker))
        specs = {label: replace(sp, torch_threads=threads) for label, sp in specs.items()}
    results = {}
    with TrainProgress(list(specs), total=tr.max_steps, board=board, capture_total=capture_total):
        if parallel > 1:  # independent students share the cluster: train them side by side
            from concurrent.futures import ThreadPoolExecutor

            pool = ThreadPoolExecutor(parallel)
            try:
                futures = {label: pool.submit(fit, label) for label in specs}
                results = {label: f.result() for label, f in futures.items()}
            finally:  # on Ctrl-C do not wait for the other fits: ray.shutdown ends them
                pool.shutdown(wait=False, cancel_futures=True)
        else:
            results = {label: fit(label) for label in specs}
    for r in results.values():
        say(_describe_result(r))
    return results


def _loop_spec(cfg: Config, *, plan: CapturePlan, held: CapturePlan | None, alpha: float, board,
               streaming: bool, label: str):
    """The plain values one student run needs (no config object crosses into workers)."""
    from orchestrator.student import resolve_shape
    from orchestrator.train_loop import LoopSpec

    t, s, tr = cfg.teacher, cfg.student, cfg.train
    shape = resolve_shape(preset=s.preset, layers=s.layers, hidden=s.hidden, heads=s.heads,
                          intermediate=s.intermediate)
    return LoopSpec(
        teacher_model=t.model, shape=vars(shape), init_from_teacher=s.init_from_teacher,
        shards_uri=plan.cfg.output_dir, units=list(range(plan.manifest.total_units)),
        streaming=streaming, heldout_uri=held.cfg.output_dir if held else None,
        eval_samples=tr.eval_samples,
        expect=plan.expect(), heldout_expect=held.expect() if held else None,
        loss=tr.loss, temperature=tr.temperature, alpha=alpha, beta=tr.beta, tail=tr.tail,
        lr=tr.lr, warmup_steps=tr.warmup_steps, batch_size=tr.batch_size,
        grad_accum=tr.grad_accum, max_steps=tr.max_steps, eval_every=tr.eval_every,
        log_every=tr.log_every, seed=tr.seed, reader_cpus=tr.reader_cpus,
        hard_labels_from_prompt=False, board=board, label=label)


def _students_at_once(cfg: Config, n: int) -> int:
    """How many students fit on the cluster side by side (each: its workers + a reader)."""
    import ray

    tr = cfg.train
    if tr.use_gpu or n <= 1 or tr.students_at_once <= 1:
        return 1
    per = max(tr.num_workers, 1) * tr.cpus_per_worker + tr.reader_cpus
    have = ray.cluster_resources().get("CPU", 0.0)  # available() lags just-killed actors
    return max(1, min(n, tr.students_at_once, int(have // per)))


def _describe_result(r) -> str:
    f = r.final
    if "eval_student_nll" not in f:
        return f"{r.label}: done in {r.wall_s:.0f}s → {r.model_dir}"
    return (f"{r.label}: held-out {f['eval_student_nll']:.3f} nats/token (teacher "
            f"{f['eval_teacher_nll']:.3f}), KL {f['eval_kl']:.3f}, top-1 {f['eval_top1']:.1%}, "
            f"{r.wall_s:.0f}s → {r.model_dir}")


def _report(cfg: Config, plans: list[CapturePlan], experiment: str, results: dict,
            streaming: dict | None = None) -> str:
    from orchestrator.report import headline, write_report
    from orchestrator.verdict import repeated_in_plans

    out = f"{cfg.output_dir.rstrip('/')}/{EXPERIMENTS_DIR}/{experiment}"
    settings = _settings(cfg, plans) | {"experiment": experiment}
    if streaming is not None:
        settings["streaming"] = {k: streaming[k] for k in ("streamed", "capture_paused_s")}
    path, report = write_report(out, results=results, settings=settings,
                                repeated=repeated_in_plans(plans))
    say(f"report: {path} (report.json, plots/*.png beside it)")
    for line in headline(report):
        say(line)
    return path


def _settings(cfg: Config, plans: list[CapturePlan]) -> dict:
    from dataclasses import asdict

    return {"teacher": cfg.teacher.model, "k": cfg.teacher.k, "mode": cfg.teacher.mode,
            "student": asdict(cfg.student), "train": asdict(cfg.train),
            "captures": {p.label: {"dir": p.cfg.output_dir, "shards": len(p.manifest.shards),
                                   "rows": sum(s.rows for s in p.manifest.shards.values()),
                                   "tokens": sum(s.tokens for s in p.manifest.shards.values())}
                         for p in plans}}


class _interruptible:
    """Ctrl-C during training: checkpoints are kept; say how to continue."""

    def __init__(self, experiment: str):
        self.experiment = experiment

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is KeyboardInterrupt:
            raise RaydistillError(
                f"interrupted: experiment {self.experiment}'s checkpoints and finished shards are "
                f"kept; continue with the same command plus --resume {self.experiment}") from None
        return False


def _experiment(cfg: Config, resume: str | None) -> str:
    """A new unique experiment name, or the one to resume (it must exist)."""
    from orchestrator.manifest import exists
    from orchestrator.train_loop import batch_layout
    from orchestrator.training import check_experiment_layout, experiment_name

    if resume is None:
        return experiment_name("exp")
    fs, root = filesystem(cfg.output_dir)
    if not exists(fs, f"{root}/{EXPERIMENTS_DIR}/{resume}"):
        raise ConfigError(f"--resume {resume}: no experiment of that name in "
                          f"{cfg.output_dir}/{EXPERIMENTS_DIR}; omit --resume to start a new one")
    check_experiment_layout(fs, f"{root}/{EXPERIMENTS_DIR}/{resume}",
                            batch_layout(batch_size=cfg.train.batch_size,
                                         grad_accum=cfg.train.grad_accum,
                                         num_workers=cfg.train.num_workers, seed=cfg.train.seed))
    return resume


def _init_ray() -> bool:
    from orchestrator.cluster import connect

    progress_interval()  # a bad RAYDISTILL_PROGRESS_INTERVAL fails here, before any compute
    quiet_third_party()
    return connect()


def _stop_ray(started: bool) -> None:
    from orchestrator.cluster import disconnect

    disconnect(started)
