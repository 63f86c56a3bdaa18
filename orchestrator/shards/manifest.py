"""`manifest.json`: the list of published shards (rows, tokens, checksum), the capture's config
fingerprint, and whether the capture is complete. Only the capture driver writes it, atomically.

A shard exists for the reader only once it is in the manifest. A shard file that was published but
not yet recorded (the driver died in between) is verified and adopted on resume; `.tmp` files are
never read and are removed on resume.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from orchestrator.errors import ShardError
from orchestrator.storage import exists, write_atomic

MANIFEST = "manifest.json"
SHARDS_DIR = "shards"


@dataclass(frozen=True)
class ShardInfo:
    """What the manifest records of one shard."""

    unit: int
    file: str
    rows: int
    tokens: int
    labelled_tokens: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    fingerprint: str
    capture: dict
    """The capture settings the fingerprint covers (teacher, k, mode, data, …), for humans."""
    total_units: int
    total_records: int
    shards: dict[int, ShardInfo] = field(default_factory=dict)
    complete: bool = False
    format_version: int = 2
    """The shard format of this capture (orchestrator.shards.format.FORMAT_VERSION)."""
    updated: float = 0.0

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["shards"] = [dataclasses.asdict(s) for _, s in sorted(self.shards.items())]
        d["totals"] = {"shards": len(self.shards),
                       "rows": sum(s.rows for s in self.shards.values()),
                       "tokens": sum(s.tokens for s in self.shards.values()),
                       "bytes": sum(s.bytes for s in self.shards.values())}
        return json.dumps(d, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        d = json.loads(text)
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object, got {type(d).__name__}")
        d.pop("totals", None)
        shards = {s["unit"]: ShardInfo(**s) for s in d.pop("shards", [])}
        return cls(shards=shards, **d)


def load_manifest(fs: pafs.FileSystem, root: str) -> Manifest | None:
    path = f"{root}/{MANIFEST}"
    if not exists(fs, path):
        return None
    with fs.open_input_stream(path) as fh:
        data = fh.read()
    try:
        return Manifest.from_json(data.decode("utf-8"))
    except (ValueError, TypeError, KeyError) as e:  # not UTF-8, not JSON, wrong fields
        raise ShardError(f"{path} is not a valid raydistill manifest ({str(e)[:200]}); without "
                         "it the shards cannot be resumed: rerun the capture with "
                         "--fresh (recaptures everything), or use a new output_dir") from None


def save_manifest(fs: pafs.FileSystem, root: str, manifest: Manifest) -> None:
    """Atomic on local disks (tmp + rename) and on S3 (one PUT)."""
    manifest.updated = time.time()
    write_atomic(fs, f"{root}/{MANIFEST}", manifest.to_json().encode())


def reconcile(fs: pafs.FileSystem, root: str, manifest: Manifest, *, verify) -> tuple[int, int]:
    """Bring the manifest in line with the shards folder before resuming.

    Shards listed but missing are dropped (they will be recaptured); published shards not yet
    listed (the driver died between publish and record) are adopted if `verify(path, unit)` returns
    their ShardInfo; `.tmp` leftovers are deleted. Returns (adopted, dropped).
    """
    shards_dir = f"{root}/{SHARDS_DIR}"
    if not exists(fs, shards_dir):
        dropped = len(manifest.shards)
        manifest.shards.clear()
        return 0, dropped
    files = fs.get_file_info(pafs.FileSelector(shards_dir))
    present = {}
    for f in files:
        name = f.base_name
        if name.endswith(".tmp"):
            fs.delete_file(f.path)
        elif name.startswith("shard-") and name.endswith(".parquet"):
            present[int(name[6:-8])] = f.path
    dropped = [u for u in manifest.shards if u not in present]
    for u in dropped:
        del manifest.shards[u]
    adopted = 0
    for unit, path in sorted(present.items()):
        if unit not in manifest.shards and unit < manifest.total_units:
            info = verify(path, unit)
            if info is not None:
                manifest.shards[unit] = info
                adopted += 1
    return adopted, len(dropped)
