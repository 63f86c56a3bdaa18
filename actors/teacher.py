"""The teacher worker: a plain class (unit tests use it without Ray) that turns one work unit of
records into one published shard. `actors.pool` wraps it in a Ray actor."""

from __future__ import annotations

import dataclasses

import numpy as np

from orchestrator import chat
from orchestrator.data import Record
from orchestrator.shards.manifest import ShardInfo
from orchestrator.storage import filesystem
from orchestrator.shards.format import spans_to_mask, write_shard
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

    def process(self, unit: int, records: list[Record], capture: CaptureSpec) -> ShardInfo:
        """Label one unit's records as `capture` says and publish them as one shard in its
        output_dir, its metadata saying what was done."""
        _test_delay()
        rows = self.label(records, capture)
        if capture.output_dir not in self._outputs:
            self._outputs[capture.output_dir] = filesystem(capture.output_dir)
        fs, root = self._outputs[capture.output_dir]
        return write_shard(fs, f"{root}/shards", unit, rows, {**capture.shard_meta,
                                                              **capture.done()})

    def label(self, records: list[Record], capture: CaptureSpec
              ) -> list[tuple[str, SoftLabels]]:
        """Tokenize each record as its format says (`orchestrator.chat.encode`: chat records with
        `capture.chat_template`) and score it (score mode; each SoftLabels carries the learned
        tokens as `loss_mask`, None for all) or sample the teacher's continuation of it."""
        c = capture
        if c.mode != self.spec.mode:  # the driver starts one pool per mode; never mix them
            raise ValueError(f"a {c.mode}-mode capture sent to a {self.spec.mode}-mode engine")
        encoded = [chat.encode(r, self.tokenizer, template=c.chat_template or None, mode=c.mode,
                               train_on_prompt=c.train_on_prompt) for r in records]
        if c.mode == "score":
            ids, seqs, masks = [], [], []
            for record, enc in zip(records, encoded):
                mask = None if enc.spans is None else spans_to_mask(enc.spans, len(enc.ids))
                pieces = (split_tokens(enc.ids, c.max_length, c.long_text, mask=mask)
                          if mask is not None else
                          [(p, None) for p in split_tokens(enc.ids, c.max_length, c.long_text)])
                for j, (piece, piece_mask) in enumerate(pieces):
                    ids.append(record.sample_id if len(pieces) == 1
                               else f"{record.sample_id}#p{j}")
                    seqs.append(piece)
                    masks.append(piece_mask)
            labels = self.backend.score(seqs, k=c.k)
            return [(sid, sl if m is None else dataclasses.replace(sl, loss_mask=m))
                    for sid, sl, m in zip(ids, labels, masks)]
        room = c.max_length - c.max_new_tokens
        prompts = [enc.ids[-room:] for enc in encoded]  # long prompts keep their end
        seeds = [stable_seed(c.seed, r.sample_id) for r in records]
        stops = self.tokenizer.eos_token_id
        if c.chat_template and any(r.format == "chat" for r in records):
            stops = chat.stop_ids(self.tokenizer, c.chat_template)
        outs = self.backend.sample(prompts, k=c.k, n=c.num_samples, temperature=c.temperature,
                                   top_p=c.top_p, max_new_tokens=c.max_new_tokens, seeds=seeds,
                                   eos_id=stops)
        return [(f"{r.sample_id}#s{j}", sl)
                for r, samples in zip(records, outs) for j, sl in enumerate(samples)]

    def score_rollouts(self, prompts: list[list[int]], generated: dict, *, k: int,
                       sample_ids: list[str]) -> dict:
        """Score the student's continuations (on-policy distillation): each prompt + its
        generated tokens as one sequence, top-k and the next token's log-prob at every position,
        as a stream row (`shards.format.decode_rows`'s fields) whose `loss_mask` marks the
        generated tokens only. `generated`: a rollout actor's answer (its completions, weights
        version and timings, passed through). Empty continuations are dropped."""
        import time

        t0 = time.perf_counter()
        pairs = [(sid, list(p), list(c)) for sid, p, c in
                 zip(sample_ids, prompts, generated["completions"]) if len(c) > 0]
        labels = self.backend.score([p + c for _, p, c in pairs], k=k) if pairs else []
        rows = []
        for (sid, prompt, completion), sl in zip(pairs, labels):
            T = len(prompt) + len(completion)
            mask = np.zeros(T, dtype=bool)
            mask[len(prompt):] = True
            rows.append({"sample_id": sid, "input_ids": np.asarray(sl.input_ids, dtype=np.int32),
                         "prompt_len": len(prompt), "label_start": 0,
                         "topk_ids": sl.topk_ids[:T], "topk_logprobs": sl.topk_logprobs[:T],
                         "target_logprobs": sl.target_logprobs[:T], "tail_mass": sl.tail_mass[:T],
                         "tail_temperatures": np.asarray(sl.tail_temperatures, dtype=np.float32),
                         "loss_mask": mask})
        return {k_: v for k_, v in generated.items() if k_ != "completions"} | {
            "rows": rows, "score_s": time.perf_counter() - t0}

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


def split_tokens(tokens: list[int], max_length: int, policy: str, *,
                 mask: np.ndarray | None = None) -> list:
    """A text longer than max_length: `split` into consecutive pieces, or `truncate` to the first.

    Without `mask`: the pieces' token lists. With `mask` ([T] bool, the learned tokens): (tokens,
    mask) pairs, the mask split alongside; a piece in which no token after its first is learned
    has nothing to teach and is dropped."""
    if len(tokens) <= max_length:
        pieces = [tokens]
    elif policy == "truncate":
        pieces = [tokens[:max_length]]
    else:
        pieces = [tokens[i:i + max_length] for i in range(0, len(tokens), max_length)]
        if len(pieces) > 1 and len(pieces[-1]) < 2:  # a 1-token tail has nothing to predict
            pieces.pop()
    if mask is None:
        return pieces
    out, start = [], 0
    for piece in pieces:
        m = mask[start:start + len(piece)]
        start += len(piece)
        if m[1:].any():
            out.append((piece, m))
    return out


def stable_seed(seed: int, sample_id: str) -> int:
    """Per-prompt seed from the run seed and the sample id: the same prompt samples the same
    continuations whichever actor, unit or restart handles it."""
    import hashlib

    digest = hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")
