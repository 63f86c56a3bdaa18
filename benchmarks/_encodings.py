"""Shard size of the product encoding next to alternative encodings explored for the record."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np

from benchmarks._common import K, NAIVE_BYTES, Q, stack


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

    from orchestrator.shards import format as shards

    rows = [(f"s{i}", sl) for i, sl in enumerate(sls)]
    tokens = sum(len(s) for s in seqs)
    ids = stack(sls, "topk_ids").astype(np.int32)
    lps = stack(sls, "topk_logprobs").astype(np.float32)
    tlp = stack(sls, "target_logprobs").astype(np.float32)
    result: dict = {"tokens": tokens, "k": K, "naive": NAIVE_BYTES, "encodings": []}

    # ---- the product: orchestrator.shards.format.write_shard, read back with load_shard + decode_rows
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
        "name": f"`orchestrator.shards.format.write_shard` (format {smeta.get('format_version')}, "
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
