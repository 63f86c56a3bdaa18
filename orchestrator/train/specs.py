"""What one student's training run needs, as a few small frozen dataclasses of plain values (no
config object crosses into the Ray Train workers): the student to build, the samples it reads,
the loss (`orchestrator.kd.losses.LossSpec`), the optimisation, the held-out evaluation and the
run's own infrastructure. The driver builds them in one place from the config
(`orchestrator.driver.specs.train_spec`); a Tune trial `dataclasses.replace`s the one it varies
(`tune_spaces.sweep.spec_for`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from orchestrator.kd.losses import LossSpec
from orchestrator.shapes import StudentShape


@dataclass(frozen=True)
class StudentSpec:
    """The student to build: a smaller model of the teacher's architecture, or a pretrained one
    (what a trial's `student` axis varies)."""

    teacher_model: str
    """The teacher's name or directory: its config gives the student's architecture and
    vocabulary, its tokenizer is saved with every checkpoint."""
    shape: StudentShape
    """Layers, hidden size, heads, MLP size (a pretrained student's own, for display)."""
    init_from_teacher: bool
    """Start from the teacher's embeddings and evenly spaced layers instead of random weights."""
    model: str = ""
    """A pretrained student (directory or cached hub id) to start from, weights and shape as
    they are; empty: build one from the teacher's config at `shape`."""
    revision: str | None = None
    """Revision of `model` (hub ids)."""


@dataclass(frozen=True)
class DataSpec:
    """The training samples: a capture's shards, read by a seeded, resumable stream."""

    shards_uri: str
    """The capture's output_dir (its manifest.json and shards/)."""
    units: list[int]
    """Every shard unit of the capture, published or not (a streaming run waits for the rest)."""
    streaming: bool
    """The capture is still running: wait for each shard until the manifest lists it; the first
    epoch reads in capture order."""
    expect: dict
    """What every training shard's metadata must say (tokenizer, mode, k, max_length,
    long_text…; `orchestrator.train.stream.check_shard_origin`)."""
    hard_labels_from_prompt: bool = False
    """Also learn the prompt tokens' hard labels (sample mode; `orchestrator.kd.batches.collate`)."""
    max_length: int = 0
    """The capture's longest sample (its max_length): the length of a packed row (`OptimSpec.
    packing`); 0: one row per micro-batch."""
    shuffle_shards: int = 1
    """Shards read at a time and shuffled together (train.shuffle_shards; `train.stream`)."""


@dataclass(frozen=True)
class OptimSpec:
    """AdamW under a warm-up + cosine schedule, and the batch layout that fixes the data
    position of a checkpoint (`orchestrator.train.loop.batch_layout`)."""

    lr: float
    """Peak learning rate."""
    warmup_steps: int
    """Optimizer steps of linear warm-up."""
    batch_size: int
    """Sequences per micro-batch per worker."""
    grad_accum: int
    """Micro-batches per optimizer step."""
    max_steps: int
    """Optimizer steps of the run."""
    seed: int
    """Seed of the student's initialisation and of the data order."""
    packing: bool = False
    """Pack each micro-batch's samples into rows of `DataSpec.max_length` tokens without padding
    (`kd.batches.Packer`, `pack`): as many samples as fit max_tokens_per_batch // max_length rows,
    instead of `batch_size` samples padded to the longest."""
    max_tokens_per_batch: int = 0
    """Token slots of a packed micro-batch (with `packing`; at least the capture's
    max_length)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """`bf16`: forward and loss under bfloat16 autocast; weights, gradients and the optimizer
    state stay fp32."""


@dataclass(frozen=True)
class EvalSpec:
    """The held-out evaluation, which also sets the checkpoint cadence."""

    every: int
    """Optimizer steps between evaluations and checkpoints (the last step always has both)."""
    heldout_uri: str | None
    """The held-out capture's output_dir; None: no evaluation (checkpoints still every
    `every` steps)."""
    samples: int
    """At most this many held-out sequences, split across the workers."""
    heldout_expect: dict | None = None
    """What every held-out shard's metadata must say (it is captured with its own settings);
    None: only the tokenizer of `DataSpec.expect`."""


@dataclass(frozen=True)
class RunSpec:
    """The run's place on the cluster and what it reports: nothing here changes what the student
    learns."""

    log_every: int
    """Optimizer steps between metric reports."""
    label: str = "kd"
    """The student's name in messages, on the board and in the report (`kd`, `hard`, `bc`, a
    trial's name)."""
    board: object = None
    """The run's `ShardBoard` actor (shard reads, metrics, capture failures), or None."""
    reader_cpus: float = 0.25
    """CPUs each Ray Data read task reserves."""
    torch_threads: int = 0
    """Intra-op threads of each worker (`launch.worker_threads`); 0 leaves what the worker
    started with (Ray gives a worker reserving under 2 CPUs OMP_NUM_THREADS=1: one core)."""
    local: bool = False
    """Local mode (num_workers=0): Ray Train keeps the checkpoint where it was written."""
    strategy: str = "ddp"
    """How the student is spread over several workers: `ddp` (whole replicas) or `fsdp` (FSDP2
    shards; `orchestrator.train.sharding`). It changes the memory each worker needs, not what
    the student learns."""
    fused_head: bool = True
    """Fuse the LM head with the loss in row chunks (`orchestrator.kd.step.StudentLoss`); the same
    loss and gradients as the dense path, without its [tokens × vocabulary] tensors."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward instead of keeping them (less memory,
    ~⅓ more compute; the same gradients)."""


@dataclass(frozen=True)
class OnPolicySpec:
    """On-policy distillation (`orchestrator.train.onpolicy`): each micro-batch's `share` of
    samples are the student's own continuations, generated by `rollout_actors` with the
    trainers' weights and scored by `teacher_actors`, learned with `loss` on the generated tokens
    only."""

    share: float
    """λ: the share of every micro-batch's samples (and weight of its loss) that is on-policy."""
    loss: LossSpec
    """The divergence on the student's samples (T = 1; alpha 1: no hard labels)."""
    rollout_actors: tuple = ()
    """Handles of the student rollout actors (`actors.rollout.RolloutActor`)."""
    teacher_actors: tuple = ()
    """Handles of the teacher actors that score the rollouts (their `score_rollouts`)."""
    k: int = 64
    """Teacher top-k of each scored position (the capture's k)."""
    stop_ids: tuple[int, ...] = ()
    """Tokens that end a continuation (EOS, a chat template's end of turn)."""
    max_length: int = 512
    """Longest prompt + continuation (the engines' and the capture's limit)."""
    max_new_tokens: int = 64
    temperature: float = 1.0
    prompts: str = "auto"
    """`data`, `prefix` or `auto` (`onpolicy.prompt_of`)."""
    prompt_tokens: int = 32
    sync_every: int = 1
    max_staleness: int = 1
    start_step: int = 0
    """Optimizer steps trained offline only before the student's own samples join."""


@dataclass(frozen=True)
class TrainSpec:
    """Everything one student run needs: `train_worker`'s whole input."""

    student: StudentSpec
    data: DataSpec
    loss: LossSpec
    optim: OptimSpec
    eval: EvalSpec
    run: RunSpec
    on_policy: OnPolicySpec | None = None
    """On-policy distillation, or None: offline shards only."""


@dataclass(frozen=True)
class RolloutEngineSpec:
    """A student rollout engine (on-policy distillation): its architecture and tokenizer, the
    trainers send the weights."""

    model_dir: str
    """HF dir with config.json + tokenizer files; weights files optional."""
    backend: Literal["vllm", "hf"] = "vllm"
    """`vllm`: a real vLLM engine of the student; `hf`: transformers, one prompt at a time."""
    dtype: str = "float32"
    """Engine dtype ("auto" → bfloat16 on GPU, float32 on CPU)."""
    max_model_len: int = 1024
    """Longest prompt + continuation the engine takes (at most the model's positions)."""
    seed: int = 0
    """The engine's own seed (each request also carries a seed of its own)."""
    kv_cache_gib: float | None = 0.5
    """vLLM's KV cache in GiB; None: a share `memory_fraction` of the accelerator's memory."""
    memory_fraction: float = 0.2
    """vLLM's gpu_memory_utilization (the rollout engine shares the device with trainers)."""
