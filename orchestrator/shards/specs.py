"""What a capture asks of a teacher, as plain values (no config object crosses into actors): the
engine's settings (`EngineSpec`, one per teacher pool) apart from each capture's own
(`CaptureSpec`, sent with each unit). Built by `orchestrator.shards.plan`, read by `actors/`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineSpec:
    """The teacher engine's settings (the config's teacher section, less what each capture asks):
    one pool of actors is started per engine and shared by every capture of one command that
    needs an equal one; what differs per capture is a `CaptureSpec`, sent with each unit."""

    backend: str
    """`vllm` or `hf` (transformers)."""
    model: str
    """The teacher's directory or hub id."""
    revision: str | None
    """Hub revision of `model` (None: the local files as they are)."""
    mode: str
    """`score` or `sample`: a scoring engine cannot sample (vLLM's runner differs). Each capture
    says its own mode too; the engine refuses a capture of the other."""
    max_k: int
    """Largest k any capture on this engine asks for (vLLM's `max_logprobs` is fixed at start)."""
    dtype: str
    """Compute dtype (`auto`: bfloat16 for vLLM, float32 for transformers on a CPU)."""
    scoring: str
    """vLLM scoring path: `hidden` (the model's head on hidden states) or `prompt_logprobs`."""
    memory_fraction: float
    """vLLM `gpu_memory_utilization` (on a CPU: the share of RAM for the KV cache)."""
    kv_cache_gib: float | None
    """vLLM KV-cache size; overrides memory_fraction."""
    max_model_len: int | None
    """The engine's context length; None: the model's."""
    tensor_parallel_size: int
    """vLLM tensor parallelism."""
    chunk_rows: int
    """Positions whose full-vocabulary logits exist at once (the actor's peak memory)."""
    batch_tokens: int
    """Tokens per forward pass (transformers backend)."""
    seed: int
    """The engine's own seed (vLLM); each prompt's samples are seeded by `CaptureSpec.seed`."""
    tail_temperatures: tuple[float, ...] = ()
    """Extra temperatures of the stored tail mass (teacher.tail_temperatures): the backend
    computes them in its scoring pass, so they are fixed when the engine starts."""


@dataclass(frozen=True)
class CaptureSpec:
    """What one capture needs from the engine — travels with each of its units, so captures of
    different lengths, k or long-text policy share one engine without inheriting each other's
    settings (the held-out split is truncated while the main capture is split, say)."""

    output_dir: str
    """Where the capture's shards go (`{output_dir}/shards/`)."""
    mode: str
    """`score` or `sample`; must be the engine's (`EngineSpec.mode`)."""
    k: int
    """Top-k ids and log-probs kept per position (at most `EngineSpec.max_k`)."""
    max_length: int
    """Longest sequence: a longer text is split or truncated to it (score mode); a prompt keeps
    its last `max_length - max_new_tokens` tokens (sample mode)."""
    long_text: str
    """`split` or `truncate` (score mode)."""
    shard_meta: dict
    """Provenance written into every shard (teacher, tokenizer, fingerprint, capture kind)."""
    temperature: float = 1.0
    """Sample mode: the sampling temperature (the stored log-probs stay the T = 1 ones)."""
    top_p: float = 1.0
    """Sample mode: nucleus sampling."""
    num_samples: int = 1
    """Sample mode: continuations per prompt."""
    max_new_tokens: int = 0
    """Sample mode: the longest continuation."""
    seed: int = 0
    """Sample mode: the per-prompt seeds derive from it and the sample id."""
    chat_template: str = ""
    """The chat template's text (Jinja) chat records are rendered with; "" without chat records."""
    train_on_prompt: bool = False
    """Learn every token of completion and chat records (no loss mask), not only the reply's."""

    def done(self) -> dict:
        """What this capture does to the records, recorded in each shard's metadata (training
        checks it against what its config expects): the same fields `TeacherWorker.label` uses."""
        out = {"mode": self.mode, "k": self.k, "max_length": self.max_length}
        if self.mode == "score":
            return out | {"long_text": self.long_text, "capture_temperature": 1.0}
        return out | {"capture_temperature": self.temperature, "top_p": self.top_p,
                      "num_samples": self.num_samples, "max_new_tokens": self.max_new_tokens,
                      "sample_seed": self.seed}
