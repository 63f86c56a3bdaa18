"""Storage faults while capturing: a real filesystem fills up or turns read-only mid-capture.

Whatever the fault, the shards published before it stay byte-identical and listed, nothing
half-written is visible, the CLI says what happened in one line, and once the cause is fixed the
same command finishes the capture with every sample exactly once.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from orchestrator.driver.cli import main
from tests.conftest import capture_folder, write_jsonl
from tests.test_capture import assert_exactly_once


@pytest.fixture
def small_disk(tmp_path):
    """A real 4 MiB filesystem (tmpfs) of this test's own; mounting needs root (CAP_SYS_ADMIN)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        yield None
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def _fill(disk: Path) -> None:
    """Write until the kernel says ENOSPC: the disk is then really full."""
    with open(disk / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


def _read_only(disk: Path | None, shards: Path) -> None:
    if disk is not None:  # root: the whole filesystem turns read-only
        for _ in range(100):  # refused (busy) while a file on it is open for writing
            if subprocess.run(["mount", "-o", "remount,ro", str(disk)]).returncode == 0:
                return
            time.sleep(0.02)
        raise RuntimeError(f"could not remount {disk} read-only")
    else:  # without root: the folder loses its write permission
        shards.chmod(0o555)
        shards.parent.chmod(0o555)


def _undo(fault: str, disk: Path | None, shards: Path) -> None:
    if fault == "disk_full":
        os.remove(disk / "filler")
    elif disk is not None:
        subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
    else:
        shards.parent.chmod(0o755)
        shards.chmod(0o755)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["disk_full", "read_only"])
def test_a_storage_error_mid_capture_keeps_published_shards_and_resumes(
        fault, small_disk, tmp_path, tiny_teacher, texts, ray_session, monkeypatch, capsys):
    if small_disk is None and (fault == "disk_full" or os.geteuid() == 0):
        pytest.skip("needs to mount a small tmpfs (root with CAP_SYS_ADMIN)")
    base = small_disk if small_disk is not None else tmp_path
    out = base / "out"
    shards = out / "captures" / "shards"  # the capture's folder, once it exists (inject)
    data = write_jsonl(tmp_path / "d.jsonl",
                       [{"id": f"t{i}", "text": t} for i, t in enumerate(texts[:40])])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({
        "teacher": {"model": tiny_teacher, "backend": "hf", "k": 8, "num_cpus": 0.5},
        "data": {"path": data, "max_length": 64, "long_text": "truncate", "eval_fraction": 0},
        "train": {"baselines": []}, "capture": {"samples_per_shard": 4},
        "output_dir": str(out)}))
    monkeypatch.setenv("RAYDISTILL_TEST_TEACHER_DELAY_S", "0.5")  # the fault lands mid-capture
    before: dict[str, bytes] = {}

    def inject():
        deadline = time.time() + 180
        while time.time() < deadline and len(list(out.glob("captures/*/shards/*.parquet"))) < 3:
            time.sleep(0.05)
        nonlocal shards
        shards = capture_folder(out) / "shards"
        before.update({p.name: p.read_bytes() for p in shards.glob("*.parquet")})
        _fill(small_disk) if fault == "disk_full" else _read_only(small_disk, shards)

    thread = threading.Thread(target=inject, daemon=True)
    thread.start()
    try:
        code = main(["capture", str(cfg)])
    finally:
        thread.join(timeout=200)
    err = capsys.readouterr().err
    assert code == 2, err
    reason = {"disk_full": "No space left on device",
              "read_only": "Read-only file system" if small_disk else "Permission denied"}[fault]
    assert reason in err and "rerun to resume" in err and "Traceback" not in err
    assert 3 <= len(before) < 10
    for name, content in before.items():  # published before the fault: untouched
        assert (shards / name).read_bytes() == content
    listed = json.loads((shards.parent / "manifest.json").read_text())["shards"]
    assert listed and not [p for p in shards.iterdir() if p.name.endswith(".tmp")]
    for entry in listed:  # the manifest still matches the files it lists
        assert hashlib.sha256((shards / entry["file"]).read_bytes()).hexdigest() == entry["sha256"]

    _undo(fault, small_disk, shards)
    assert main(["capture", str(cfg)]) == 0
    assert_exactly_once(str(out), [f"t{i}" for i in range(40)])
    for name, content in before.items():  # resumed, not redone
        assert (shards / name).read_bytes() == content
