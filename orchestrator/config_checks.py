"""The config's value checks: ranges and combinations that need no model and no Ray (checks that
need the teacher — k against its vocabulary, the context length — happen in the pipeline).
`orchestrator.config.load_config` runs them once, before any work; a search space's every
combination goes through `validate` too. Each message names the field, the value and what is
allowed."""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestrator.errors import ConfigError

if TYPE_CHECKING:
    from orchestrator.config import Config, ServeConfig, TuneConfig

BASELINES = ("hard", "bc", "offline")


def validate_serve(s: ServeConfig) -> None:
    _check(1 <= s.port <= 65535, f"serve.port must be between 1 and 65535, got {s.port}")
    _check(bool(s.host), "serve.host is empty; use 127.0.0.1 (this machine) or 0.0.0.0")
    for name in ("top", "max_batch_size", "min_replicas", "max_replicas", "max_ongoing_requests",
                 "models_per_replica", "max_prompt_tokens", "max_tokens"):
        value = getattr(s, name)
        _check(value >= 1, f"serve.{name} must be at least 1, got {value}")
    _check(s.max_replicas >= s.min_replicas,
           f"serve.max_replicas ({s.max_replicas}) must be >= serve.min_replicas "
           f"({s.min_replicas})")
    _check(s.max_queued_requests >= -1,
           f"serve.max_queued_requests must be >= 0 (or -1: unbounded), got {s.max_queued_requests}")
    _check(s.batch_wait_timeout_s >= 0,
           f"serve.batch_wait_timeout_s must be >= 0, got {s.batch_wait_timeout_s}")
    _check(s.target_ongoing_requests > 0,
           f"serve.target_ongoing_requests must be > 0, got {s.target_ongoing_requests}")
    _check(s.replica_cpus > 0, f"serve.replica_cpus must be > 0, got {s.replica_cpus}")


def _validate_tune(t: TuneConfig) -> None:
    _check(t.num_samples >= 1, f"tune.num_samples must be at least 1, got {t.num_samples}")
    _check(t.max_concurrent_trials >= 0,
           f"tune.max_concurrent_trials must be >= 0 (0: as many as fit), got "
           f"{t.max_concurrent_trials}")
    _check(t.top >= 1, f"tune.top must be at least 1, got {t.top}")
    _check(t.trial_cpus > 0, f"tune.trial_cpus must be > 0, got {t.trial_cpus}")
    _check(t.max_failures >= 0, f"tune.max_failures must be >= 0, got {t.max_failures}")
    _check(t.reduction_factor > 1, f"tune.reduction_factor must be > 1, got {t.reduction_factor}")
    _check(t.latency_tokens >= 1, f"tune.latency_tokens must be at least 1, got {t.latency_tokens}")
    for name in ("max_steps", "eval_every", "eval_samples", "grace_period"):
        value = getattr(t, name)
        _check(value is None or value >= 1, f"tune.{name} must be at least 1, got {value}")
    if t.grace_period is not None:
        _check(t.grace_period >= 1, f"tune.grace_period must be at least 1, got {t.grace_period}")
    _check(t.metric.startswith("eval_"),
           f"tune.metric must be a held-out metric (eval_kl, eval_student_nll, eval_top1, …), "
           f"got {t.metric!r}")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Checks that need no model or Ray; model-dependent checks happen in the pipeline."""
    t, d, c = cfg.teacher, cfg.data, cfg.capture
    _check(bool(t.model), "teacher.model is empty; set it to a local model directory")
    _check(bool(d.path), "data.path is empty; set it to a JSONL file (one JSON object per line)")
    _check(bool(cfg.output_dir), "output_dir is empty; set it to a local path or an s3:// URI")
    _check(t.num_actors >= 1, f"teacher.num_actors must be at least 1, got {t.num_actors}")
    _check(t.k >= 1, f"teacher.k must be at least 1, got {t.k}")
    _check(t.temperature > 0, f"teacher.temperature must be > 0, got {t.temperature}")
    _check(0 < t.top_p <= 1, f"teacher.top_p must be in (0, 1], got {t.top_p}")
    _check(t.num_samples >= 1, f"teacher.num_samples must be at least 1, got {t.num_samples}")
    _check(t.max_new_tokens >= 1, f"teacher.max_new_tokens must be at least 1, got {t.max_new_tokens}")
    _check(t.num_cpus > 0, f"teacher.num_cpus must be > 0, got {t.num_cpus}")
    _check(t.num_gpus >= 0, f"teacher.num_gpus must be >= 0, got {t.num_gpus}")
    _check(t.tensor_parallel_size >= 1,
           f"teacher.tensor_parallel_size must be at least 1, got {t.tensor_parallel_size}")
    _check(0 < t.memory_fraction < 1,
           f"teacher.memory_fraction must be in (0, 1), got {t.memory_fraction}")
    _check(t.chunk_rows >= 1, f"teacher.chunk_rows must be at least 1, got {t.chunk_rows}")
    _check(t.batch_tokens >= 1, f"teacher.batch_tokens must be at least 1, got {t.batch_tokens}")
    _check_tail_temperatures(cfg)
    if t.kv_cache_gib is not None:
        _check(t.kv_cache_gib > 0, f"teacher.kv_cache_gib must be > 0, got {t.kv_cache_gib}")
    if t.max_model_len is not None:
        _check(t.max_model_len >= 2, f"teacher.max_model_len must be at least 2, got {t.max_model_len}")
    if d.max_length is not None:
        _check(d.max_length >= 2, f"data.max_length must be at least 2, got {d.max_length}")
    if d.limit is not None:
        _check(d.limit >= 1, f"data.limit must be at least 1, got {d.limit}")
    _check(c.samples_per_shard >= 1,
           f"capture.samples_per_shard must be at least 1, got {c.samples_per_shard}")
    _check(c.max_inflight_per_actor >= 1,
           f"capture.max_inflight_per_actor must be at least 1, got {c.max_inflight_per_actor}")
    _check(c.max_unit_failures >= 1,
           f"capture.max_unit_failures must be at least 1, got {c.max_unit_failures}")
    _validate_training(cfg)
    _validate_tune(cfg.tune)
    validate_serve(cfg.serve)


def _check_tail_temperatures(cfg: Config) -> None:
    t, tr = cfg.teacher, cfg.train
    temps = t.tail_temperatures
    _check(all(isinstance(x, (int, float)) and x > 0 for x in temps),
           f"teacher.tail_temperatures must be a list of temperatures > 0, got {temps}")
    if temps and t.backend == "vllm":
        _check(t.mode == "score" and t.scoring == "hidden",
               f"teacher.tail_temperatures {temps} needs the full distribution, which vLLM's "
               f"{'sampler' if t.mode == 'sample' else 'prompt_logprobs'} does not return: use "
               "teacher.mode=score with teacher.scoring=hidden, teacher.backend=hf, or "
               "teacher.tail_temperatures=[]")
    if tr.tail == "bucket" and tr.temperature != 1.0:
        _check(any(abs(float(x) - tr.temperature) <= 1e-6 * tr.temperature for x in temps),
               f"train.tail=bucket at train.temperature={tr.temperature:g} needs the teacher's "
               f"tail mass at that temperature; add {tr.temperature:g} to "
               f"teacher.tail_temperatures (now {temps}) and recapture, or use "
               "train.tail=renormalize")


def _validate_training(cfg: Config) -> None:
    from orchestrator.shapes import resolve_shape

    s, tr = cfg.student, cfg.train
    if s.model:  # a pretrained student: its own shape (checked in the driver's preflight)
        _check(not s.init_from_teacher,
               f"student.init_from_teacher copies the teacher's weights into a student built at a "
               f"shape; student.model {s.model} starts from its own weights: set one of them")
    else:
        resolve_shape(preset=s.preset, layers=s.layers, hidden=s.hidden, heads=s.heads,
                      intermediate=s.intermediate)
    _check(tr.temperature > 0, f"train.temperature must be > 0, got {tr.temperature}")
    _check(0 <= tr.alpha <= 1, f"train.alpha must be in [0, 1] (weight of the KD term), got {tr.alpha}")
    _check(0 < tr.beta < 1, f"train.beta must be in (0, 1), got {tr.beta}")
    _check(tr.lr > 0, f"train.lr must be > 0, got {tr.lr}")
    _check(tr.num_workers >= 0, f"train.num_workers must be >= 0 (0: in-process), got {tr.num_workers}")
    for name in ("batch_size", "grad_accum", "max_steps", "eval_every", "log_every",
                 "eval_samples", "max_shards_ahead", "bc_prompt_tokens", "students_at_once",
                 "shuffle_shards"):
        value = getattr(tr, name)
        _check(value >= 1, f"train.{name} must be at least 1, got {value}")
    _check(tr.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {tr.warmup_steps}")
    _check(tr.max_failures >= 0, f"train.max_failures must be >= 0, got {tr.max_failures}")
    _check(tr.cpus_per_worker > 0, f"train.cpus_per_worker must be > 0, got {tr.cpus_per_worker}")
    _check(tr.reader_cpus > 0, f"train.reader_cpus must be > 0, got {tr.reader_cpus}")
    _check_packing(cfg)
    unknown = [b for b in tr.baselines if b not in BASELINES]
    _check(not unknown, f"train.baselines has {unknown}; valid baselines: {', '.join(BASELINES)} "
                        "(or [] for none)")
    _check(tr.on_policy > 0 or "offline" not in tr.baselines,
           "train.baselines has offline (the KD student without on-policy samples), but "
           "train.on_policy is 0, so the KD student already is that; drop offline from "
           "train.baselines or set train.on_policy > 0")
    _validate_on_policy(cfg)
    d = cfg.data
    _check(0 <= d.eval_fraction < 1, f"data.eval_fraction must be in [0, 1), got {d.eval_fraction}")



def _validate_on_policy(cfg: Config) -> None:
    tr, o = cfg.train, cfg.on_policy
    _check(0 <= tr.on_policy <= 1, f"train.on_policy must be in [0, 1] (the share of each batch "
                                   f"from the student's own samples), got {tr.on_policy}")
    _check(0 < o.beta < 1, f"on_policy.beta must be in (0, 1), got {o.beta}")
    _check(o.temperature >= 0, f"on_policy.temperature must be >= 0 (0: greedy), got "
                               f"{o.temperature}")
    for name in ("max_new_tokens", "prompt_tokens", "sync_every", "rollout_actors",
                 "teacher_actors"):
        value = getattr(o, name)
        _check(value >= 1, f"on_policy.{name} must be at least 1, got {value}")
    _check(o.start_step >= 0, f"on_policy.start_step must be >= 0, got {o.start_step}")
    _check(tr.on_policy <= 0 or o.start_step < tr.max_steps,
           f"on_policy.start_step {o.start_step} is not before train.max_steps {tr.max_steps}: "
           "the student would never learn from its own samples; lower on_policy.start_step")
    _check(o.max_staleness >= 0, f"on_policy.max_staleness must be >= 0, got {o.max_staleness}")
    _check(o.sync_every - 1 <= o.max_staleness,
           f"on_policy.sync_every {o.sync_every} lets the rollout weights lag up to "
           f"{o.sync_every - 1} steps, more than on_policy.max_staleness {o.max_staleness}; "
           f"lower sync_every or raise max_staleness to at least {o.sync_every - 1}")
    _check(o.rollout_cpus > 0, f"on_policy.rollout_cpus must be > 0, got {o.rollout_cpus}")
    _check(o.teacher_cpus > 0, f"on_policy.teacher_cpus must be > 0, got {o.teacher_cpus}")
    _check(o.rollout_gpus >= 0, f"on_policy.rollout_gpus must be >= 0, got {o.rollout_gpus}")
    _check(o.kv_cache_gib > 0, f"on_policy.kv_cache_gib must be > 0, got {o.kv_cache_gib}")
    if tr.on_policy > 0:
        length = cfg.data.max_length
        _check(length is None or o.max_new_tokens < length,
               f"on_policy.max_new_tokens ({o.max_new_tokens}) leaves no room for a prompt in "
               f"data.max_length ({length}) tokens; lower on_policy.max_new_tokens or raise "
               "data.max_length")
        _check(tr.strategy == "ddp" or tr.num_workers <= 1,
               "train.on_policy > 0 with train.strategy fsdp is not supported yet; use ddp")


def _check_packing(cfg: Config) -> None:
    tr, max_length = cfg.train, cfg.data.max_length
    if tr.max_tokens_per_batch is not None:
        _check(tr.max_tokens_per_batch >= 2,
               f"train.max_tokens_per_batch must be at least 2, got {tr.max_tokens_per_batch}")
    if not tr.packing:
        return
    example = (f"e.g. train.max_tokens_per_batch={tr.batch_size * max_length} (train.batch_size "
               "× data.max_length)" if max_length else "at least the teacher's context length")
    _check(tr.max_tokens_per_batch is not None,
           "train.packing=true needs train.max_tokens_per_batch, the tokens of one packed "
           f"micro-batch, at least data.max_length: {example}")
    if max_length is not None:
        check_packed_room(tr.max_tokens_per_batch, max_length=max_length)


def check_packed_room(max_tokens_per_batch: int, *, max_length: int) -> None:
    """Every sample of a capture (up to its max_length tokens) must fit one packed micro-batch;
    the pipeline calls this again with the engine's context when data.max_length is unset."""
    _check(max_tokens_per_batch >= max_length,
           f"train.max_tokens_per_batch ({max_tokens_per_batch}) is smaller than the capture's "
           f"longest sample ({max_length} tokens: data.max_length, else the teacher's context): "
           f"such a sample fits no packed micro-batch. Raise train.max_tokens_per_batch to at "
           f"least {max_length}, or set data.max_length lower")
