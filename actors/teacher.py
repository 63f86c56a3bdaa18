"""The teacher worker: a plain class (unit tests use it without Ray) that turns one work unit of
records into one published shard. `actors.pool` wraps it in a Ray actor."""

from __future__ import annotations

from orchestrator.shards.manifest import ShardInfo
from orchestrator.storage import filesystem
from orchestrator.shards.format import write_shard
from orchestrator.shards.specs import CaptureSpec, EngineSpec
from orchestrator.kd.softlabels import SoftLabels
from orchestrator.teacher_info import load_tokenizer


def make_backend(spec: EngineSpec):
    if spec.backend == "hf":
        from actors.hf_backend import HFBackend

        return HFBackend(spec.model, dtype=spec.dtype, chunk_rows=spec.chunk_rows,
                         batch_tokens=spec.batch_tokens, max_length=spec.max_model_len,
                         revision=spec.revision, tail_temperatures=spec.tail_temperatures)
    from actors.vllm_backend import VLLMBackend

    return VLLMBackend(spec.model, mode=spec.mode, k=spec.max_k, dtype=spec.dtype,
                       scoring=spec.scoring, memory_fraction=spec.memory_fraction,
                       kv_cache_gib=spec.kv_cache_gib, max_model_len=spec.max_model_len,
                       tensor_parallel_size=spec.tensor_parallel_size, seed=spec.seed,
                       chunk_rows=spec.chunk_rows, revision=spec.revision,
                       tail_temperatures=spec.tail_temperatures)


class TeacherWorker:
    def __init__(self, spec: EngineSpec):
        self.spec = spec
        self.tokenizer = load_tokenizer(spec.model, revision=spec.revision)
        self.backend = make_backend(spec)
        self._outputs: dict[str, tuple] = {}  # output_dir → (filesystem, root)

    def ready(self) -> dict:
        """Called once by the pool: proves the engine started and reports its limits (each
        capture is checked against them: `TeacherPool.run`)."""
        import os

        return {"vocab_size": self.backend.vocab_size, "max_length": self.backend.max_length,
                "max_k": self.backend.max_k, "mode": self.spec.mode, "pid": os.getpid()}

    def process(self, unit: int, records: list[tuple[str, str]], capture: CaptureSpec
                ) -> ShardInfo:
        """Label one unit's (sample_id, text) records as `capture` says and publish them as one
        shard in its output_dir, its metadata saying what was done."""
        _test_delay()
        rows = self.label(records, capture)
        if capture.output_dir not in self._outputs:
            self._outputs[capture.output_dir] = filesystem(capture.output_dir)
        fs, root = self._outputs[capture.output_dir]
        return write_shard(fs, f"{root}/shards", unit, rows, {**capture.shard_meta,
                                                              **capture.done()})

    def label(self, records: list[tuple[str, str]], capture: CaptureSpec
              ) -> list[tuple[str, SoftLabels]]:
        c = capture
        if c.mode != self.spec.mode:  # the driver starts one pool per mode; never mix them
            raise ValueError(f"a {c.mode}-mode capture sent to a {self.spec.mode}-mode engine")
        texts = [text for _, text in records]
        encoded = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        if c.mode == "score":
            ids, seqs = [], []
            for (sample_id, _), tokens in zip(records, encoded):
                pieces = split_tokens(tokens, c.max_length, c.long_text)
                for j, piece in enumerate(pieces):
                    ids.append(sample_id if len(pieces) == 1 else f"{sample_id}#p{j}")
                    seqs.append(piece)
            return list(zip(ids, self.backend.score(seqs, k=c.k)))
        room = c.max_length - c.max_new_tokens
        prompts = [tokens[-room:] for tokens in encoded]  # long prompts keep their end
        seeds = [stable_seed(c.seed, sample_id) for sample_id, _ in records]
        outs = self.backend.sample(prompts, k=c.k, n=c.num_samples, temperature=c.temperature,
                                   top_p=c.top_p, max_new_tokens=c.max_new_tokens, seeds=seeds,
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
