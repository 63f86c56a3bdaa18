"""What a capture asks of a teacher, as plain values (no config object crosses into actors): the
engine's settings (`WorkerSpec`, one per teacher pool) apart from each capture's own
(`CaptureSpec`, sent with each unit). Built by `orchestrator.shards.plan`, read by `actors/`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerSpec:
    """What the engine needs, as plain values (no config object crosses into actors). Shared by
    every capture of one command that runs on this pool; what differs per capture is a
    `CaptureSpec`, sent with each unit."""

    backend: str
    model: str
    revision: str | None
    mode: str
    """`score` or `sample`: a scoring engine cannot sample (vLLM's runner differs)."""
    max_k: int
    """Largest k any capture on this engine asks for (vLLM's `max_logprobs` is fixed at start)."""
    dtype: str
    scoring: str
    memory_fraction: float
    kv_cache_gib: float | None
    max_model_len: int | None
    tensor_parallel_size: int
    chunk_rows: int
    batch_tokens: int
    seed: int
    """The engine's own seed (vLLM); each prompt's samples are seeded by `CaptureSpec.seed`."""
    tail_temperatures: tuple[float, ...] = ()
    """Extra temperatures of the stored tail mass (teacher.tail_temperatures)."""


@dataclass(frozen=True)
class CaptureSpec:
    """What one capture needs from the engine — travels with each of its units, so captures of
    different lengths, k or long-text policy share one engine without inheriting each other's
    settings (the held-out split is truncated while the main capture is split, say)."""

    output_dir: str
    mode: str
    k: int
    max_length: int
    """Longest sequence: a longer text is split or truncated to it (score mode); a prompt keeps
    its last `max_length - max_new_tokens` tokens (sample mode)."""
    long_text: str
    """`split` or `truncate` (score mode)."""
    shard_meta: dict
    """Provenance written into every shard (teacher, tokenizer, fingerprint, capture kind)."""
    temperature: float = 1.0
    top_p: float = 1.0
    num_samples: int = 1
    max_new_tokens: int = 0
    seed: int = 0
    """Sample mode: the per-prompt seeds derive from it and the sample id."""

    def done(self) -> dict:
        """What this capture does to the records, recorded in each shard's metadata (training
        checks it against what its config expects): the same fields `TeacherWorker.label` uses."""
        out = {"mode": self.mode, "k": self.k, "max_length": self.max_length}
        if self.mode == "score":
            return out | {"long_text": self.long_text, "capture_temperature": 1.0}
        return out | {"capture_temperature": self.temperature, "top_p": self.top_p,
                      "num_samples": self.num_samples, "max_new_tokens": self.max_new_tokens,
                      "sample_seed": self.seed}
