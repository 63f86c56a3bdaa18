"""Driver side of student training: one `TorchTrainer` run per student, its checkpoints under
`{storage}/{name}/`, the final student exported as a plain Hugging Face directory
`{storage}/{name}/model/` (loadable by transformers and vLLM).

Errors cross Ray intact: the worker function is `train_worker` inside `remote_errors`, so what it
raises reaches `_fit` as the original type and text (RemoteError), and the advice fits the cause:
`--resume` only for what a rerun can fix (a killed worker, a lost node), never for an error the
same inputs raise again (orchestrator/errors.py: TRANSIENT_TYPES).

Run names are unique per experiment: Ray Train V2 silently resumes a run whose name and storage
path it has seen before, which is what resuming on purpose (`--resume`) relies on and what a fresh
experiment must avoid.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace

from orchestrator.errors import (DivergedError, RaydistillError, RemoteError, remote_cause,
                                 remote_errors)
from orchestrator.storage import exists, filesystem
from orchestrator.train.layout import batch_layout, refuse_changed_layout
from orchestrator.train.loop import HISTORY_FILE, STATE_FILE
from orchestrator.train.specs import TrainSpec

MODEL_DIR = "model"
LAYOUT_FILE = "layout.json"


@dataclass
class StudentResult:
    label: str
    model_dir: str
    history: list[dict]
    final: dict
    """The last evaluation's metrics (eval_*) and the run's throughput figures."""
    wall_s: float


def fit_student(spec: TrainSpec, *, storage: str, name: str, num_workers: int, use_gpu: bool,
                cpus_per_worker: float, max_failures: int,
                callbacks: list | None = None) -> StudentResult:
    """Train one student with Ray Train and export it; resumes if `storage/name` holds a run.
    `callbacks`: Ray Train callbacks (a sweep's trial forwards evaluations to Tune)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    fs, root = filesystem(storage)
    model_uri = f"{storage.rstrip('/')}/{name}/{MODEL_DIR}"
    done = _load_done(fs, f"{root}/{name}")
    if done is not None:  # finished before: nothing to resume
        return StudentResult(spec.run.label, model_uri, done["history"], done["final"],
                             done["wall_s"])
    check_layout(fs, f"{root}/{name}",
                 batch_layout(batch_size=spec.optim.batch_size, grad_accum=spec.optim.grad_accum,
                              num_workers=num_workers, seed=spec.optim.seed,
                              max_tokens_per_batch=spec.optim.max_tokens_per_batch
                              if spec.optim.packing else None,
                              on_policy=spec.on_policy.share if spec.on_policy else 0.0,
                              shuffle_shards=spec.data.shuffle_shards),
                 what=f"the {spec.run.label} student's run {name}")
    t0 = time.time()
    if num_workers == 0:
        spec = replace(spec, run=replace(spec.run, local=True))
    resources = {"GPU": 1} if use_gpu else {"CPU": cpus_per_worker}
    trainer = TorchTrainer(
        _guarded_worker, train_loop_config={"spec": spec},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources if num_workers else None),
        run_config=RunConfig(name=name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             callbacks=callbacks),
    )
    result = _fit(trainer, spec, storage=storage, name=name)
    if result.checkpoint is None:
        raise RaydistillError(f"the {spec.run.label} student run {name} produced no checkpoint")
    with result.checkpoint.as_directory() as d:
        with open(os.path.join(d, HISTORY_FILE)) as f:
            last_step = json.load(f)[-1]["step"]
    if last_step < spec.optim.max_steps:  # Ray Train's own Ctrl-C handler aborted the run
        raise KeyboardInterrupt
    history, final = _export(result.checkpoint, fs, f"{root}/{name}/{MODEL_DIR}")
    if spec.run.local:  # local mode: the worker's own directory was the checkpoint
        import shutil

        shutil.rmtree(result.checkpoint.path, ignore_errors=True)
    wall = time.time() - t0
    _save_done(fs, f"{root}/{name}", {"history": history, "final": final, "wall_s": wall})
    return StudentResult(spec.run.label, model_uri, history, final, wall)


def worker_threads(*, alongside: int, num_workers: int, cpus_per_worker: float, use_gpu: bool,
                   node_cpus: list[float] | None = None) -> int:
    """Intra-op threads of each CPU train worker (`RunSpec.torch_threads`). Ray starts a worker
    that reserves under 2 CPUs with OMP_NUM_THREADS=1: torch would use one core however idle the
    node. A student trained alone on the cluster (`alongside` 1: no other student, trial or
    teacher working beside it) gets the cores of the largest CPU node (`node_cpus`; None: the
    live cluster's), shared by as many of its workers as Ray Train packs onto it; students, trials
    or teachers side by side keep their reservation (each using every core slows all of them
    down several-fold on 2 cores). 0 (leave the worker as Ray started it) on GPUs."""
    if use_gpu:
        return 0
    if alongside > 1:
        return max(1, int(cpus_per_worker))
    if node_cpus is None:
        import ray

        node_cpus = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    cores = max(node_cpus, default=1.0)
    packed = max(1, min(max(num_workers, 1), int(cores // max(cpus_per_worker, 1e-9))))
    return max(1, int(cores // packed))


def _fit(trainer, spec: TrainSpec, *, storage: str, name: str):
    """trainer.fit(), with Ray Train's Ctrl-C handling turned back into KeyboardInterrupt (its
    handler aborts the run, may exit via SystemExit, and stays installed after fit)."""
    import signal
    import threading

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        return trainer.fit()
    except SystemExit:
        raise KeyboardInterrupt from None
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 — Ray wraps the worker's error; name its root cause
        raise _failure(e, label=spec.run.label, storage=storage, name=name) from remote_cause(e)
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)


def _guarded_worker(config: dict) -> None:
    """The Ray Train worker function: `train_worker`, raising only errors that unpickle on the
    driver (a transformers / huggingface_hub error may not: see RemoteError)."""
    from orchestrator.train.loop import train_worker

    with remote_errors("train"):
        train_worker(config)


def _failure(error: BaseException, *, label: str, storage: str, name: str) -> RaydistillError:
    """The one message for a failed Train run: the worker's original error (type and text), with
    `--resume` advice only when a rerun can get past it."""
    cause = remote_cause(error)
    if isinstance(cause, DivergedError):  # resuming would diverge again: its own advice
        return DivergedError(str(cause))
    where = f"training of the {label} student failed"
    if isinstance(cause, RaydistillError) and not isinstance(cause, RemoteError):
        return RaydistillError(f"{where}: {cause}")  # our own error already names the fix
    if isinstance(cause, RemoteError) and not cause.transient:
        return RaydistillError(f"{where}: {cause}. It is not transient (resuming fails the same "
                               "way): fix its cause first; --debug shows the worker's traceback")
    # a transient error in the worker, or Ray's own failure (a worker, node or connection lost)
    text = str(cause) if isinstance(cause, RemoteError) else _last_line(cause)
    return RaydistillError(f"{where}: {text}. Checkpoints are kept under {storage}/{name}; "
                           "rerun with --resume to continue from the last one")


def _export(checkpoint, fs, dest: str) -> tuple[list[dict], dict]:
    """Copy the checkpoint's HF files (not the optimizer state) to `dest`; return its history."""
    import pyarrow.fs as pafs

    with checkpoint.as_directory() as d:
        with open(os.path.join(d, HISTORY_FILE)) as f:
            history = json.load(f)
        fs.create_dir(dest, recursive=True)
        local = pafs.LocalFileSystem()
        for fname in sorted(os.listdir(d)):
            if fname in (STATE_FILE, HISTORY_FILE) or fname.startswith("."):
                continue
            pafs.copy_files(os.path.join(d, fname), f"{dest}/{fname}", source_filesystem=local,
                            destination_filesystem=fs)
    final = {}
    for row in history:
        final.update(row)
    return history, final


def _done_path(run_root: str) -> str:
    return f"{run_root}/done.json"


def load_done(run_root: str) -> dict | None:
    """The finished-run record of `run_root` (history, final metrics, wall time), or None."""
    fs, root = filesystem(run_root)
    return _load_done(fs, root)


def _load_done(fs, run_root: str) -> dict | None:
    path = _done_path(run_root)
    if not exists(fs, path):
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def _save_done(fs, run_root: str, record: dict) -> None:
    from orchestrator.storage import write_atomic

    write_atomic(fs, _done_path(run_root), json.dumps(record).encode())


def _last_line(error: BaseException) -> str:
    """`Type: first sentence of the message's last line` (Ray's errors carry whole tracebacks
    and paragraphs of troubleshooting in their text)."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1].split('. ')[0]}" if text else type(error).__name__


def check_layout(fs, run_root: str, layout: dict, *, what: str) -> None:
    """Refuse to resume the run at `run_root` with another batch layout (`batch_layout`) than it
    started with — its data position would silently shift; record the layout at the run's start."""
    from orchestrator.storage import write_atomic

    path = f"{run_root}/{LAYOUT_FILE}"
    if exists(fs, path):
        with fs.open_input_stream(path) as f:
            refuse_changed_layout(json.loads(f.read()), layout, what=what)
    else:
        fs.create_dir(run_root, recursive=True)
        write_atomic(fs, path, json.dumps(layout).encode())


def check_experiment_layout(fs, experiment_root: str, layout: dict) -> None:
    """`check_layout` for every student run of an experiment being resumed, finished ones too
    (their report would otherwise show settings they were not trained with)."""
    import pyarrow.fs as pafs

    experiment = experiment_root.rstrip("/").rsplit("/", 1)[-1]
    for info in fs.get_file_info(pafs.FileSelector(experiment_root, allow_not_found=True)):
        if info.type == pafs.FileType.Directory and exists(fs, f"{info.path}/{LAYOUT_FILE}"):
            label = info.path.rstrip("/").rsplit("/", 1)[-1]
            check_layout(fs, info.path, layout, what=f"the {label} student of experiment "
                                                     f"{experiment}")
