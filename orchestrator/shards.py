"""The soft-label shard format: Parquet files with a documented schema (docs/shards.md).

One shard = one work unit = the soft labels of `samples_per_shard` records, written by one teacher
actor. Log-probs are stored quantised to 1/64 nat (error ≤ 1/128 nat) as per-row deltas in rank order,
which are small integers that Parquet's dictionary encoding and zstd pack tightly; ids are stored in
rank order. `read_shards` decodes back to plain numpy arrays, whatever the on-disk encoding.

Writes are atomic: a local shard is written as `<name>.tmp` and renamed; on S3 a single PUT is atomic.
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

from orchestrator.errors import ShardError
from orchestrator.manifest import MANIFEST, SHARDS_DIR, ShardInfo, exists, filesystem, load_manifest
from orchestrator.softlabels import SoftLabels

FORMAT_VERSION = 1
LOGPROB_SCALE = 64
"""Stored log-probs are round(-logprob × 64): 1/64-nat steps, at most 1/128 nat off."""
_UNKNOWN = np.iinfo(np.uint16).max
"""Sentinel of an unknown target log-prob (past the end of a text)."""
META_KEY = b"raydistill"
LOGPROB_SEMANTICS = ("natural-log probabilities of the teacher's raw (temperature 1) next-token "
                     "distribution, normalised over the full vocabulary")

SCHEMA = pa.schema([
    ("sample_id", pa.string()),
    ("input_ids", pa.list_(pa.int32())),
    ("prompt_len", pa.int32()),
    ("label_start", pa.int32()),
    ("topk_ids", pa.list_(pa.int32())),
    ("topk_logprob_deltas", pa.list_(pa.uint16())),
    ("target_logprob", pa.list_(pa.uint16())),
])


def shard_name(unit: int) -> str:
    return f"shard-{unit:06d}.parquet"


def encode_logprobs(lps: np.ndarray) -> np.ndarray:
    """[n, k] descending log-probs → [n, k] uint16 deltas of round(-lp × 64) along each row."""
    q = np.clip(np.rint(-lps.astype(np.float64) * LOGPROB_SCALE), 0, _UNKNOWN - 1).astype(np.int64)
    q = np.maximum.accumulate(q, axis=1)  # exact ties and rounding keep rows non-decreasing
    d = np.diff(q, axis=1, prepend=0)
    return d.astype(np.uint16)


def decode_logprobs(deltas: np.ndarray) -> np.ndarray:
    return -(np.cumsum(deltas.astype(np.int64), axis=-1) / LOGPROB_SCALE).astype(np.float32)


def _encode_targets(tlp: np.ndarray) -> np.ndarray:
    q = np.clip(np.rint(-tlp.astype(np.float64) * LOGPROB_SCALE), 0, _UNKNOWN - 1)
    q[np.isnan(tlp)] = _UNKNOWN
    return q.astype(np.uint16)


def _decode_targets(q: np.ndarray) -> np.ndarray:
    out = -(q.astype(np.float32) / LOGPROB_SCALE)
    out[q == _UNKNOWN] = np.nan
    return out


def build_table(rows: list[tuple[str, SoftLabels]], meta: dict) -> pa.Table:
    """Arrow table of one shard; `meta` (teacher, tokenizer, k, mode, …) goes in the schema."""
    cols: dict[str, list] = {name: [] for name in SCHEMA.names}
    for sample_id, sl in rows:
        cols["sample_id"].append(sample_id)
        cols["input_ids"].append(sl.input_ids.astype(np.int32))
        cols["prompt_len"].append(sl.prompt_len)
        cols["label_start"].append(sl.label_start)
        cols["topk_ids"].append(sl.topk_ids.astype(np.int32).reshape(-1))
        cols["topk_logprob_deltas"].append(encode_logprobs(sl.topk_logprobs).reshape(-1))
        cols["target_logprob"].append(_encode_targets(sl.target_logprobs))
    full_meta = {"format_version": FORMAT_VERSION, "logprob_scale": LOGPROB_SCALE,
                 "logprob_semantics": LOGPROB_SEMANTICS, **meta}
    schema = SCHEMA.with_metadata({META_KEY: json.dumps(full_meta, sort_keys=True).encode()})
    return pa.Table.from_pydict(cols, schema=schema)


def write_shard(fs: pafs.FileSystem, shards_dir: str, unit: int,
                rows: list[tuple[str, SoftLabels]], meta: dict) -> ShardInfo:
    """Encode, checksum and atomically publish one shard; returns its manifest entry."""
    table = build_table(rows, {**meta, "unit": unit})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", compression_level=9, use_dictionary=True,
                   write_statistics=False)
    data = buf.getvalue()
    name = shard_name(unit)
    final = f"{shards_dir}/{name}"
    local = isinstance(fs, pafs.LocalFileSystem)
    target = final + ".tmp" if local else final
    with fs.open_output_stream(target) as out:
        out.write(data)
    if local:
        fs.move(target, final)
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
    except (pa.ArrowInvalid, OSError) as e:
        raise ShardError(f"shard {name} is not a readable Parquet file ({e}); recapture it with "
                         "`raydistill capture CONFIG --repair`") from None
    if not shard_metadata(table):
        raise ShardError(f"{name} is not a raydistill shard (no '{META_KEY.decode()}' metadata)")
    return table


def decode_rows(table: pa.Table) -> Iterator[dict]:
    """Per-sample dicts: sample_id, input_ids [T], prompt_len, label_start, topk_ids [T, k] (-1 where
    a position has no label), topk_logprobs [T, k] (-inf there), target_logprobs [T] (NaN there)."""
    k = int(shard_metadata(table)["k"])
    cols = {name: table.column(name) for name in SCHEMA.names}
    for i in range(table.num_rows):
        ids = cols["input_ids"][i].values.to_numpy(zero_copy_only=False)
        T = len(ids)
        start = cols["label_start"][i].as_py()
        top = cols["topk_ids"][i].values.to_numpy(zero_copy_only=False).reshape(-1, k)
        deltas = cols["topk_logprob_deltas"][i].values.to_numpy(zero_copy_only=False).reshape(-1, k)
        tq = cols["target_logprob"][i].values.to_numpy(zero_copy_only=False)
        n = len(top)
        topk_ids = np.full((T, k), -1, dtype=np.int32)
        topk_lps = np.full((T, k), -np.inf, dtype=np.float32)
        target = np.full((T,), np.nan, dtype=np.float32)
        topk_ids[start:start + n] = top
        topk_lps[start:start + n] = decode_logprobs(deltas)
        target[start:start + n] = _decode_targets(tq)
        yield {"sample_id": cols["sample_id"][i].as_py(), "input_ids": ids.astype(np.int32),
               "prompt_len": cols["prompt_len"][i].as_py(), "label_start": start,
               "topk_ids": topk_ids, "topk_logprobs": topk_lps, "target_logprobs": target}


def read_shards(path: str, *, verify: bool = True) -> Iterator[dict]:
    """Yield every sample of a capture, in unit order, as dicts of numpy arrays (see `decode_rows`).

    `path` is a capture's output_dir (local or s3://) or its `shards/` folder. Only shards listed in
    manifest.json are read, each checked against its checksum first (`verify=False` skips that).
    """
    fs, root = filesystem(path)
    if root.endswith("/" + SHARDS_DIR) and not exists(fs, f"{root}/{MANIFEST}"):
        root = root[: -len(SHARDS_DIR) - 1]
    manifest = load_manifest(fs, root)
    if manifest is None:
        raise ShardError(f"{path} has no {MANIFEST}; point at a capture's output_dir "
                         "(run `raydistill capture CONFIG` first)")
    for unit in sorted(manifest.shards):
        info = manifest.shards[unit]
        file = f"{root}/{SHARDS_DIR}/{info.file}"
        if not exists(fs, file):
            raise ShardError(f"shard {file} is listed in {MANIFEST} but missing; recapture it with "
                             "`raydistill capture CONFIG --repair`")
        table = load_shard(read_bytes(fs, file), name=file, sha256=info.sha256 if verify else None)
        yield from decode_rows(table)
