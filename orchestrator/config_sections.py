"""The run config's sections: typed dataclasses, a docstring per field; the defaults live here
and nowhere else. `orchestrator.config` loads them (one YAML file plus `--set key=value`
overrides) and re-exports every class: import them from there."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Literal

from orchestrator.config_onpolicy import OnPolicyConfig
from orchestrator.paths import identity


@dataclass
class TeacherConfig:
    model: str = ""
    """Local path of a Hugging Face model directory (or a hub id already in the local HF cache)."""
    revision: str | None = None
    """Model revision (hub ids only); recorded in the shards."""
    backend: Literal["vllm", "hf"] = "vllm"
    """`vllm`: a real vLLM engine (production path); `hf`: plain transformers (reference, fallback)."""
    num_actors: int = 1
    """How many teacher actors (each holds one engine) capture in parallel."""
    k: int = 64
    """Top-k token ids and log-probs kept per position."""
    mode: Literal["score", "sample"] = "score"
    """`score`: top-k at every position of given texts; `sample`: sample continuations of prompts."""
    temperature: float = 1.0
    """Sampling temperature in `sample` mode. Stored log-probs are always the raw (T=1) ones."""
    top_p: float = 1.0
    """Nucleus sampling in `sample` mode."""
    num_samples: int = 1
    """Continuations sampled per prompt in `sample` mode."""
    max_new_tokens: int = 128
    """Longest continuation in `sample` mode."""
    seed: int = 0
    """Seed of the teacher's sampling; each prompt's samples are reproducible from it."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Compute dtype; `auto` is bfloat16 for vLLM and float32 for transformers on a CPU."""
    num_cpus: float = 1.0
    """Ray CPUs reserved per teacher actor."""
    num_gpus: float = 0.0
    """Ray GPUs per teacher actor (set to tensor_parallel_size on GPU clusters)."""
    tensor_parallel_size: int = 1
    """vLLM tensor parallelism for teachers that do not fit one device."""
    memory_fraction: float = 0.15
    """vLLM `gpu_memory_utilization`; on a CPU it is the fraction of RAM reserved for the KV cache."""
    kv_cache_gib: float | None = None
    """vLLM KV-cache size in GiB (`kv_cache_memory_bytes`); overrides memory_fraction. On a CPU this
    is the predictable knob: memory_fraction minus the process's own RSS can come out negative."""
    max_model_len: int | None = None
    """Context length of the engine; defaults to the model's max_position_embeddings."""
    scoring: Literal["hidden", "prompt_logprobs"] = "hidden"
    """vLLM scoring path: `hidden` returns hidden states and applies the model's head (weight, bias,
    soft cap, logit scale) and top-k on tensors (fast; checked against vLLM's own head at start);
    `prompt_logprobs` uses vLLM's own per-position logprob objects (slow, for heads the fast path
    refuses)."""
    chunk_rows: int = 512
    """Positions whose full-vocabulary logits exist at once (bounds the actor's peak memory)."""
    batch_tokens: int = 8192
    """Tokens per forward pass in the transformers backend."""
    tail_temperatures: list[float] = field(default_factory=list)
    """Extra temperatures (besides 1) at which each position's exact tail mass outside the top-k is
    stored, e.g. [2.0]: `train.tail=bucket` at a `train.temperature` other than 1 needs it. Each
    costs one more pass over the vocabulary per position while capturing (score mode with
    `scoring: hidden`, or the hf backend)."""


@dataclass
class DataConfig:
    path: str = ""
    """JSONL file, a directory of *.jsonl files, or a glob; one JSON object per line."""
    format: Literal["auto", "text", "completion", "chat"] = "auto"
    """Record format: `text` ({"text"}), `completion` ({"prompt", "completion"}: the completion
    and EOS are learned), `chat` ({"messages": [{"role", "content"}, …]}: rendered with the chat
    template, the assistant turns are learned); `auto` decides per file from its first record
    and refuses a file that mixes formats."""
    chat_template: str = ""
    """Jinja chat template file for chat records; empty: the teacher tokenizer's own."""
    train_on_prompt: bool = False
    """Learn (distil and count in the hard-label loss) every token of completion and chat
    records, not only the completion / assistant tokens."""
    text_field: str = "text"
    """Field holding the text in `score` mode."""
    prompt_field: str = "prompt"
    """Field holding the prompt in `sample` mode (falls back to `text_field`) and of completion
    records."""
    id_field: str = "id"
    """Optional field with a stable sample id; else `<file name>:<line number>`."""
    max_length: int | None = None
    """Longest sequence in tokens; defaults to the engine's context length."""
    long_text: Literal["truncate", "split"] = "split"
    """Texts longer than max_length: `split` into consecutive pieces (`<id>#p<j>`) or `truncate`.
    The held-out split always truncates (one sequence per record: it is a measurement)."""
    on_bad_line: Literal["stop", "skip"] = "stop"
    """A malformed JSONL line: `stop` before any work with file:line, or `skip` it and count it."""
    limit: int | None = None
    """Use only the first `limit` records (for quick trials)."""
    eval_path: str = ""
    """Held-out JSONL (text records) scored by the teacher for evaluation; empty: hold out
    `eval_fraction` of `path` instead (by a hash of each record's id, the same split every run)."""
    eval_fraction: float = 0.05
    """Share of `path` held out when `eval_path` is empty (0 disables evaluation)."""


@dataclass
class CaptureConfig:
    samples_per_shard: int = 256
    """Records per work unit; each unit becomes exactly one shard file."""
    max_inflight_per_actor: int = 2
    """Units queued per actor (one running, one waiting) — bounds driver and actor memory."""
    max_unit_failures: int = 3
    """A unit that fails this often (actor crashes) stops the capture with its last error."""


@dataclass
class StudentConfig:
    model: str = ""
    """A pretrained student to start from: a local Hugging Face model directory (or a hub id
    already in the local HF cache; nothing is downloaded). Its tokenizer must be the teacher's;
    its embedding table may be smaller than the teacher's padded one. Empty: build the student
    from the teacher's config at the shape below. A config file sets either this or a shape."""
    revision: str | None = None
    """Revision of `student.model` (hub ids only)."""
    preset: str | None = "nano"
    """Named size (orchestrator.shapes.PRESETS); explicit fields below override it."""
    layers: int | None = None
    """Decoder layers."""
    hidden: int | None = None
    """Hidden size (keep hidden // heads = 64 for vLLM's CPU kernels)."""
    heads: int | None = None
    """Attention heads; must divide hidden."""
    intermediate: int | None = None
    """MLP width; defaults to the preset's, else 4 × hidden."""
    init_from_teacher: bool = False
    """Copy the teacher's embeddings, final norm, LM head and every n-th layer where shapes match."""


@dataclass
class TrainConfig:
    loss: Literal["fkl", "rkl", "jsd", "tvd"] = "fkl"
    """KD divergence: forward KL, reverse KL, generalised JSD(beta), total variation."""
    temperature: float = 1.0
    """Divides teacher log-probs and student logits; the KD term is scaled by T²."""
    alpha: float = 0.5
    """Weight of the KD term; 1 − alpha weighs the hard-label cross-entropy."""
    beta: float = 0.5
    """JSD mixing weight, in (0, 1)."""
    tail: Literal["renormalize", "bucket"] = "renormalize"
    """Probability mass outside the teacher's top-k: renormalise it away, or keep one tail bucket."""
    fused_head: bool = True
    """Run the student's LM head and the KD + CE loss together in row chunks, so no
    [tokens × vocabulary] tensor exists beyond one chunk (same loss and gradients as the dense
    path; a head it cannot fuse falls back to the dense path, saying why). false: always dense."""
    lr: float = 2e-3
    """Peak AdamW learning rate (linear warm-up, cosine decay to 10%)."""
    warmup_steps: int = 20
    """Optimizer steps of linear warm-up."""
    batch_size: int = 16
    """Sequences per micro-batch per worker."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    shuffle_shards: int = 8
    """Shards each worker reads at a time and shuffles together (every epoch visits the shards in
    a seeded order). A shard keeps the data file's order, so in a sorted or grouped file it holds
    one topic; shuffling one shard at a time made the demo's students follow one topic for a dozen
    steps (its KD student: 4.95 nats/token held-out after 300 steps instead of 4.60 with every
    sample shuffled; BENCHMARKS.md "Demo quality"). Memory: this many decoded shards in each
    worker's read task (~18 MB per 35k tokens at k = 64). 1: one shard at a time (the order
    before)."""
    packing: bool = False
    """Sequence packing: a micro-batch is as many samples as fit, concatenated without padding,
    in `max_tokens_per_batch` // data.max_length rows of data.max_length tokens (position ids
    restart per sample, attention never crosses a sample boundary), instead of `batch_size`
    samples padded to the longest. The training metrics' `padding_share` is the padding this
    removes, `tokens_per_s` the throughput."""
    max_tokens_per_batch: int | None = None
    """Token slots of a packed micro-batch (required with `packing`; at least the capture's
    data.max_length; batch_size × data.max_length gives padded batches' memory)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """`bf16`: forward and loss under bfloat16 autocast (GPUs with bf16, or recent CPUs); the
    weights, gradients and optimizer state stay fp32 (master weights)."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward instead of keeping them: less memory
    for long sequences and big students, ~⅓ more compute, the same gradients."""
    max_steps: int = 500
    """Optimizer steps of the run."""
    eval_every: int = 100
    """Optimizer steps between held-out evaluations (and checkpoints)."""
    seed: int = 0
    """Seed of initialisation and data shuffling."""
    num_workers: int = 1
    """Ray Train workers (DDP); 0 trains in the driver process (local mode: quick checks)."""
    use_gpu: bool = False
    """Train on GPUs (one per worker)."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """How a student is spread over its workers: `ddp` (each worker holds the whole model,
    gradients all-reduced) or `fsdp` (PyTorch FSDP2: weights, gradients and optimizer state
    sharded across the workers, for students that do not fit one device). Checkpoints hold the
    whole model either way (a plain Hugging Face directory)."""
    cpus_per_worker: float = 0.5
    """Logical CPUs each train worker reserves (on 2 CPUs keep ≤ 0.5 so Ray Data readers and a
    teacher fit beside two workers)."""
    reader_cpus: float = 0.25
    """Logical CPUs of each Ray Data task that reads and decodes a shard."""
    log_every: int = 10
    """Optimizer steps between progress reports (loss, throughput, data wait)."""
    eval_samples: int = 256
    """Held-out samples evaluated (split across workers)."""
    max_failures: int = 2
    """Worker failures a run survives, each resuming from the last checkpoint (FailureConfig)."""
    max_shards_ahead: int = 16
    """Streaming runs: the capture pauses when it is this many shards ahead of the students."""
    baselines: list = field(default_factory=lambda: ["hard", "bc"])
    """Students trained beside the KD student with the same budget and seed: `hard` (the data's
    next tokens only) and `bc` (behaviour cloning: the teacher's samples only)."""
    students_at_once: int = 1
    """Baselines trained side by side when the cluster has room (each worker then gets
    `cpus_per_worker` threads). 1 = one after another: on a small machine two students share
    memory bandwidth and each runs ~3× slower (measured on 2 cores)."""
    bc_prompt_tokens: int = 32
    """Behaviour cloning: each training text's first tokens prompt the teacher's samples."""
    report_prompts: int = 3
    """Held-out prompts the report shows with the teacher's and each student's greedy
    completions side by side (0: none). Their prompt part, or their first bc_prompt_tokens."""
    report_new_tokens: int = 48
    """Tokens each model writes for each of those prompts (greedy)."""
    on_policy: float = 0.0
    """On-policy share λ of each batch: that share of every micro-batch's samples are the
    student's own continuations of the data's prompts, scored by the teacher as it goes and
    learned with `on_policy.loss` on the generated tokens only; the rest are offline shards.
    0: offline only; 1: purely on-policy (section `on_policy`)."""
    on_policy_prompts: Literal["auto", "data", "prefix"] = "auto"
    """What the student continues: `data` (the records' prompts: a completion's prompt, a chat up
    to its last assistant turn), `prefix` (the first on_policy.prompt_tokens tokens of each
    text), `auto` (the data's prompts where a record has one, else its prefix)."""


@dataclass
class TuneConfig:
    space: str | dict = "default"
    """A named search space (`tune_spaces/<name>.yaml`, or a YAML file path), or an inline mapping
    of config keys to distributions, e.g. `{train.temperature: {grid: [1, 2]}}`."""
    max_steps: int | None = None
    """Optimizer steps per trial; default train.max_steps (sweeps often use a shorter budget)."""
    eval_every: int | None = None
    """Steps between a trial's evaluations (what ASHA compares); default train.eval_every."""
    eval_samples: int | None = None
    """Held-out samples of a trial's evaluations; default train.eval_samples (fewer: cheaper
    evaluations, noisier comparisons)."""
    metric: str = "eval_kl"
    """Held-out metric trials are ranked and early-stopped on: eval_kl, eval_student_nll,
    eval_top1 (higher is better), …"""
    num_samples: int = 1
    """Repeats of the space's grid (grid axes) × samples of its random axes."""
    max_concurrent_trials: int = 0
    """Trials running at once; 0 = as many as the cluster's CPUs (or GPUs) hold. On a 2-core
    machine 1 is fastest: concurrent students share memory bandwidth."""
    scheduler: Literal["asha", "fifo"] = "asha"
    """`asha`: stop trials that trail the others at the same step (successive halving);
    `fifo`: run every trial to train.max_steps."""
    grace_period: int | None = None
    """ASHA: steps every trial runs before it can be stopped; default train.eval_every."""
    reduction_factor: float = 2.0
    """ASHA: keep 1/reduction_factor of the trials at each rung."""
    search: Literal["basic", "optuna"] = "basic"
    """`basic`: Tune's grid/random variant generator; `optuna`: TPE over the space (no grid axes;
    needs `pip install optuna`)."""
    winners: Literal["pareto", "top"] = "pareto"
    """Which finished trials are winners: the Pareto front of quality vs size and latency (capped
    at `top`), or simply the `top` best by the metric."""
    top: int = 3
    """Most winners recorded (and served by default)."""
    trial_cpus: float = 0.1
    """Logical CPUs of each trial's driver (its train workers reserve train.cpus_per_worker)."""
    max_failures: int = 0
    """Retries of a crashed trial before it is reported as errored (the sweep continues)."""
    latency_tokens: int = 32
    """Tokens generated (greedy, batch 1) when measuring each finished student's latency."""


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    """Address the HTTP proxy binds; 0.0.0.0 exposes it to the network (set an API key)."""
    port: int = 8000
    """HTTP port of the OpenAI-compatible routes (`/v1/models`, `/v1/completions`, `/health`)."""
    top: int = 3
    """Winners hosted (the best `top` of the run's winners.json)."""
    api_key_env: str = "RAYDISTILL_API_KEY"
    """Environment variable holding the API key; when it is set, requests need
    `Authorization: Bearer <key>`. Unset: no key is required."""
    max_batch_size: int = 8
    """Requests for one model decoded together (Ray Serve request batching)."""
    batch_wait_timeout_s: float = 0.01
    """How long a batch waits to fill before it runs."""
    min_replicas: int = 1
    """Autoscaling: fewest replicas."""
    max_replicas: int = 1
    """Autoscaling: most replicas (each holds up to models_per_replica students)."""
    target_ongoing_requests: float = 4.0
    """Autoscaling: requests in flight per replica the autoscaler aims for."""
    max_ongoing_requests: int = 16
    """Completions one replica works on at once (loading its student, batching, decoding); more
    wait in that replica's queue."""
    max_queued_requests: int = 64
    """Completions one replica holds waiting beyond max_ongoing_requests; more are answered at
    once with 429, a Retry-After header and an OpenAI error body (never a 5xx), so the server
    admits replicas × (max_ongoing_requests + max_queued_requests). -1: no limit, never 429."""
    models_per_replica: int = 3
    """Students one replica keeps loaded (model multiplexing; least recently used is evicted)."""
    replica_cpus: float = 1.0
    """Logical CPUs each replica reserves."""
    max_prompt_tokens: int = 1024
    """Longest prompt accepted (also capped by the model's context)."""
    max_tokens: int = 256
    """Largest `max_tokens` a request may ask for."""


@dataclass
class Config:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    on_policy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    output_dir: str = ""
    """Where shards and the manifest go: a local path or an `s3://bucket/prefix` URI."""

    def capture_keys(self, *, format_version: int = 0, data_sha256: str = "",
                     selection: str = "all", rendering: dict | None = None) -> dict:
        """Every setting that changes what a capture's shards contain (not how fast they come):
        teacher, k, mode, engine length, the data settings and the shard format version. The
        data enter by content, not by path: `data_sha256` is `orchestrator.data.content_digest`
        of the files `data.path` names (a moved copy resumes, an edited file is refused), and
        `selection` says which of their records the capture keeps (`all`, or the train /
        held-out side of `data.eval_fraction`) — so data.path, data.eval_path and
        data.eval_fraction count only through those two, and each capture through its own data
        (the held-out file is in the held-out capture's keys, not the main one's). A local
        teacher counts by its real path (`orchestrator.paths.identity`): `~/t`, `/root/t/` and a
        symlink to it are one teacher. `rendering`: how the records become tokens where that is
        more than their text — the formats found, train_on_prompt and the chat template's digest
        (`orchestrator.shards.plan` knows them once the data and the teacher are read); the
        format, template and train_on_prompt settings count only through it."""
        t, d = self.teacher, self.data
        data = {k: v for k, v in dataclasses.asdict(d).items()
                if k not in ("path", "eval_path", "eval_fraction", "format", "chat_template",
                             "train_on_prompt")} | (rendering or {})
        keys = {"format_version": format_version, "model": identity(t.model),
                "revision": t.revision, "k": t.k, "mode": t.mode, "max_model_len": t.max_model_len,
                "data": data | {"content_sha256": data_sha256, "selection": selection},
                "samples_per_shard": self.capture.samples_per_shard}
        if t.tail_temperatures:
            keys["tail_temperatures"] = sorted(float(x) for x in t.tail_temperatures)
        if t.mode == "sample":  # sampling settings change nothing a scoring capture holds
            keys |= {"temperature": t.temperature, "top_p": t.top_p, "seed": t.seed,
                     "num_samples": t.num_samples, "max_new_tokens": t.max_new_tokens}
        return keys

    def capture_fingerprint(self, *, format_version: int = 0, data_sha256: str = "",
                            selection: str = "all") -> str:
        """16 hex digits of the sha256 of `capture_keys` (same arguments): a capture never
        resumes into shards of other settings, other data or another shard format."""
        keys = self.capture_keys(format_version=format_version, data_sha256=data_sha256,
                                 selection=selection)
        return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]
