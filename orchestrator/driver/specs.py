"""The one place a student run's specs are built from the config (`orchestrator.train.specs`):
the recipes call `train_spec` for the KD student, each baseline and a sweep's base run; nothing
else reads the config's train or student section for a run."""

from __future__ import annotations

from orchestrator.config import Config
from orchestrator.shards.plan import CapturePlan
from orchestrator.train.specs import DataSpec, EvalSpec, OptimSpec, RunSpec, StudentSpec, TrainSpec


def train_spec(cfg: Config, *, plan: CapturePlan, held: CapturePlan | None, alpha: float, board,
               streaming: bool, label: str) -> TrainSpec:
    """The spec of one student run on `plan`'s shards, evaluated on `held`'s (None: no
    evaluation). `alpha`: the KD weight (train.alpha for the KD student, 0 for a baseline);
    `streaming`: `plan`'s capture is still running; `board`: the run's ShardBoard actor."""
    from orchestrator.kd.losses import LossSpec

    t, s, tr = cfg.teacher, cfg.student, cfg.train
    return TrainSpec(
        student=StudentSpec(teacher_model=t.model, shape=student_shape(cfg),
                            init_from_teacher=s.init_from_teacher, model=s.model,
                            revision=s.revision),
        data=DataSpec(shards_uri=plan.cfg.output_dir,
                      units=list(range(plan.manifest.total_units)), streaming=streaming,
                      expect=plan.expect(), max_length=plan.max_length,
                      shuffle_shards=tr.shuffle_shards),
        loss=LossSpec(kind=tr.loss, temperature=tr.temperature, alpha=alpha, beta=tr.beta,
                      tail=tr.tail),
        optim=OptimSpec(lr=tr.lr, warmup_steps=tr.warmup_steps, batch_size=tr.batch_size,
                        grad_accum=tr.grad_accum, max_steps=tr.max_steps, seed=tr.seed,
                        packing=tr.packing, max_tokens_per_batch=tr.max_tokens_per_batch or 0,
                        precision=tr.precision),
        eval=EvalSpec(every=tr.eval_every, heldout_uri=held.cfg.output_dir if held else None,
                      samples=tr.eval_samples, heldout_expect=held.expect() if held else None),
        run=RunSpec(log_every=tr.log_every, label=label, board=board,
                    reader_cpus=tr.reader_cpus, fused_head=tr.fused_head,
                    strategy=tr.strategy,
                    gradient_checkpointing=tr.gradient_checkpointing))


def student_shape(cfg: Config):
    """The student's shape: a pretrained student.model's own (read from its config), else the
    preset / explicit fields."""
    from orchestrator.shapes import resolve_shape

    s = cfg.student
    if s.model:
        from transformers import AutoConfig

        from orchestrator.shapes import pretrained_shape

        return pretrained_shape(AutoConfig.from_pretrained(s.model, revision=s.revision,
                                                           local_files_only=True))
    return resolve_shape(preset=s.preset, layers=s.layers, hidden=s.hidden, heads=s.heads,
                         intermediate=s.intermediate)
