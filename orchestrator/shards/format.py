"""The soft-label shard format: Parquet files with a documented schema (docs/shards.md).

One shard = one work unit = the soft labels of `samples_per_shard` records, written by one teacher
actor. Top-k ids (exact) and log-probs (quantised to 1/51 nat toward lower probability, delta-coded
in rank order) are stored as one-byte codes with escapes, which zstd packs close to their entropy;
each position's exact tail mass (fp32, computed before quantisation) is stored beside them.
`read_shards` decodes back to plain numpy arrays, whatever the on-disk encoding.

Writes are atomic: a local shard is written as `<name>.<pid>-<random>.tmp` and renamed; on S3 a
single PUT is atomic.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from orchestrator.shards.dirs import find_capture
from orchestrator.errors import ShardError
from orchestrator.shards.manifest import MANIFEST, SHARDS_DIR, ShardInfo, load_manifest
from orchestrator.storage import exists, filesystem, write_atomic
from orchestrator.kd.softlabels import SoftLabels

FORMAT_VERSION = 4
LOGPROB_SCALE = 51
"""Stored top-k log-probs are ceil(-logprob × 51): steps of 1/51 nat, each at most 1/51 nat below
the true value and never above (so Σ exp(stored) < 1 always). Target log-probs are rounded to
nearest (at most 1/102 ≈ 0.0098 nat off)."""
_ESC = 255
"""Byte code meaning "the value is in the row's *_ext column" (ids and log-prob deltas)."""
_UNKNOWN = np.iinfo(np.uint16).max
"""Sentinel of an unknown target log-prob (past the end of a text)."""
META_KEY = b"raydistill"
LOGPROB_SEMANTICS = ("natural-log probabilities of the teacher's raw (temperature 1) next-token "
                     "distribution, normalised over the full vocabulary")
ZSTD_LEVEL = 9
"""zstd level of shard pages: 9 packs within ~1% of level 15 at ~15× its speed (BENCHMARKS.md)."""

SCHEMA = pa.schema([
    ("sample_id", pa.string()),
    ("input_ids", pa.list_(pa.int32())),
    ("prompt_len", pa.int32()),
    ("label_start", pa.int32()),
    ("num_labels", pa.int32()),
    ("topk_id_codes", pa.binary()),
    ("topk_id_ext", pa.binary()),
    ("topk_logprob_codes", pa.binary()),
    ("topk_logprob_ext", pa.binary()),
    ("target_logprob", pa.list_(pa.uint16())),
    ("tail_mass", pa.list_(pa.float32())),
    ("loss_mask", pa.list_(pa.int32())),
])


def shard_name(unit: int) -> str:
    return f"shard-{unit:06d}.parquet"


def quantise_logprobs(lps: np.ndarray) -> np.ndarray:
    """[n, k] descending log-probs → [n, k] int64 deltas of ceil(-lp × 51) along each row.

    Rounding toward lower probability keeps every dequantised row's Σ p below the true top-k
    mass, so below 1 (round-to-nearest could lift a row with a tiny tail to Σ p ≥ 1). Differences
    within a row — all a softmax over the top-k sees — err by < 1/51 nat, as with rounding to
    nearest. A row whose fp32 log-probs themselves sum to ≥ 1 (tail below fp32 resolution) is
    lowered by one more step."""
    q = np.clip(np.ceil(-lps.astype(np.float64) * LOGPROB_SCALE), 0, 1 << 30).astype(np.int64)
    q = np.maximum.accumulate(q, axis=1)  # exact ties and rounding keep rows non-decreasing
    over = np.exp(-q / LOGPROB_SCALE).sum(axis=1) >= 1.0
    q[over] += 1
    return np.diff(q, axis=1, prepend=0)


def dequantise_logprobs(deltas: np.ndarray) -> np.ndarray:
    return -(np.cumsum(deltas.astype(np.int64), axis=-1) / LOGPROB_SCALE).astype(np.float32)


def _tail_values(sl: SoftLabels, temps: tuple[float, ...]) -> np.ndarray:
    """One row's tail masses, [n · m] float32 row-major; every row of a shard has the same
    temperatures (they are the capture's setting)."""
    if tuple(sl.tail_temperatures) != temps:
        raise ValueError(f"rows of one shard carry different tail temperatures "
                         f"({sl.tail_temperatures} vs {temps})")
    tail = np.asarray(sl.tail_mass, dtype=np.float32).reshape(len(sl.topk_ids), len(temps))
    return tail.reshape(-1)


def _split_codes(values: np.ndarray, ext_dtype) -> tuple[bytes, bytes]:
    """Small values as one byte each; values ≥ 255 as the byte 255 plus an entry in `ext`."""
    v = values.ravel()
    small = v < _ESC
    return np.where(small, v, _ESC).astype(np.uint8).tobytes(), v[~small].astype(ext_dtype).tobytes()


def _join_codes(codes: np.ndarray, ext: np.ndarray) -> np.ndarray:
    out = codes.astype(np.int64)
    out[codes == _ESC] = ext
    return out


def _encode_targets(tlp: np.ndarray) -> np.ndarray:
    q = np.clip(np.rint(-tlp.astype(np.float64) * LOGPROB_SCALE), 0, _UNKNOWN - 1)
    q[np.isnan(tlp)] = _UNKNOWN
    return q.astype(np.uint16)


def _decode_targets(q: np.ndarray) -> np.ndarray:
    out = -(q.astype(np.float32) / LOGPROB_SCALE)
    out[q == _UNKNOWN] = np.nan
    return out


def mask_to_spans(mask: np.ndarray | None) -> np.ndarray | None:
    """[T] bool learned tokens → int32 [start0, end0, start1, end1, …] ([start, end) runs of
    True); None (every token learned) stays None (a null in the shard)."""
    if mask is None:
        return None
    edges = np.flatnonzero(np.diff(np.concatenate([[0], np.asarray(mask, np.int8), [0]])))
    return edges.astype(np.int32)


def spans_to_mask(spans, length: int) -> np.ndarray:
    """The inverse of `mask_to_spans`: [length] bool, all True for None."""
    if spans is None:
        return np.ones(length, dtype=bool)
    mask = np.zeros(length, dtype=bool)
    for a, b in np.asarray(spans, dtype=np.int64).reshape(-1, 2):
        mask[a:b] = True
    return mask


def build_table(rows: list[tuple[str, SoftLabels]], meta: dict) -> pa.Table:
    """Arrow table of one shard; `meta` (teacher, tokenizer, k, mode, …) goes in the schema.

    Ids: every distinct top-k id of the shard, most frequent first, forms `id_dictionary` (in the
    metadata); an id is coded by its place c there: one byte if c < 255, else the byte 255 plus c
    in `topk_id_ext` (uint16 LE, or uint32 when the dictionary has more than 65,536 ids).
    Log-probs: per-row deltas of the quantised values in rank order (mostly < 255: one byte), with
    larger deltas as 255 plus a uint16 in `topk_logprob_ext`. zstd then packs the byte streams.
    """
    # no rows: a unit whose every record had nothing to learn within max_length (loss_mask)
    all_ids = np.concatenate([np.zeros(0, np.int64)] + [sl.topk_ids.reshape(-1) for _, sl in rows]
                             ).astype(np.int64)
    values, counts = np.unique(all_ids, return_counts=True)
    dictionary = values[np.argsort(-counts, kind="stable")]
    code_of = np.zeros(int(all_ids.max(initial=0)) + 1, dtype=np.int64)
    code_of[dictionary] = np.arange(len(dictionary))
    ext_dtype = "<u2" if len(dictionary) <= 1 << 16 else "<u4"
    cols: dict[str, list] = {name: [] for name in SCHEMA.names}
    temps = tuple(rows[0][1].tail_temperatures) if rows else (1.0,)
    for sample_id, sl in rows:
        ids = sl.topk_ids.astype(np.int64).reshape(-1)
        id_codes, id_ext = _split_codes(code_of[ids], ext_dtype)
        lp_codes, lp_ext = _split_codes(quantise_logprobs(sl.topk_logprobs), "<u2")
        cols["sample_id"].append(sample_id)
        cols["input_ids"].append(sl.input_ids.astype(np.int32))
        cols["prompt_len"].append(sl.prompt_len)
        cols["label_start"].append(sl.label_start)
        cols["num_labels"].append(len(sl.topk_ids))
        cols["topk_id_codes"].append(id_codes)
        cols["topk_id_ext"].append(id_ext)
        cols["topk_logprob_codes"].append(lp_codes)
        cols["topk_logprob_ext"].append(lp_ext)
        cols["target_logprob"].append(_encode_targets(sl.target_logprobs))
        cols["tail_mass"].append(_tail_values(sl, temps))
        cols["loss_mask"].append(mask_to_spans(sl.loss_mask))
    full_meta = {"format_version": FORMAT_VERSION, "logprob_scale": LOGPROB_SCALE,
                 "tail_temperatures": list(temps),
                 "logprob_semantics": LOGPROB_SEMANTICS, "id_dictionary": dictionary.tolist(),
                 "id_ext_bytes": int(ext_dtype[-1]), **meta}
    schema = SCHEMA.with_metadata({META_KEY: json.dumps(full_meta, sort_keys=True).encode()})
    return pa.Table.from_pydict(cols, schema=schema)


def write_shard(fs: pafs.FileSystem, shards_dir: str, unit: int,
                rows: list[tuple[str, SoftLabels]], meta: dict) -> ShardInfo:
    """Encode, checksum and atomically publish one shard; returns its manifest entry."""
    table = build_table(rows, {**meta, "unit": unit})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", compression_level=ZSTD_LEVEL,
                   use_dictionary=["sample_id"], write_statistics=False)
    data = buf.getvalue()
    name = shard_name(unit)
    write_atomic(fs, f"{shards_dir}/{name}", data)
    tokens = sum(len(sl.input_ids) for _, sl in rows)
    labelled = sum(len(sl.topk_ids) for _, sl in rows)
    return ShardInfo(unit, name, len(rows), tokens, labelled, len(data),
                     hashlib.sha256(data).hexdigest())


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as fh:
        return fh.read()


def shard_metadata(table_or_schema) -> dict:
    schema = table_or_schema.schema if hasattr(table_or_schema, "schema") else table_or_schema
    raw = (schema.metadata or {}).get(META_KEY)
    return json.loads(raw) if raw else {}


def load_shard(data: bytes, *, name: str, sha256: str | None = None) -> pa.Table:
    """Parse one shard's bytes, checking its checksum first when the manifest gives one."""
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ShardError(f"shard {name} does not match its checksum in manifest.json (truncated "
                         "or corrupt); recapture it with `raydistill capture CONFIG --repair`")
    try:
        table = pq.read_table(io.BytesIO(data))
        meta = shard_metadata(table)
    except (pa.ArrowException, OSError, ValueError) as e:  # any Arrow error; bad metadata JSON
        raise ShardError(f"shard {name} is not a readable Parquet file ({str(e)[:200]}); recapture "
                         "it with `raydistill capture CONFIG --repair`") from None
    if not meta:
        raise ShardError(f"{name} is not a raydistill shard (no '{META_KEY.decode()}' metadata)")
    if meta.get("format_version") != FORMAT_VERSION or table.schema.names != SCHEMA.names:
        raise ShardError(f"shard {name} has shard format {meta.get('format_version')} / columns "
                         f"{table.schema.names}; this raydistill reads format {FORMAT_VERSION}. "
                         "Recapture with `raydistill capture CONFIG --fresh`")
    return table


def _binary_values(table: pa.Table, name: str, dtype) -> np.ndarray:
    """All rows' bytes of a binary column, concatenated in row order, as a numpy array."""
    arr = table.column(name).combine_chunks()
    if len(arr) == 0:
        return np.zeros(0, dtype=dtype)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset:arr.offset + len(arr) + 1]
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]]
    return data.view(dtype)


def decode_table(table: pa.Table) -> dict[str, np.ndarray]:
    """Decode a whole shard at once (vectorised): flat label arrays over all rows' labels.

    Returns `topk_ids [N, k]`, `topk_logprobs [N, k]`, `target_logprobs [N]`, `tail_mass [N, m]`
    (N = Σ num_labels, in row order; column j is the tail mass at `tail_temperatures[j]`, m of
    them, 1.0 first), `tail_temperatures [m]` and `num_labels [rows]`.
    """
    meta = shard_metadata(table)
    k = int(meta["k"])
    dictionary = np.asarray(meta["id_dictionary"], dtype=np.int64)
    id_codes = _binary_values(table, "topk_id_codes", np.uint8)
    ext = _binary_values(table, "topk_id_ext", f"<u{meta['id_ext_bytes']}")
    ids = dictionary[_join_codes(id_codes, ext)] if len(dictionary) else id_codes.astype(np.int64)
    lp_codes = _binary_values(table, "topk_logprob_codes", np.uint8)
    deltas = _join_codes(lp_codes, _binary_values(table, "topk_logprob_ext", "<u2"))
    targets = table.column("target_logprob").combine_chunks().values.to_numpy(zero_copy_only=False)
    temps = np.asarray(meta["tail_temperatures"], dtype=np.float32)
    tails = table.column("tail_mass").combine_chunks().values.to_numpy(zero_copy_only=False)
    return {"tail_mass": tails.reshape(-1, len(temps)).astype(np.float32), "tail_temperatures": temps,
            "topk_ids": ids.reshape(-1, k).astype(np.int32),
            "topk_logprobs": dequantise_logprobs(deltas.reshape(-1, k)),
            "target_logprobs": _decode_targets(targets),
            "num_labels": table.column("num_labels").to_numpy()}


def decode_rows(table: pa.Table) -> Iterator[dict]:
    """Per-sample dicts: sample_id, input_ids [T], prompt_len, label_start, topk_ids [T, k] (-1 where
    a position has no label), topk_logprobs [T, k] (-inf there), target_logprobs [T] (NaN there),
    tail_mass [T, m] (NaN there; column j at temperature tail_temperatures[j]),
    tail_temperatures [m] float32 (the shard's, 1.0 first) and loss_mask [T] bool (the tokens
    that are learned; all True when the shard stores no mask for the sample)."""
    flat = decode_table(table)
    k = flat["topk_ids"].shape[1]
    ends = np.cumsum(flat["num_labels"])
    input_ids = table.column("input_ids")
    sample_ids = table.column("sample_id").to_pylist()
    prompt_lens = table.column("prompt_len").to_pylist()
    starts = table.column("label_start").to_pylist()
    masks = table.column("loss_mask").to_pylist()
    for i in range(table.num_rows):
        ids = input_ids[i].values.to_numpy(zero_copy_only=False).astype(np.int32)
        T, start = len(ids), starts[i]
        a, b = int(ends[i] - flat["num_labels"][i]), int(ends[i])
        n = b - a
        topk_ids = np.full((T, k), -1, dtype=np.int32)
        topk_lps = np.full((T, k), -np.inf, dtype=np.float32)
        target = np.full((T,), np.nan, dtype=np.float32)
        topk_ids[start:start + n] = flat["topk_ids"][a:b]
        topk_lps[start:start + n] = flat["topk_logprobs"][a:b]
        target[start:start + n] = flat["target_logprobs"][a:b]
        tail = np.full((T, flat["tail_mass"].shape[1]), np.nan, dtype=np.float32)
        tail[start:start + n] = flat["tail_mass"][a:b]
        yield {"tail_mass": tail, "tail_temperatures": flat["tail_temperatures"],
               "sample_id": sample_ids[i], "input_ids": ids, "prompt_len": prompt_lens[i],
               "label_start": start, "topk_ids": topk_ids, "topk_logprobs": topk_lps,
               "target_logprobs": target, "loss_mask": spans_to_mask(masks[i], T)}


def read_shards(path: str, *, capture: str = "main", verify: bool = True) -> Iterator[dict]:
    """Yield every sample of a capture, in unit order, as dicts of numpy arrays (see `decode_rows`).

    `path` is a capture's folder (local or s3://), its `shards/` folder, or a run's output_dir
    holding one `capture` capture (`main`, `heldout` or `bc`; several: an error listing their
    folders — `orchestrator.shards.dirs.find_capture`). Only shards listed in manifest.json are
    read, each checked against its checksum first (`verify=False` skips that).
    """
    where = find_capture(path, kind=capture)
    fs, root = filesystem(where)
    manifest = load_manifest(fs, root)
    if manifest is None:
        raise ShardError(f"{where} has shards/ but no {MANIFEST}: not a capture that can be read; "
                         "recapture it with `raydistill capture CONFIG --fresh`")
    for unit in sorted(manifest.shards):
        info = manifest.shards[unit]
        file = f"{root}/{SHARDS_DIR}/{info.file}"
        if not exists(fs, file):
            raise ShardError(f"shard {file} is listed in {MANIFEST} but missing; recapture it with "
                             "`raydistill capture CONFIG --repair`")
        table = load_shard(read_bytes(fs, file), name=file, sha256=info.sha256 if verify else None)
        yield from decode_rows(table)
