"""Where an output_dir keeps its captures (docs/shards.md, *Layout*): each capture — the main one,
the held-out split, the behaviour-cloning samples — in its own folder named by its kind and
fingerprint, `output_dir/captures/<kind>-<fingerprint>/` (manifest.json, shards/; a bc capture
also its prompts file). A config finds its captures by computing their fingerprints
(`orchestrator.shards.plan`), so configs of other settings or other data share one output_dir
without mixing: each has its own folders.

Captures of the previous layout (manifest.json and shards/ directly in output_dir, heldout/,
bc/) are listed too; a config whose fingerprint matches one resumes it in place.

    read_shards("runs/quickstart")   # its one main capture; `find_capture` says which
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pyarrow.fs as pafs

from orchestrator.errors import ShardError
from orchestrator.shards.manifest import MANIFEST, SHARDS_DIR, Manifest, load_manifest
from orchestrator.storage import exists, filesystem

CAPTURES_DIR = "captures"
KINDS = ("main", "heldout", "bc")
"""`capture_plan.CaptureKind` values: the first part of a capture folder's name."""
_OLD_DIRS = {"main": "", "heldout": "heldout", "bc": "bc"}
"""Where the previous layout kept each kind, under output_dir."""
_NAME = re.compile(r"^(main|heldout|bc)-([0-9a-f]+)$")


def join(base: str, name: str) -> str:
    """`base/name` ('' → base); a URI's query (`?endpoint_override=…` of S3-compatible stores)
    stays last."""
    if not name:
        return base
    path, sep, query = base.partition("?")
    return f"{path.rstrip('/')}/{name}{sep}{query}"


def capture_dir(output_dir: str, *, kind: str, fingerprint: str) -> str:
    """The folder of the `kind` capture with this fingerprint."""
    return join(output_dir, f"{CAPTURES_DIR}/{kind}-{fingerprint}")


def old_layout_dir(output_dir: str, *, kind: str) -> str:
    """Where the previous layout kept a `kind` capture."""
    return join(output_dir, _OLD_DIRS[kind])


@dataclass(frozen=True)
class StoredCapture:
    """A capture folder found in an output_dir."""

    kind: str
    uri: str
    manifest: Manifest | None
    """None: shards without a manifest, or a manifest that cannot be read (`problem`)."""
    old_layout: bool
    problem: str | None = None

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.manifest.shards.values()) if self.manifest else 0

    def describe(self) -> str:
        """One line: where it is, and what it holds."""
        if self.manifest is None:
            return f"{self.uri} ({self.problem or 'shards/ without manifest.json'})"
        m = self.manifest
        data = (m.capture.get("data") or {}).get("path") if isinstance(m.capture, dict) else None
        return (f"{self.uri} ({len(m.shards)}/{m.total_units} shards, "
                f"{sum(s.rows for s in m.shards.values())} samples"
                + (f", data {data}" if data else "") + ")")


def list_captures(output_dir: str) -> list[StoredCapture]:
    """Every capture of an output_dir: the folders of captures/ (main, held-out, bc), then those
    of the previous layout (output_dir itself, heldout/, bc/) holding manifest.json or shards/."""
    fs, root = filesystem(output_dir)
    found = []
    infos = fs.get_file_info(pafs.FileSelector(f"{root}/{CAPTURES_DIR}", allow_not_found=True))
    named = [(info, _NAME.match(info.base_name)) for info in infos]
    for info, match in sorted(((i, m) for i, m in named if m), key=lambda im: (
            KINDS.index(im[1][1]), im[0].base_name)):  # main, held-out, bc; then by name
        if info.type == pafs.FileType.Directory:
            uri = join(output_dir, f"{CAPTURES_DIR}/{info.base_name}")
            found.append(_stored(fs, info.path, uri=uri, kind=match[1], old_layout=False))
    for kind, sub in _OLD_DIRS.items():
        path = f"{root}/{sub}" if sub else root
        if exists(fs, f"{path}/{MANIFEST}") or exists(fs, f"{path}/{SHARDS_DIR}"):
            found.append(_stored(fs, path, uri=join(output_dir, sub), kind=kind, old_layout=True))
    return found


def find_capture(path: str, *, kind: str = "main") -> str:
    """The capture folder `path` names: a capture folder itself (or its shards/ folder), or an
    output_dir holding exactly one capture of `kind`. Several, or none: a ShardError listing
    what there is."""
    fs, root = filesystem(path)
    base, sep, query = path.partition("?")
    if (root.endswith("/" + SHARDS_DIR) and not exists(fs, f"{root}/{MANIFEST}")
            and exists(fs, f"{root[: -len(SHARDS_DIR) - 1]}/{MANIFEST}")):
        return base.rstrip("/")[: -len(SHARDS_DIR) - 1] + sep + query
    stored = list_captures(path)
    mine = [c for c in stored if c.kind == kind]
    if len(mine) == 1:
        return mine[0].uri
    if not mine and exists(fs, f"{root}/{MANIFEST}"):
        return path  # a capture folder of another kind, named directly
    if len(mine) > 1:
        listed = "\n  ".join(c.describe() for c in mine)
        raise ShardError(f"{path} holds {len(mine)} {kind} captures (one per config that "
                         f"captured there); pass the folder of the one you mean:\n  {listed}")
    others = f" (it holds {', '.join(sorted({c.kind for c in stored}))} captures)" if stored else ""
    raise ShardError(f"{path} has no {MANIFEST} and no {kind} capture in {CAPTURES_DIR}/"
                     f"{others}; point at a capture's folder or a run's output_dir (run "
                     "`raydistill capture CONFIG` first)")


def _stored(fs, path: str, *, uri: str, kind: str, old_layout: bool) -> StoredCapture:
    try:
        manifest = load_manifest(fs, path)
    except ShardError:
        return StoredCapture(kind, uri, None, old_layout, problem="unreadable manifest.json")
    return StoredCapture(kind, uri, manifest, old_layout)
