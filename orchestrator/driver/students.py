"""The students' fan-out (driver-internal, used by the recipes in `pipeline`): the KD student and
the baselines (hard-label, behaviour-cloning) built from the config as plain `TrainSpec`s, trained
on Ray Train one after another or side by side when the cluster holds several."""

from __future__ import annotations

from dataclasses import replace

from orchestrator.config import Config
from orchestrator.console import say
from orchestrator.driver.preflight import check_student, warn_if_not_smaller
from orchestrator.driver.progress import TrainProgress
from orchestrator.driver.specs import student_shape, train_spec
from orchestrator.names import experiment_dir
from orchestrator.shards.plan import CaptureKind, CapturePlan


def train_students(cfg: Config, plans: list[CapturePlan], experiment: str, *, board,
                   streaming: bool, only: tuple[str, ...] = ("kd", "hard", "bc"),
                   beside_teachers: bool = False) -> dict:
    """Train the KD student and/or the baselines (same budget, seed, student); label → result.
    `beside_teachers`: teacher actors capture while they train (run's KD student)."""
    import ray

    from orchestrator.train.launch import fit_student, worker_threads

    t, s, tr = cfg.teacher, cfg.student, cfg.train
    by_kind = {p.kind: p for p in plans}
    main = by_kind[CaptureKind.MAIN]
    held = by_kind.get(CaptureKind.HELDOUT)
    bc = by_kind.get(CaptureKind.BC, main if t.mode == "sample" else None)
    pretrained = check_student(cfg)
    shape = pretrained.shape if pretrained else student_shape(cfg)
    warn_if_not_smaller(t.model, shape,
                        parameters=pretrained.parameters if pretrained else None)
    size = f"{shape.layers}×{shape.hidden}"
    if pretrained:
        size = f"pretrained {s.model} ({size}, {pretrained.parameters / 1e6:.2f}M parameters)"
    # offline: the KD student without its on-policy share (what on-policy samples add)
    runs = {"kd": (main, tr.alpha), "hard": (main, 0.0), "bc": (bc, 0.0),
            "offline": (main, tr.alpha)}
    storage = experiment_dir(cfg.output_dir, experiment)
    if board is None:
        from orchestrator.train.board import ShardBoard

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
        specs[label] = train_spec(cfg, plan=plan, held=held, alpha=alpha, board=board,
                                 streaming=streaming and label == "kd", label=label)
        what = {"kd": f"KD student ({tr.loss}, T={tr.temperature}, alpha={tr.alpha}"
                      + (f"; on-policy share {tr.on_policy:g}, {cfg.on_policy.loss}"
                         if tr.on_policy > 0 else "") + ")",
                "offline": f"offline KD student ({tr.loss}, T={tr.temperature}, alpha="
                           f"{tr.alpha}; no on-policy samples)",
                "hard": "hard-label baseline", "bc": "behaviour-cloning baseline"}[label]
        say(f"training the {what}: {size}, {tr.max_steps} steps × "
            f"{tr.batch_size * tr.grad_accum} sequences on {max(tr.num_workers, 1)} worker(s)")
    if not specs:
        return {}

    def fit(label: str):
        result = fit_student(specs[label], storage=storage, name=label,
                             num_workers=tr.num_workers, use_gpu=tr.use_gpu,
                             cpus_per_worker=tr.cpus_per_worker, max_failures=tr.max_failures)
        board.train_done.remote(label)
        return result

    streamed = [sp for sp in specs.values() if sp.data.streaming]
    capture_total = main.manifest.total_units if streamed else None
    parallel = _students_at_once(cfg, len(specs))
    layout = dict(num_workers=tr.num_workers, cpus_per_worker=tr.cpus_per_worker,
                  use_gpu=tr.use_gpu)
    alone, beside = (worker_threads(alongside=parallel, **layout),
                     worker_threads(alongside=2, **layout))
    # beside the teachers, or (the KD student) beside its own on-policy actors: its share only
    specs = {label: replace(sp, run=replace(sp.run, torch_threads=beside if beside_teachers or (
        label == "kd" and tr.on_policy > 0) else alone)) for label, sp in specs.items()}
    results = {}
    with _on_policy_actors(cfg, main, storage=storage, wanted="kd" in specs) as actors, \
            TrainProgress(list(specs), total=tr.max_steps, board=board,
                          capture_total=capture_total):
        if actors is not None:
            specs["kd"] = replace(specs["kd"], on_policy=actors.spec())
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
        folded = max((h.get("folded_mass", 0.0) for h in r.history), default=0.0)
        if folded > 0:
            say(f"[yellow]warning:[/] {r.label}: the teacher put {folded:.2%} of its "
                "probability per position (the most of any logged window) on ids the student "
                "has no embedding row for (its table is smaller than the teacher's); that mass "
                "was folded into the tail (history metric folded_mass)")
    return results


def _on_policy_actors(cfg: Config, main: CapturePlan, *, storage: str, wanted: bool):
    """The KD student's rollout and scoring actors when train.on_policy > 0 (a context that
    stops them), else a context of None."""
    from contextlib import nullcontext

    if not wanted or cfg.train.on_policy <= 0:
        return nullcontext(None)
    from orchestrator.driver.onpolicy import OnPolicyActors

    return OnPolicyActors(cfg, main, storage=storage)


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
