"""Checks the driver runs before any training starts: the shards are genuine (checksums, the
teacher's tokenizer), the layout fits the cluster, the student is smaller than the teacher.
Each refusal names the problem and the fix."""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestrator.errors import ConfigError, ShardError
from orchestrator.shards.manifest import SHARDS_DIR
from orchestrator.console import say
from orchestrator.shards.format import load_shard, read_bytes, shard_metadata

if TYPE_CHECKING:
    from orchestrator.shards.plan import CapturePlan
    from orchestrator.config import Config


def check_shards(plan: CapturePlan, *, verify_all: bool) -> None:
    """Before training: the shards must come from this config's teacher and tokenizer, captured
    as the config says (mode, k, max_length, long_text…), and (for
    `train`) every one must match its checksum — a bad shard is named, never trained on."""
    import hashlib as _h

    from orchestrator.train.stream import check_shard_origin

    expect = plan.expect()  # the teacher's tokenizer and how the capture was made
    if plan.cfg.train.tail == "bucket":
        expect["tail_temperature"] = plan.cfg.train.temperature
    for n, (unit, shard) in enumerate(sorted(plan.manifest.shards.items())):
        path = f"{plan.root}/{SHARDS_DIR}/{shard.file}"
        if n == 0 or verify_all:
            try:
                data = read_bytes(plan.fs, path)
            except (FileNotFoundError, OSError):
                raise ShardError(f"shard {path} is listed in the manifest but missing; recapture "
                                 "it with `raydistill capture CONFIG --repair`") from None
            if n == 0:  # checksum, Parquet, shard format version, then origin
                meta = shard_metadata(load_shard(data, name=path, sha256=shard.sha256))
                check_shard_origin(meta, expect, name=path)
            elif _h.sha256(data).hexdigest() != shard.sha256:
                raise ShardError(f"shard {path} does not match its checksum in manifest.json "
                                 "(truncated or corrupt); recapture it with `raydistill capture "
                                 "CONFIG --repair`")
        if not verify_all:
            break


def check_resources(cfg: Config, *, teachers: bool, extra: float = 0.0) -> None:
    """Refuse a layout that cannot run on this cluster rather than hang waiting for CPUs."""
    import ray

    t, tr = cfg.teacher, cfg.train
    have = ray.cluster_resources().get("CPU", 0.0)
    workers = max(tr.num_workers, 1) * (0 if tr.use_gpu else tr.cpus_per_worker)
    o = cfg.on_policy
    on_policy = (o.rollout_actors * o.rollout_cpus + o.teacher_actors * o.teacher_cpus
                 + tr.reader_cpus) if tr.on_policy > 0 else 0.0
    need = (workers + tr.reader_cpus + extra + on_policy
            + (t.num_actors * t.num_cpus if teachers else 0.0))
    if need > have + 1e-9:
        teach = f" + {t.num_actors} teacher(s) × {t.num_cpus}" if teachers else ""
        roll = (f" + on-policy: {o.rollout_actors} rollout actor(s) × {o.rollout_cpus}, "
                f"{o.teacher_actors} scoring teacher(s) × {o.teacher_cpus}, a prompt reader "
                f"{tr.reader_cpus}" if on_policy else "")
        raise ConfigError(
            f"this layout needs {need:g} CPUs ({max(tr.num_workers, 1)} train worker(s) × "
            f"{tr.cpus_per_worker}{teach}{roll} + Ray Data readers {tr.reader_cpus}) but the "
            f"cluster has {have:g}; lower train.cpus_per_worker / train.num_workers / "
            "teacher.num_cpus" + (" / on_policy.rollout_cpus / on_policy.teacher_cpus"
                                  if on_policy else ""))


def check_student(cfg: Config):
    """A pretrained student (student.model) before any work: it loads, its tokenizer is the
    teacher's, its table covers the tokenizer (`orchestrator.student_info`). Returns its
    `PretrainedInfo`, or None for a student built at a shape."""
    from orchestrator.student_info import inspect_student
    from orchestrator.teacher_info import inspect_teacher

    s, t = cfg.student, cfg.teacher
    if not s.model:
        return None
    inspect_teacher(t.model, revision=t.revision)  # a broken teacher is named as the teacher
    return inspect_student(s.model, revision=s.revision, teacher=t.model,
                           teacher_revision=t.revision)


def warn_if_not_smaller(teacher: str, shape, *, parameters: int | None = None) -> None:
    """Warn when the student is not smaller than the teacher: a shape by `shapes.size_ratio`, a
    pretrained student (`parameters`: its real count) against the teacher's real count."""
    from transformers import AutoConfig

    from orchestrator.shapes import size_ratio
    from orchestrator.student_info import real_parameters

    config = AutoConfig.from_pretrained(teacher)
    if parameters is None:
        ratio = size_ratio(config, shape)
    else:
        ratio = parameters / max(1, real_parameters(config))
    if ratio >= 1.0:
        fix = ("pick a smaller student.model" if parameters is not None else
               "pick a smaller student.preset or student.layers/hidden")
        say(f"[yellow]warning:[/] the student ({shape.layers}×{shape.hidden}) is about "
            f"{ratio:.1f}× the teacher's size; distillation normally trains a smaller model — "
            f"{fix}")
