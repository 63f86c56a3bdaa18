"""A capture's folder, found and checked before anything is written. Driver-internal:
`orchestrator.shards.plan` first locates every capture of a config (`locate` only reads), then
opens them (`open_output`).

A capture lives in the folder its kind and fingerprint name (`orchestrator.shards.dirs`), so a
config of other settings or other data captures into a folder of its own: nothing is refused,
mixed or deleted because another config captured in the same output_dir. A folder of this
config's name that holds shards but no manifest, or a manifest of another fingerprint, cannot be
resumed and is refused with advice the refusing command accepts.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow.fs as pafs

from orchestrator.shards.dirs import capture_dir, list_captures, old_layout_dir
from orchestrator.errors import ConfigError, ShardError
from orchestrator.shards.manifest import MANIFEST, SHARDS_DIR, Manifest, load_manifest
from orchestrator.storage import exists, filesystem
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
    """Where a config's capture lives (`where`), the manifest to resume there (None: start a new
    capture) and, with --fresh, the folders whose capture is deleted first: (uri, whole folder?)."""

    where: str
    manifest: Manifest | None
    clear: tuple[tuple[str, bool], ...] = ()


def locate(output_dir: str, *, kind: str, fingerprint: str, fresh: bool, command: str) -> Found:
    """Find (never write) the `kind` capture of this fingerprint in `output_dir`: its folder under
    captures/ — or the previous layout's folder of `kind` when that holds this very capture
    (resumed in place). --fresh deletes whichever holds it and starts over under captures/. A
    command that does not capture (`train`) refuses a capture that is not there, naming the
    commands that capture it."""
    folder = capture_dir(output_dir, kind=kind, fingerprint=fingerprint)
    old = old_layout_dir(output_dir, kind=kind)
    clear = []
    old_manifest = _readable_manifest(old)
    if old_manifest is not None and old_manifest.fingerprint == fingerprint:
        if not fresh:
            return Found(old, old_manifest)
        clear.append((old, old != output_dir))  # output_dir itself: only what the capture owns
    fs, root = filesystem(folder)
    try:
        existing = load_manifest(fs, root)
    except ShardError:
        if not fresh:
            raise
        return Found(folder, None, (*clear, (folder, True)))
    if fresh:
        held = existing is not None or exists(fs, f"{root}/{SHARDS_DIR}")
        return Found(folder, None, (*clear, (folder, True)) if held else tuple(clear))
    if existing is None:
        if _holds_shards(fs, root):
            raise ConfigError(f"{folder} has a shards/ folder but no {MANIFEST}; it is not a "
                              "capture this config can resume. Delete the folder, or "
                              f"{fresh_advice(command, what='it')}")
        if command not in FRESH_COMMANDS:
            _refuse_missing(output_dir, kind=kind, folder=folder)
        return Found(folder, None)
    if existing.fingerprint != fingerprint:
        raise ConfigError(f"{folder} holds a capture of fingerprint {existing.fingerprint}, not "
                          f"the {fingerprint} its name says (a folder copied or renamed by hand); "
                          f"delete the folder, or {fresh_advice(command, what='it')}")
    return Found(folder, existing)


def say_others(output_dir: str, *, mine: set[str]) -> None:
    """A capture was started in `output_dir`: if it holds captures other than `mine` (folders),
    say so in one line — they are kept, each in its own folder."""
    others = [c for c in list_captures(output_dir) if c.uri not in mine]
    if not others:
        return
    old = sum(c.old_layout for c in others)
    size = sum(c.bytes for c in others) / 1e6
    say(f"{output_dir} also holds {len(others)} other capture(s) ({size:.1f} MB"
        + (f"; {old} in the previous layout" if old else "") + ") of other settings or data: "
        f"kept; `{command_name()} inspect {output_dir}` lists them")


def _refuse_missing(output_dir: str, *, kind: str, folder: str) -> None:
    rd = command_name()
    what = {"main": "capture", "heldout": "held-out capture",
            "bc": "behaviour-cloning capture"}[kind]
    others = len(list_captures(output_dir))
    raise ConfigError(
        f"this config's {what} is not in {output_dir} yet (it goes to {folder}); "
        f"`{rd} capture CONFIG` captures it, or `{rd} run CONFIG` captures and trains"
        + (f". {output_dir} holds {others} capture(s) of other settings or data: `{rd} inspect "
           f"{output_dir}` lists them" if others else ""))


def open_output(found: Found, *, fingerprint: str, record: dict, total_units: int,
                total_records: int) -> Manifest:
    """The manifest to work with: the one found, or a new one (after deleting what --fresh
    deletes). Creates the shards folder; the caller saves the manifest."""
    for uri, whole in found.clear:
        say(f"--fresh: deleting this config's capture{'' if whole else ' (manifest.json, shards/)'}"
            f" in {uri}")
        delete_capture(uri, whole=whole)
    if found.manifest is not None:
        return found.manifest
    fs, root = filesystem(found.where)
    fs.create_dir(f"{root}/{SHARDS_DIR}", recursive=True)
    return Manifest(fingerprint=fingerprint, capture=record, total_units=total_units,
                    total_records=total_records)


def delete_capture(uri: str, *, whole: bool) -> None:
    """Delete a capture: its whole folder, or (an output_dir of the previous layout) only what the
    capture owns there — manifest.json and shards/; other files a user keeps there stay."""
    fs, root = filesystem(uri)
    if whole:
        if exists(fs, root):
            fs.delete_dir(root)
        return
    if exists(fs, f"{root}/{SHARDS_DIR}"):
        fs.delete_dir(f"{root}/{SHARDS_DIR}")
    if exists(fs, f"{root}/{MANIFEST}"):
        fs.delete_file(f"{root}/{MANIFEST}")


def _readable_manifest(uri: str) -> Manifest | None:
    try:
        return load_manifest(*filesystem(uri))
    except ShardError:  # not this config's capture to resume; left as it is
        return None


def _holds_shards(fs, root: str) -> bool:
    """A shard file lies in shards/ (published, perhaps not yet listed)."""
    folder = f"{root}/{SHARDS_DIR}"
    if not exists(fs, folder):
        return False
    return any(f.base_name.startswith("shard-") and f.base_name.endswith(".parquet")
               for f in fs.get_file_info(pafs.FileSelector(folder)))
