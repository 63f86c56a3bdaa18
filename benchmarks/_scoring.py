"""The timed scoring paths of the capture benchmark (benchmarks/capture.py runs them): the bare
transformers reference forward, vLLM's prompt_logprobs, raydistill's HF and vLLM backends, the
top-k head on hidden states; and how two paths' top-k log-probs agree."""

from __future__ import annotations

import gc
import os
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks._common import BATCH_TOKENS, K, err_text


class Reference:
    """(a): `AutoModelForCausalLM(...)(input_ids).logits` in fp32, in BATCH_TOKENS batches. Kept
    loaded for the whole run so that every timing of another path can be paired with one of it."""

    def __init__(self, path: Path, seqs):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                          local_files_only=True).eval()
        self.ids = torch.tensor(seqs, dtype=torch.long)
        self.rows = max(1, BATCH_TOKENS // self.ids.shape[1])
        self.tokens = self.ids.numel()
        self.run()  # warm-up

    def run(self) -> None:
        with self.torch.inference_mode():
            for b in range(0, self.ids.shape[0], self.rows):
                self.model(input_ids=self.ids[b:b + self.rows]).logits  # noqa: B018

    def once(self) -> float:
        t = time.perf_counter()
        self.run()
        return self.tokens / (time.perf_counter() - t)


def timed(fn, *, tokens: int, repeats: int, warmup: int = 1, ref: Reference | None = None):
    """Warm up, then time `repeats` calls; with `ref`, each call is followed by one (a) timing."""
    import torch

    out = None
    for _ in range(warmup):
        out = fn()
    times, refs = [], []
    load0 = os.getloadavg()[0]
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
        if ref is not None:
            refs.append(ref.once())
    tps = [tokens / t for t in times]
    res = {"tokens": tokens, "times": [round(t, 4) for t in times], "best": max(tps),
           "median": statistics.median(tps), "torch_threads": torch.get_num_threads(),
           "load": [load0, os.getloadavg()[0]]}
    if refs:
        res.update(ref_tps=[round(r) for r in refs], ref_best=max(refs),
                   ratio_paired=statistics.median(p / r for p, r in zip(tps, refs)),
                   ratio_best=max(tps) / max(refs))
    return res, out


def agreement(ref_ids, ref_lps, ref_t, ids, lps, t) -> dict:
    """How close another path's top-k is to the reference (rows aligned)."""
    same_top1 = float(np.mean(ref_ids[:, 0] == ids[:, 0]))
    a = np.sort(ref_ids, axis=1)
    b = np.sort(ids, axis=1)
    overlap = np.mean([np.intersect1d(x, y, assume_unique=True).size for x, y in zip(a, b)]) / a.shape[1]
    d_top1 = np.abs(ref_lps[:, 0] - lps[:, 0])
    both = ~np.isnan(ref_t) & ~np.isnan(t)
    d_t = np.abs(ref_t[both] - t[both])
    return {"top1_same": same_top1, "topk_overlap": float(overlap),
            "top1_lp_maxdiff": float(d_top1.max()), "top1_lp_meandiff": float(d_top1.mean()),
            "target_lp_maxdiff": float(d_t.max()) if d_t.size else float("nan"),
            "target_lp_meandiff": float(d_t.mean()) if d_t.size else float("nan")}


def lp_error(ref_ids, ref_lps, ids, lps) -> dict:
    """Max / mean |Δ log-prob| of the same token ids at the same positions (rows aligned): every
    (row, id) in both top-k lists. Rank-independent, so near-ties that swap order do not count."""
    errs = []
    for r_ids, r_lps, o_ids, o_lps in zip(ref_ids, ref_lps, ids, lps):
        common, ri, oi = np.intersect1d(r_ids, o_ids, assume_unique=True, return_indices=True)
        errs.append(np.abs(r_lps[ri].astype(np.float64) - o_lps[oi]))
    e = np.concatenate(errs) if errs else np.zeros(0)
    return {"max_nats": float(e.max()) if e.size else float("nan"),
            "mean_nats": float(e.mean()) if e.size else float("nan"), "pairs": int(e.size)}


def bench_hf_backend(path: Path, seqs, repeats: int, ref: Reference):
    from actors.hf_backend import HFBackend

    be = HFBackend(str(path), chunk_rows=512)
    res, out = timed(lambda: be.score(seqs, k=K), tokens=sum(map(len, seqs)), repeats=repeats, ref=ref)
    be.close()
    gc.collect()
    return res, out


def bench_vllm_prompt_logprobs(path: Path, seqs, repeats: int, ref: Reference):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.time()
    llm = LLM(model=str(path), runner="generate", max_logprobs=K, dtype="bfloat16",
              gpu_memory_utilization=0.15, enforce_eager=True, max_model_len=512, seed=0)
    start_s = time.time() - t0
    params = SamplingParams(max_tokens=1, prompt_logprobs=K, flat_logprobs=True)
    prompts = [TokensPrompt(prompt_token_ids=list(s)) for s in seqs]
    try:
        res, outs = timed(lambda: llm.generate(prompts, params, use_tqdm=False),
                          tokens=sum(map(len, seqs)), repeats=repeats, ref=ref)
        res["engine_start_s"] = start_s
        from orchestrator.kd.softlabels import flat_logprobs_to_arrays

        arrays = [flat_logprobs_to_arrays(o.prompt_logprobs, range(1, len(s)), k=K)
                  for s, o in zip(seqs, outs)]
        del outs
    finally:
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if callable(getattr(core, "shutdown", None)):
            core.shutdown()
        del llm, core
        gc.collect()
    return res, arrays


def bench_vllm_backend(path: Path, seqs, repeats: int, ref: Reference, *, dtype: str, scoring: str):
    from actors.vllm_backend import VLLMBackend

    t0 = time.time()
    be = VLLMBackend(str(path), mode="score", k=K, dtype=dtype, scoring=scoring, max_model_len=512)
    start_s = time.time() - t0
    diag = {}
    try:
        res, out = timed(lambda: be.score(seqs, k=K), tokens=sum(map(len, seqs)), repeats=repeats,
                         ref=ref)
        res["engine_start_s"] = start_s
        if scoring == "hidden":
            diag["self_check"] = be.self_check()  # vs vLLM's own head on the same hidden states
            # Where the time goes: the engine's forward (hidden states out) vs the LM head + top-k.
            from vllm.inputs import TokensPrompt

            prompts = [TokensPrompt(prompt_token_ids=list(s)) for s in seqs]
            enc, outs = timed(lambda: be.llm.encode(prompts, pooling_task="token_embed",
                                                    use_tqdm=False),
                              tokens=sum(map(len, seqs)), repeats=repeats)
            diag["encode"] = enc
            diag["hidden"] = [o.outputs.data for o in outs]
            diag["head"] = be.head
            del outs
            # the same head work while the engine is still up (its worker processes idle)
            try:
                diag["head_alive"] = bench_head(diag["hidden"], be.head, seqs, repeats, chunks=())
            except Exception as e:  # noqa: BLE001
                diag["head_alive_error"] = err_text(e)

    finally:
        be.close()
        gc.collect()
    return res, out, diag


def bench_head(hidden_list, head, seqs, repeats: int, *, chunks=(512,)) -> dict:
    """LM head + log-sum-exp + top-k alone: per sequence (as VLLMBackend does) vs concatenated.
    Measured on at most 16 sequences (tokens/s does not depend on the count)."""
    import torch

    from orchestrator.kd.softlabels import topk_from_hidden

    hidden_list, seqs = hidden_list[:16], seqs[:16]
    tokens = sum(map(len, seqs))
    targets = [torch.tensor(list(s[1:]) + [-1]) for s in seqs]
    res = {}
    per_seq, _ = timed(lambda: [topk_from_hidden(h, head, k=K, targets=t, chunk_rows=512)
                                for h, t in zip(hidden_list, targets)], tokens=tokens, repeats=repeats)
    res["per_sequence"] = per_seq
    allh = torch.cat(hidden_list)
    allt = torch.cat(targets)
    for rows in chunks:
        r, _ = timed(lambda rows=rows: topk_from_hidden(allh, head, k=K, targets=allt, chunk_rows=rows),
                     tokens=tokens, repeats=repeats)
        res[f"concat_{rows}"] = r
    return res


# ----------------------------------------------------------------------------------------------
# Shard size
# ----------------------------------------------------------------------------------------------
