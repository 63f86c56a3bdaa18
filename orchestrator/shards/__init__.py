"""The soft-label store: the Parquet shard format (`format`), the manifest of a capture
(`manifest`), capture planning and its output folders (`plan`, `output`, no Ray) and what a
capture asks of a teacher (`specs`).

The reader's public names are importable from here (`from orchestrator.shards import read_shards`);
they load on first use, so importing `orchestrator.shards.manifest` does not import torch.
"""

from __future__ import annotations

_FORMAT_NAMES = ("FORMAT_VERSION", "META_KEY", "SCHEMA", "read_shards", "load_shard",
                 "decode_rows", "decode_table", "shard_name", "shard_metadata", "write_shard")

__all__ = list(_FORMAT_NAMES)


def __getattr__(name: str):
    if name in _FORMAT_NAMES:
        from orchestrator.shards import format as _format

        return getattr(_format, name)
    raise AttributeError(f"module 'orchestrator.shards' has no attribute {name!r}")
