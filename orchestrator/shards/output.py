"""A capture's output folder, checked before anything is written: new, this capture (resume), an
empty leftover of other settings (replaced), or another capture (refused, with advice the refusing
command accepts). Driver-internal: `orchestrator.shards.plan` first checks every capture's output
(`check_output` only reads), then opens them (`open_output`).

An output that holds no shard holds nothing to protect: a first attempt that failed after its
manifest was written (a teacher that did not start, a capture made by an older raydistill that
checked less before writing) does not make the corrected rerun need --fresh.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pyarrow.fs as pafs

from orchestrator.errors import ConfigError, ShardError
from orchestrator.shards.manifest import MANIFEST, SHARDS_DIR, Manifest, load_manifest
from orchestrator.storage import exists
from orchestrator.console import say
from orchestrator.program import command_name

FRESH_COMMANDS = ("capture", "run", "tune", "demo")
"""The commands that take --fresh (they capture); `train` only reads captures."""


def fresh_advice(command: str, *, what: str = "that capture") -> str:
    """How to start over, in words the refusing command accepts."""
    if command in FRESH_COMMANDS:
        return f"rerun with --fresh to delete {what} and start over"
    rd = command_name()
    return (f"recapture with `{rd} capture CONFIG --fresh` (or `{rd} run CONFIG --fresh`), "
            f"which deletes {what} and starts over")


@dataclass(frozen=True)
class Found:
    """What `check_output` found: the manifest to resume (None: start a new capture) and, when
    something must go first, why (--fresh, or an empty capture of other settings)."""

    manifest: Manifest | None
    clear: str | None = None


def check_output(fs, root: str, *, where: str, fingerprint: str, keys: dict, fresh: bool,
                 command: str, key: str, path: str) -> Found:
    """Read (never write) what `root` holds and decide; a refusal is a ConfigError naming what
    differs. `where`: the output as messages name it; `key`/`path`: the config field naming this
    capture's data, and its value."""
    try:
        existing = load_manifest(fs, root)
    except ShardError:
        if not fresh:
            raise
        return Found(None, clear=f"--fresh: deleting the unreadable capture in {where}")
    has_shards = _holds_shards(fs, root, existing)
    if fresh and (existing is not None or exists(fs, f"{root}/{SHARDS_DIR}")):
        return Found(None, clear=f"--fresh: deleting the previous capture (manifest.json, "
                                 f"shards/) in {where}")
    if existing is None:
        if has_shards:
            raise ConfigError(f"output_dir {where} has a shards/ folder but no manifest.json; it "
                              "is not a capture this config can resume. Use a new output_dir, or "
                              f"{fresh_advice(command, what='it')}")
        return Found(None)
    if existing.fingerprint == fingerprint:
        return Found(existing)
    if not has_shards:
        return Found(None, clear=f"replacing the empty capture in {where} (fingerprint "
                                 f"{existing.fingerprint}, no shard captured yet) with this "
                                 f"config's ({fingerprint})")
    why = _what_changed(existing.capture.get("fingerprint_keys"), keys, key=key, path=path)
    raise ConfigError(
        f"output_dir {where} holds another capture (fingerprint {existing.fingerprint}, this "
        f"config {fingerprint}){why}; its shards would mix with these. Use a new output_dir, or "
        f"{fresh_advice(command)}")


def open_output(fs, root: str, found: Found, *, fingerprint: str, record: dict, total_units: int,
                total_records: int) -> Manifest:
    """The manifest to work with: the one found, or a new one (after clearing what `found` says
    must go). Creates the shards folder; the caller saves the manifest."""
    if found.clear:
        say(found.clear)
        delete_capture(fs, root)
    if found.manifest is not None:
        return found.manifest
    fs.create_dir(f"{root}/{SHARDS_DIR}", recursive=True)
    return Manifest(fingerprint=fingerprint, capture=record, total_units=total_units,
                    total_records=total_records)


def delete_capture(fs, root: str) -> None:
    """Delete only what a capture owns (manifest.json, shards/): other files a user keeps in
    output_dir stay."""
    if exists(fs, f"{root}/{SHARDS_DIR}"):
        fs.delete_dir(f"{root}/{SHARDS_DIR}")
    if exists(fs, f"{root}/{MANIFEST}"):
        fs.delete_file(f"{root}/{MANIFEST}")


def _holds_shards(fs, root: str, manifest: Manifest | None) -> bool:
    """A shard is listed, or a shard file lies in shards/ (published, perhaps not yet listed)."""
    if manifest is not None and manifest.shards:
        return True
    folder = f"{root}/{SHARDS_DIR}"
    if not exists(fs, folder):
        return False
    return any(f.base_name.startswith("shard-") and f.base_name.endswith(".parquet")
               for f in fs.get_file_info(pafs.FileSelector(folder)))


def _what_changed(old: dict | None, new: dict, *, key: str, path: str) -> str:
    """`: <what differs>` between a capture's recorded fingerprint keys and this config's; what
    an older raydistill recorded otherwise is said as such."""
    if not isinstance(old, dict):
        return (" (it records no settings: a capture of an older raydistill, whose fingerprints "
                "differ even for the same settings)")
    flat_old, flat_new = _flatten(old), _flatten(new)
    if flat_old.get("data.content_sha256") != flat_new.get("data.content_sha256"):
        a, b = str(flat_old.get("data.content_sha256"))[:12], flat_new["data.content_sha256"][:12]
        return f": the content of {key} {path} changed since it was captured (sha256 {a}… → {b}…)"
    changed = [k for k in sorted(set(flat_old) | set(flat_new))
               if flat_old.get(k) != flat_new.get(k)]
    older = [k for k in changed if _older_spelling(k, flat_old.get(k), flat_new.get(k))]
    listed = [f"{k} {flat_old.get(k)!r} → {flat_new.get(k)!r}" for k in changed]
    if older and older == changed:
        return (f": {', '.join(listed)} — the same teacher, recorded by an older raydistill "
                "before paths were resolved, so its fingerprint differs")
    if not changed:
        return (" (its recorded settings equal this config's: it was fingerprinted by another "
                "raydistill version)")
    return f": {', '.join(listed[:4])} differ"


def _older_spelling(key: str, old, new) -> bool:
    """The teacher path of a capture made before fingerprints used its real path."""
    return (key == "model" and isinstance(old, str) and isinstance(new, str)
            and os.path.exists(old) and os.path.realpath(old) == new)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out
