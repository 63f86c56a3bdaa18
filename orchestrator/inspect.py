"""`raydistill inspect OUTPUT_DIR`: a capture's manifest totals and shard metadata, as text."""

from __future__ import annotations

import json

from orchestrator.errors import ShardError
from orchestrator.manifest import SHARDS_DIR, filesystem, load_manifest
from orchestrator.shards import load_shard, read_bytes, shard_metadata


def describe(output_dir: str) -> str:
    fs, root = filesystem(output_dir)
    manifest = load_manifest(fs, root)
    if manifest is None:
        raise ShardError(f"{output_dir} has no manifest.json; it is not a capture output_dir")
    shards = manifest.shards
    tokens = sum(s.tokens for s in shards.values())
    size = sum(s.bytes for s in shards.values())
    lines = [f"capture {output_dir}",
             f"  fingerprint {manifest.fingerprint}   complete: {manifest.complete}",
             f"  shards {len(shards)}/{manifest.total_units}   samples "
             f"{sum(s.rows for s in shards.values())}   tokens {tokens}   "
             f"{size / max(tokens, 1):.1f} B/token"]
    if shards:
        first = shards[min(shards)]
        table = load_shard(read_bytes(fs, f"{root}/{SHARDS_DIR}/{first.file}"), name=first.file)
        meta = shard_metadata(table)
        meta["id_dictionary"] = f"<{len(meta.get('id_dictionary', []))} ids>"
        lines.append("  metadata of " + first.file + " " +
                     json.dumps(meta, indent=2, sort_keys=True).replace("\n", "\n  "))
    return "\n".join(lines)
