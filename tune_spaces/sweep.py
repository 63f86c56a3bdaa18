"""The Ray Tune sweep: one trial per point of a search space, each a Ray Train student run on the
same finished capture (capture once, sweep many).

Each trial is a Tune function trainable reserving `trial_cpus` that launches a `TorchTrainer`
(Train V2 cannot be passed to `Tuner` directly) whose workers reserve their own CPUs; only the
held-out evaluations are reported to Tune (every `train.eval_every` steps), so ASHA compares
trials on the metric at equal optimizer steps. A trial's Train run lives in
`<sweep>/trials/<name>/` under a fixed name, so a resumed sweep (`Tuner.restore`) continues an
unfinished trial from its last checkpoint instead of restarting it; a finished one is exported as
a Hugging Face directory `<sweep>/trials/<name>/model/`.

A trial has one name everywhere — its progress lines, Tune's trial folder `<sweep>/<name>/`, its
Train run, the leaderboard's `id` and the served model: `t03-2x256-jsd-T2` (`trial_label`).

Driven by `raydistill tune CONFIG` (orchestrator/driver/pipeline.py).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field, replace

from orchestrator import names
from orchestrator.errors import RaydistillError, remote_errors
from orchestrator.shapes import resolve_shape
from orchestrator.train.specs import TrainSpec
from tune_spaces.spaces import Space, on_policy_params, split_params, trial_student
from tune_spaces.sweep_lines import error_text, sweep_lines

TRIALS_DIR = "trials"


@dataclass(frozen=True)
class SweepSettings:
    """Plain values the sweep needs (from the config's tune and train sections)."""

    metric: str = "eval_kl"
    mode: str = "min"
    num_samples: int = 1
    max_concurrent_trials: int = 0
    scheduler: str = "asha"
    grace_period: int = 100
    reduction_factor: float = 2.0
    search: str = "basic"
    trial_cpus: float = 0.1
    max_failures: int = 0
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 0.5
    train_max_failures: int = 2


@dataclass
class TrialOutcome:
    trial_id: str
    label: str
    params: dict
    status: str
    """finished | stopped (early, by ASHA or the user) | error"""
    metrics: dict = field(default_factory=dict)
    """The last held-out evaluation (eval_*), its step, the run's throughput."""
    model_dir: str | None = None
    error: str | None = None
    settings: dict = field(default_factory=dict)
    """The trial's resolved student shape and KD settings (varied or not)."""


def metric_mode(metric: str) -> str:
    """Accuracy-like metrics are maximised, losses and divergences minimised."""
    return "max" if metric.endswith(("top1", "acc", "accuracy")) else "min"


_LOSS_FIELDS = {"loss": "kind", "temperature": "temperature", "alpha": "alpha", "beta": "beta",
                "tail": "tail"}
"""The train.<key>s a trial may vary that set its `LossSpec` (→ field); the others of
`spaces.TRAIN_KEYS` set its `OptimSpec` fields of the same names."""


def spec_for(base: TrainSpec, *, student: dict, params: dict) -> TrainSpec:
    """The base run's spec with one trial's params applied: the student (shape, init), the loss
    and the optimisation specs it varies; its data, evaluation and run stay the sweep's."""
    s_fields, t_fields = split_params(params)
    merged = trial_student(student, s_fields)
    init = bool(merged.pop("init_from_teacher", base.student.init_from_teacher))
    model, revision = merged.pop("model", "") or "", merged.pop("revision", None)
    share = t_fields.pop("on_policy", None)
    loss = {_LOSS_FIELDS[k]: v for k, v in t_fields.items() if k in _LOSS_FIELDS}
    optim = {k: v for k, v in t_fields.items() if k not in _LOSS_FIELDS}
    return replace(base, student=replace(base.student, shape=_shape(model, revision, merged),
                                         init_from_teacher=init, model=model,
                                         revision=revision),
                   loss=replace(base.loss, **loss), optim=replace(base.optim, **optim),
                   on_policy=_on_policy(base.on_policy, share, on_policy_params(params)))


def _on_policy(base, share: float | None, fields: dict):
    """A trial's on-policy spec: the sweep's (its actors, settings) with the trial's share λ and
    on_policy.<field>s; None when its share is 0 (offline only)."""
    if base is None:  # no actors: no trial draws a share > 0, or none reaches start_step
        return None
    share = base.share if share is None else share
    if share <= 0:
        return None
    loss = {_LOSS_FIELDS[k]: v for k, v in fields.items() if k in ("loss", "beta")}
    rest = {k: v for k, v in fields.items() if k not in ("loss", "beta")}
    return replace(base, share=share, loss=replace(base.loss, **loss), **rest)


def _shape(model: str, revision: str | None, fields: dict):
    """A pretrained student's own shape (its config), else the shape `fields` describe."""
    if not model:
        return resolve_shape(**fields)
    from transformers import AutoConfig

    from orchestrator.shapes import pretrained_shape

    return pretrained_shape(AutoConfig.from_pretrained(model, revision=revision,
                                                       local_files_only=True))


def trial_label(index: int, spec: TrainSpec) -> str:
    """A short, readable, unique id: `t03-2x256-jsd-T2` (also the served model's name)."""
    s, o = spec.student.shape, spec.on_policy
    return names.trial_label(index, layers=s.layers, hidden=s.hidden, loss=spec.loss.kind,
                             temperature=spec.loss.temperature,
                             on_policy=(o.share, o.loss.kind) if o is not None else None)


def trial_name(trial, *, base: TrainSpec, student: dict) -> str:
    """Tune's `trial_name_creator` and `trial_dirname_creator`: the trial's `trial_label`.
    The index is Tune's trial counter (the head of its experiment tag: `3_student=…`), unique in
    a sweep for the grid and for a searcher alike, unlike the trial id's tail."""
    head = str(trial.experiment_tag).split("_", 1)[0]
    index = int(head) if head.isdigit() else 0
    try:
        return trial_label(index, spec_for(base, student=student, params=trial.config))
    except Exception:  # noqa: BLE001 — a combination the trial itself will fail on, naming it
        return names.trial_label(index)


def _label_of(path: str) -> str:
    """A trial's name from its Tune folder (`t03-2x256-jsd-T2`, or `…_ab12` when Tune found the
    folder taken on a resume and added a suffix)."""
    return os.path.basename(path.rstrip("/")).split("_", 1)[0]


def concurrent_trials(settings: SweepSettings, *, reader_cpus: float) -> int:
    """How many trials the cluster holds at once (each: its driver, workers, one reader)."""
    import ray

    if settings.max_concurrent_trials:
        return settings.max_concurrent_trials
    res = ray.cluster_resources()
    if settings.use_gpu:
        return max(1, int(res.get("GPU", 0) // max(settings.num_workers, 1)))
    per = settings.trial_cpus + settings.num_workers * settings.cpus_per_worker + reader_cpus
    return max(1, int(res.get("CPU", 0) // per))


def run_sweep(base: TrainSpec, *, space: Space, student: dict, sweep_dir: str,
              settings: SweepSettings, resume: bool) -> list[TrialOutcome]:
    """Run (or resume) the sweep in `sweep_dir`; one outcome per trial, in trial order."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's tables: our own lines instead
    # Ctrl-C: Tune's own handler ends the run quietly and marks the interrupted trial finished,
    # indistinguishable from a complete sweep; as a KeyboardInterrupt it says how to resume
    # (Tune saves the experiment state as it goes and after every trial)
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    # a failed trial: our one line (`sweep_lines`) instead of Tune's logged traceback (kept in the
    # trial's error.txt)
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    from ray import tune

    from orchestrator.train.launch import worker_threads

    trials_dir = os.path.join(sweep_dir, TRIALS_DIR)
    concurrent = concurrent_trials(settings, reader_cpus=base.run.reader_cpus)
    # trials one at a time use the node's cores, unless on-policy actors generate beside them
    threads = worker_threads(alongside=2 if base.on_policy is not None else concurrent,
                             num_workers=settings.num_workers,
                             cpus_per_worker=settings.cpus_per_worker, use_gpu=settings.use_gpu)
    base = replace(base, run=replace(base.run, torch_threads=threads))
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=base, student=student, trials_dir=trials_dir,
                             settings=settings),
        {"GPU": 0, "CPU": settings.trial_cpus})
    if resume:
        if not tune.Tuner.can_restore(sweep_dir):
            raise RaydistillError(f"{sweep_dir} holds no Tune experiment to resume; start a new "
                                  "sweep without --resume")
        tuner = tune.Tuner.restore(sweep_dir, trainable=trainable, resume_unfinished=True)
    else:
        unitless = replace(base, data=replace(base.data, units=[]))
        namer = functools.partial(trial_name, base=unitless, student=student)
        tuner = _new_tuner(trainable, space=space, sweep_dir=sweep_dir, settings=settings,
                           max_steps=base.optim.max_steps, namer=namer, concurrent=concurrent)
    interrupted = RaydistillError(
        f"interrupted: the sweep's finished trials and checkpoints are kept; continue with "
        f"the same command plus --resume {os.path.basename(sweep_dir.rstrip('/'))}")
    import logging

    tune_log = logging.getLogger("ray.tune.tune")  # "Trials did not complete": ours says which
    level = tune_log.level
    tune_log.setLevel(logging.CRITICAL)
    try:
        grid = tuner.fit()
    except KeyboardInterrupt:
        raise interrupted from None
    finally:
        tune_log.setLevel(level)
    if grid.num_terminated + grid.num_errors < len(grid):  # Tune caught SIGUSR1
        raise interrupted
    return [_outcome(r, base=base, student=student, trials_dir=trials_dir) for r in grid]


def _new_tuner(trainable, *, space: Space, sweep_dir: str, settings: SweepSettings,
               max_steps: int, concurrent: int, namer):
    from ray import tune

    scheduler, search_alg, samples = None, None, settings.num_samples
    if settings.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(time_attr="step", max_t=max_steps,
                                  grace_period=settings.grace_period,
                                  reduction_factor=settings.reduction_factor)
    param_space = space.to_tune(grid=settings.search != "optuna")
    if settings.search == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError:
            raise RaydistillError("tune.search: optuna needs the optuna package; "
                                  "pip install 'raydistill[optuna]' or use tune.search: basic") \
                from None
        search_alg = OptunaSearch(seed=0)
        samples = settings.num_samples * space.grid_size()  # grid axes are sampled, not enumerated
    parent, name = os.path.split(sweep_dir.rstrip("/"))
    lines = sweep_lines(settings.metric, settings.mode, total=settings.num_samples * space.grid_size())
    return tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(metric=settings.metric, mode=settings.mode,
                                    scheduler=scheduler, search_alg=search_alg,
                                    num_samples=samples, max_concurrent_trials=concurrent,
                                    trial_name_creator=namer, trial_dirname_creator=namer),
        run_config=tune.RunConfig(name=name, storage_path=parent, verbose=0,
                                  failure_config=tune.FailureConfig(
                                      max_failures=settings.max_failures),
                                  callbacks=[lines]))


def _trial(config: dict, *, base: TrainSpec, student: dict, trials_dir: str,
           settings: SweepSettings) -> None:
    """One trial (in a Tune actor): train the student these params describe, reporting each
    held-out evaluation to Tune. Its errors cross Ray intact (RemoteError)."""
    with remote_errors("trial"):
        _run_trial(config, base=base, student=student, trials_dir=trials_dir, settings=settings)


def _run_trial(config: dict, *, base: TrainSpec, student: dict, trials_dir: str,
               settings: SweepSettings) -> None:
    from ray import tune

    from orchestrator.train.launch import fit_student

    name = tune.get_context().get_trial_name()
    spec = spec_for(base, student=student, params=config)
    spec = replace(spec, run=replace(spec.run, label=name))
    result = fit_student(spec, storage=trials_dir, name=name,
                         num_workers=max(1, settings.num_workers), use_gpu=settings.use_gpu,
                         cpus_per_worker=settings.cpus_per_worker,
                         max_failures=settings.train_max_failures,
                         callbacks=[_EvalReports(settings.metric,
                                                 last_step=spec.optim.max_steps)])
    # the last evaluation reaches Tune only now, after the export: a scheduler that stops the
    # trial on it (ASHA stops at max_t) can no longer cut the export short
    tune.report({k: v for k, v in result.final.items() if k.startswith("eval_")}
                | {"step": spec.optim.max_steps, "wall_s": result.wall_s})


def _EvalReports(metric: str, *, last_step: int):
    """A Train callback forwarding held-out evaluations before the last step to Tune (ASHA needs
    the metric in every result it sees)."""
    from ray.train.v2.api.callback import UserCallback
    from ray.tune.integration.ray_train import TuneReportCallback

    class EvalReports(UserCallback):
        def __init__(self):
            self.inner = TuneReportCallback()

        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metric in metrics[0] and metrics[0].get("step", 0) < last_step:
                self.inner.after_report(run_context, metrics, checkpoint)

    return EvalReports()


def _outcome(result, *, base: TrainSpec, student: dict, trials_dir: str) -> TrialOutcome:
    from orchestrator.train.launch import MODEL_DIR, load_done

    label = _label_of(result.path)  # Tune's trial folder is named by the trial's name
    trial_id = str((result.metrics or {}).get("trial_id") or "")
    params = dict(result.config or {})
    try:
        spec = spec_for(base, student=student, params=params)
        settings = {**vars(spec.student.shape), **({"model": spec.student.model}
                                                    if spec.student.model else {}),
                    "loss": spec.loss.kind,
                    "temperature": spec.loss.temperature, "alpha": spec.loss.alpha,
                    "beta": spec.loss.beta, "lr": spec.optim.lr}
    except Exception:  # noqa: BLE001 — a bad combination that failed its trial
        settings = {}
    metrics = {k: v for k, v in (result.metrics or {}).items()
               if k.startswith("eval_") or k in ("step", "tokens_per_s", "time_total_s")}
    done = load_done(os.path.join(trials_dir, label))
    if result.error is not None:
        return TrialOutcome(trial_id, label, params, "error", metrics,
                            error=error_text(result.error), settings=settings)
    if done is not None:
        final = {k: v for k, v in done["final"].items()
                 if k.startswith("eval_") or k in ("step", "tokens_per_s")}
        return TrialOutcome(trial_id, label, params, "finished", final | {"wall_s": done["wall_s"]},
                            model_dir=os.path.join(trials_dir, label, MODEL_DIR),
                            settings=settings)
    return TrialOutcome(trial_id, label, params, "stopped", metrics, settings=settings)
