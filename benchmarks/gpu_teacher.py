"""GPU check of the transformers teacher backend (run on a CUDA machine; no Ray or vLLM needed).

    python -m benchmarks.gpu_teacher [--layers 16 --hidden 2048 --vocab 128256]

Builds a random Llama of the given shape in bf16 (nothing downloaded), then on one batch measures
side by side: (a) a bare forward that computes logits at every position, (b) `HFBackend.score`
(decoder body + chunked LM head, log-sum-exp, top-64, host copy). Checks (b) against a dense
log-softmax reference on the same batch: same top-k ids (ties aside), log-prob error.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk-rows", type=int, default=4096)
    ap.add_argument("--profile", action="store_true", help="also time the head's parts alone")
    args = ap.parse_args()

    from transformers import LlamaForCausalLM

    from actors.hf_backend import HFBackend
    from orchestrator.driver import tiny

    cfg = tiny.llama_config(args.vocab, layers=args.layers, hidden=args.hidden,
                            heads=args.hidden // 64, max_positions=4096)
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        tiny.sharpen(model, scale=8.0)
        model.save_pretrained(d, safe_serialization=True)
        params = sum(p.numel() for p in model.parameters())
        del model
        backend = HFBackend(d, dtype="bfloat16", device="cuda", chunk_rows=args.chunk_rows,
                            batch_tokens=8192, max_length=4096)
    g = torch.Generator().manual_seed(1)
    seqs = torch.randint(0, args.vocab, (args.seqs, args.seq_len), generator=g)
    tokens = seqs.numel()
    model = backend.model

    def bare():
        with torch.inference_mode():
            for i in range(0, args.seqs, 8):
                model(input_ids=seqs[i:i + 8].cuda()).logits
        torch.cuda.synchronize()

    def ours():
        backend.score(seqs.tolist(), k=args.k)
        torch.cuda.synchronize()

    results = {}
    for name, fn in (("bare_logits_forward", bare), ("hf_backend_top64", ours)):
        fn()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        results[name] = {"tok_s": tokens / min(times),
                         "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    base = results["bare_logits_forward"]["tok_s"]
    for r in results.values():
        r["ratio"] = r["tok_s"] / base

    # correctness against a dense log-softmax on two sequences
    out = backend.score(seqs[:2].tolist(), k=args.k)
    with torch.inference_mode():
        dense = torch.log_softmax(model(input_ids=seqs[:2].cuda()).logits.float(), -1)
    vals, ids = dense.topk(args.k, -1)
    id_agree = float(sum((torch.from_numpy(o.topk_ids).cuda() == i).float().mean()
                         for o, i in zip(out, ids)) / 2)
    top1 = float(sum((torch.from_numpy(o.topk_ids[:, 0]).cuda() == i[:, 0]).float().mean()
                     for o, i in zip(out, ids)) / 2)
    lp_err = max(float((torch.from_numpy(o.topk_logprobs).cuda() - v).abs().max())
                 for o, v in zip(out, vals))
    if args.profile:
        results["head_parts_ms_per_chunk"] = _profile_head(backend, args)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "params_b": params / 1e9, "tokens": tokens, "k": args.k, **results,
              "topk_id_agreement": id_agree, "top1_agreement": top1,
              "max_abs_logprob_err": lp_err}
    print(json.dumps(report, indent=1))


def _profile_head(backend, args) -> dict:
    """Milliseconds per chunk of each step of the head on random hidden states."""
    w = backend.head.weight
    h = torch.randn(args.chunk_rows, w.shape[1], device="cuda", dtype=w.dtype)

    def ms(fn, reps=10):
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / reps * 1e3

    logits = h @ w.T
    top = logits.max(-1, keepdim=True).values
    return {"matmul": ms(lambda: h @ w.T), "topk": ms(lambda: torch.topk(logits, args.k, -1)),
            "exp_sum": ms(lambda: torch.exp(logits - top).float().sum(-1)),
            "exp_sum_fp32_acc": ms(lambda: torch.exp(logits - top).sum(-1, dtype=torch.float32)),
            "logsumexp_fp32": ms(lambda: torch.logsumexp(logits.float(), -1)),
            "topk_two_stage": ms(lambda: _two_stage_topk(logits, args.k))}


def _two_stage_topk(logits: torch.Tensor, k: int, blocks: int = 64):
    """Top-k per vocabulary block, then top-k of the candidates (same result as torch.topk)."""
    n, v = logits.shape
    width = -(-v // blocks)
    padded = torch.nn.functional.pad(logits, (0, width * blocks - v), value=float("-inf"))
    vals, idx = padded.view(n, blocks, width).topk(k, -1)
    idx = idx + torch.arange(blocks, device=logits.device).view(1, blocks, 1) * width
    vals, pick = vals.view(n, -1).topk(k, -1)
    return vals, idx.view(n, -1).gather(1, pick)


if __name__ == "__main__":
    main()
