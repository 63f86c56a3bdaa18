"""Resuming a capture's shards: `--repair` checks every listed shard against its checksum, and a
shard published but not yet in the manifest (a teacher died between the two) is adopted only when
it is whole and of this capture."""

from __future__ import annotations

import hashlib
import os

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from orchestrator.console import say
from orchestrator.errors import ShardError
from orchestrator.shards.format import load_shard, read_bytes, shard_metadata
from orchestrator.shards.manifest import SHARDS_DIR, Manifest, ShardInfo


def drop_corrupt(fs, root: str, manifest: Manifest) -> None:
    """--repair: check every listed shard against its checksum; bad ones are deleted and redone."""
    bad = []
    for unit, info in sorted(manifest.shards.items()):
        path = f"{root}/{SHARDS_DIR}/{info.file}"
        if hashlib.sha256(read_bytes(fs, path)).hexdigest() != info.sha256:
            bad.append(unit)
            say(f"[yellow]repair:[/] {path} does not match its checksum; it will be recaptured")
            fs.delete_file(path)
    for unit in bad:
        del manifest.shards[unit]
    say(f"repair: {len(manifest.shards)} shards verified, {len(bad)} to recapture")


def adopt(fs, path: str, unit: int, fingerprint: str) -> ShardInfo | None:
    """Check a published-but-unrecorded shard; keep it only if it is whole and of this capture."""
    data = read_bytes(fs, path)
    try:
        table = load_shard(data, name=path)
    except ShardError as e:
        say(f"[yellow]dropping unreadable shard[/] {path}: {e}")
        fs.delete_file(path)
        return None
    meta = shard_metadata(table)
    if meta.get("fingerprint") != fingerprint or meta.get("unit") != unit:
        fs.delete_file(path)
        return None
    tokens = int(pa.compute.sum(pa.compute.list_value_length(table.column("input_ids"))).as_py())
    labelled = int(pa.compute.sum(table.column("num_labels")).as_py())
    return ShardInfo(unit, os.path.basename(path), table.num_rows, tokens, labelled, len(data),
                     hashlib.sha256(data).hexdigest())
