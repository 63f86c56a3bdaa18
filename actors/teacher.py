"""The teacher worker: a plain class (unit tests use it without Ray) that turns one work unit of
records into one published shard. `actors.pool` wraps it in a Ray actor."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.manifest import ShardInfo, filesystem
from orchestrator.shards import write_shard
from orchestrator.softlabels import SoftLabels
from orchestrator.teacher_info import load_tokenizer


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a teacher worker needs, as plain values (no config object crosses into actors)."""

    backend: str
    model: str
    revision: str | None
    mode: str
    k: int
    dtype: str
    scoring: str
    memory_fraction: float
    kv_cache_gib: float | None
    max_model_len: int | None
    tensor_parallel_size: int
    chunk_rows: int
    batch_tokens: int
    temperature: float
    top_p: float
    num_samples: int
    max_new_tokens: int
    seed: int
    max_length: int
    long_text: str
    output_dir: str
    shard_meta: dict
    tail_temperatures: tuple[float, ...] = ()
    """Extra temperatures of the stored tail mass (teacher.tail_temperatures)."""


def make_backend(spec: WorkerSpec):
    if spec.backend == "hf":
        from actors.hf_backend import HFBackend

        return HFBackend(spec.model, dtype=spec.dtype, chunk_rows=spec.chunk_rows,
                         batch_tokens=spec.batch_tokens, max_length=spec.max_model_len,
                         revision=spec.revision, tail_temperatures=spec.tail_temperatures)
    from actors.vllm_backend import VLLMBackend

    return VLLMBackend(spec.model, mode=spec.mode, k=spec.k, dtype=spec.dtype, scoring=spec.scoring,
                       memory_fraction=spec.memory_fraction, kv_cache_gib=spec.kv_cache_gib,
                       max_model_len=spec.max_model_len,
                       tensor_parallel_size=spec.tensor_parallel_size, seed=spec.seed,
                       chunk_rows=spec.chunk_rows, revision=spec.revision,
                       tail_temperatures=spec.tail_temperatures)


class TeacherWorker:
    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.tokenizer = load_tokenizer(spec.model, revision=spec.revision)
        self.backend = make_backend(spec)
        self.fs, self.root = filesystem(spec.output_dir)

    def ready(self) -> dict:
        """Called once by the pool: proves the engine started and reports its limits."""
        import os

        return {"vocab_size": self.backend.vocab_size, "max_length": self.backend.max_length,
                "max_k": self.backend.max_k, "pid": os.getpid()}

    def process(self, unit: int, records: list[tuple[str, str]],
                target: tuple[str, dict] | None = None) -> ShardInfo:
        """Label one unit's (sample_id, text) records and publish them as one shard — into the
        spec's output, or into `target` = (output_dir, shard_meta) of another capture of the same
        mode (the held-out split shares the engine of the main capture)."""
        _test_delay()
        rows = self.label(records)
        if target is None:
            return write_shard(self.fs, f"{self.root}/shards", unit, rows, self.spec.shard_meta)
        fs, root = filesystem(target[0])
        return write_shard(fs, f"{root}/shards", unit, rows, target[1])

    def label(self, records: list[tuple[str, str]]) -> list[tuple[str, SoftLabels]]:
        s = self.spec
        texts = [text for _, text in records]
        encoded = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        if s.mode == "score":
            ids, seqs = [], []
            for (sample_id, _), tokens in zip(records, encoded):
                pieces = split_tokens(tokens, s.max_length, s.long_text)
                for j, piece in enumerate(pieces):
                    ids.append(sample_id if len(pieces) == 1 else f"{sample_id}#p{j}")
                    seqs.append(piece)
            return list(zip(ids, self.backend.score(seqs, k=s.k)))
        room = s.max_length - s.max_new_tokens
        prompts = [tokens[-room:] for tokens in encoded]  # long prompts keep their end
        seeds = [stable_seed(s.seed, sample_id) for sample_id, _ in records]
        outs = self.backend.sample(prompts, k=s.k, n=s.num_samples, temperature=s.temperature,
                                   top_p=s.top_p, max_new_tokens=s.max_new_tokens, seeds=seeds,
                                   eos_id=self.tokenizer.eos_token_id)
        return [(f"{sample_id}#s{j}", sl)
                for (sample_id, _), samples in zip(records, outs) for j, sl in enumerate(samples)]

    def close(self) -> None:
        self.backend.close()


def _test_delay() -> None:
    """HACK (test hook): RAYDISTILL_TEST_TEACHER_DELAY_S makes every unit take that much longer,
    so tests can have a real teacher that produces slower than the students consume (streaming).
    Unset, it costs nothing."""
    import os
    import time

    delay = float(os.environ.get("RAYDISTILL_TEST_TEACHER_DELAY_S", "0") or 0)
    if delay > 0:
        time.sleep(delay)


def split_tokens(tokens: list[int], max_length: int, policy: str) -> list[list[int]]:
    """A text longer than max_length: `split` into consecutive pieces, or `truncate` to the first."""
    if len(tokens) <= max_length:
        return [tokens]
    if policy == "truncate":
        return [tokens[:max_length]]
    pieces = [tokens[i:i + max_length] for i in range(0, len(tokens), max_length)]
    if len(pieces) > 1 and len(pieces[-1]) < 2:  # a 1-token tail has nothing to predict
        pieces.pop()
    return pieces


def stable_seed(seed: int, sample_id: str) -> int:
    """Per-prompt seed from the run seed and the sample id: the same prompt samples the same
    continuations whichever actor, unit or restart handles it."""
    import hashlib

    digest = hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")
