"""The run config: typed dataclasses, loaded from one YAML file plus `--set key=value` overrides,
validated once before any Ray work starts. Defaults live here and nowhere else.

Errors name the field, the value, what is allowed and the fix, e.g.
`teacher.k must be between 1 and the vocabulary size (32000), got 40000`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from orchestrator.config_checks import validate, validate_serve  # noqa: F401 (public here)
from orchestrator.errors import ConfigError
from orchestrator.paths import expand_paths, identity


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
    text_field: str = "text"
    """Field holding the text in `score` mode."""
    prompt_field: str = "prompt"
    """Field holding the prompt in `sample` mode (falls back to `text_field`)."""
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
    lr: float = 2e-3
    """Peak AdamW learning rate (linear warm-up, cosine decay to 10%)."""
    warmup_steps: int = 20
    """Optimizer steps of linear warm-up."""
    batch_size: int = 16
    """Sequences per micro-batch per worker."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
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
    tune: TuneConfig = field(default_factory=TuneConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    output_dir: str = ""
    """Where shards and the manifest go: a local path or an `s3://bucket/prefix` URI."""

    def capture_keys(self, *, format_version: int = 0, data_sha256: str = "",
                     selection: str = "all") -> dict:
        """Every setting that changes what a capture's shards contain (not how fast they come):
        teacher, k, mode, engine length, the data settings and the shard format version. The
        data enter by content, not by path: `data_sha256` is `orchestrator.data.content_digest`
        of the files `data.path` names (a moved copy resumes, an edited file is refused), and
        `selection` says which of their records the capture keeps (`all`, or the train /
        held-out side of `data.eval_fraction`) — so data.path, data.eval_path and
        data.eval_fraction count only through those two, and each capture through its own data
        (the held-out file is in the held-out capture's keys, not the main one's). A local
        teacher counts by its real path (`orchestrator.paths.identity`): `~/t`, `/root/t/` and a
        symlink to it are one teacher."""
        t, d = self.teacher, self.data
        data = {k: v for k, v in dataclasses.asdict(d).items()
                if k not in ("path", "eval_path", "eval_fraction")}
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


_SECTIONS = {"teacher": TeacherConfig, "data": DataConfig, "capture": CaptureConfig,
             "student": StudentConfig, "train": TrainConfig, "tune": TuneConfig,
             "serve": ServeConfig}


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config, apply `key=value` overrides (values parsed as YAML), expand the path
    fields (`~`, environment variables: `orchestrator.paths`), validate."""
    raw = _read_yaml(path, fix="pass the path of a YAML run config")
    for item in overrides:
        _apply_override(raw, item)
    cfg = _build(raw)
    expand_paths(cfg)  # once, here: everything downstream sees the expanded, absolute paths
    validate(cfg)
    return cfg


def _read_yaml(path: str | Path | None, *, fix: str) -> dict[str, Any]:
    """The mapping a YAML config file holds ({} without a path)."""
    if path is None:
        return {}
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {p} is a directory; {fix}")
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist; {fix}")
    try:
        raw = yaml.safe_load(p.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not UTF-8 text (byte {e.start}: {e.reason}); save "
                          "it as UTF-8 YAML") from None
    except OSError as e:
        raise ConfigError(f"config file {p} cannot be read ({e.strerror or e}); {fix}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    except (ValueError, RecursionError) as e:  # an integer of >4300 digits, nesting too deep
        raise ConfigError(f"config file {p} is not valid YAML: {str(e)[:120] or 'nested too deeply'}"
                          ) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections, got "
                          f"{type(raw).__name__}")
    return raw


def _apply_override(raw: dict, item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {item!r} must look like key=value, e.g. --set teacher.k=32")
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        if node.get(part) is None:  # absent, or an empty section (`teacher:` in the YAML)
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
    except (yaml.YAMLError, ValueError, RecursionError):  # not YAML: the plain string
        node[parts[-1]] = value


def _build(raw: dict) -> Config:
    cfg = Config()
    for key, value in raw.items():
        if key in _SECTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{key} must be a mapping of fields, got {value!r}")
            setattr(cfg, key, _build_section(key, _SECTIONS[key], value))
        elif key == "output_dir":
            cfg.output_dir = _coerce("output_dir", str, value)
        else:
            known = sorted([*_SECTIONS, "output_dir"])
            raise ConfigError(f"unknown config key {key!r}; known top-level keys: {', '.join(known)}"
                              f"{_did_you_mean(key, known)}")
    return cfg


def _build_section(name: str, cls, values: dict):
    hints = get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(
                f"unknown config key {name}.{key}; valid keys in {name}: {', '.join(sorted(hints))}"
                f"{_did_you_mean(key, hints, prefix=name + '.')}")
        kwargs[key] = _coerce(f"{name}.{key}", hints[key], value)
    return cls(**kwargs)


def _did_you_mean(key, known, *, prefix: str = "") -> str:
    """` (did you mean teacher.k?)` when a known key is close to the unknown one, else ``."""
    import difflib

    close = difflib.get_close_matches(str(key), list(known), n=3, cutoff=0.6)
    swapped = [c for c in close if sorted(c) == sorted(str(key))]  # `modle` is `model`, not `mode`
    close = swapped or close
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def _coerce(name: str, tp, value):
    origin = get_origin(tp)
    args = get_args(tp)
    if origin is Literal:
        if value not in args:
            allowed = " | ".join(str(a) for a in args)
            raise ConfigError(f"{name} must be one of {allowed}, got {value!r}")
        return value
    if set(args) == {str, dict}:  # tune.space: a name or an inline mapping
        if isinstance(value, (str, dict)):
            return value
        raise ConfigError(f"{name} must be a space name or a mapping of config keys to "
                          f"distributions, got {value!r}")
    if origin is list and args == (float,):  # e.g. teacher.tail_temperatures: [2, 4]
        items = value if isinstance(value, list) else [value] if value is not None else None
        if items is None:
            raise ConfigError(f"{name} must be a list of numbers, got {value!r}")
        return [_coerce(f"{name}[{i}]", float, v) for i, v in enumerate(items)]
    if args and type(None) in args:  # X | None
        if value is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(name, inner, value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value.strip())
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value) if abs(value) < 1e308 else math.inf  # 10**400 has no float
            if not math.isfinite(number):
                raise ConfigError(f"{name} must be a finite number, got {str(value)[:40]}")
            return number
    elif tp is list:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    kind = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            list: "a list of names"}[tp]
    if value is None:
        raise ConfigError(f"{name} has no value (YAML null); set it to {kind}")
    raise ConfigError(f"{name} must be {kind}, got {value!r} ({type(value).__name__})")


def coerce_field(key: str, value):
    """`value` as the student/train field `key` (e.g. "train.lr") holds it; ConfigError if it
    cannot (a search space's values go through here, as a config file's do)."""
    section, _, name = key.partition(".")
    cls = {"student": StudentConfig, "train": TrainConfig}[section]
    return _coerce(key, get_type_hints(cls)[name], value)


def load_serve_config(path: str | Path | None, overrides: list[str] = ()) -> ServeConfig:
    """Only the `serve` section of a config file (plus `serve.*` overrides): serving needs no
    teacher or data."""
    raw = _read_yaml(path, fix="pass the path of a YAML config or omit --config")
    raw = {"serve": raw.get("serve") or {}}
    for item in overrides:
        if not item.partition("=")[0].strip().startswith("serve."):
            raise ConfigError(f"--set {item!r}: serving takes only serve.* settings, "
                              "e.g. --set serve.port=8001")
        _apply_override(raw, item)
    if not isinstance(raw["serve"], dict):
        raise ConfigError(f"serve must be a mapping of fields, got {raw['serve']!r}")
    cfg = _build_section("serve", ServeConfig, raw["serve"])
    validate_serve(cfg)
    return cfg
