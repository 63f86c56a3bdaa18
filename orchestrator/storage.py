"""Where outputs live and how they are written, for every layer: `filesystem` opens a local path
or an object-store URI (pyarrow.fs), `write_atomic` publishes a file all at once (readers never see
half of it; `write_atomic_local` for a local path), `storage_env` is what carries the object-store
credentials and endpoint to processes the driver starts (teacher actors, Ray Jobs)."""

from __future__ import annotations

import os
import uuid

import pyarrow as pa
import pyarrow.fs as pafs

from orchestrator.errors import ShardError


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a URI such as `s3://bucket/prefix`."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, OSError) as e:
        raise ShardError(f"output_dir {uri} cannot be opened: {e}") from None
    return fs, path.rstrip("/")


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def write_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Publish `data` at `path` all at once: on a local disk as `<path>.<pid>-<random>.tmp`, fsync,
    rename; on an object store as one PUT. A failed write (disk full, no permission) leaves any
    previous file at `path` as it was, removes the partial `.tmp`, and raises a ShardError saying
    what happened."""
    local = isinstance(fs, pafs.LocalFileSystem)
    tmp = f"{path}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"  # two writers never share a .tmp
    try:
        if local:
            with open(tmp, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        else:
            with fs.open_output_stream(path) as out:
                out.write(data)
    except OSError as e:
        if local:
            try:
                os.remove(tmp)
            except OSError:  # never written, or the disk went read-only: resume deletes it
                pass
        raise ShardError(f"could not write {path} ({e.strerror or e}); files written before it are "
                         "intact — free space or fix permissions, then rerun to resume") from None


def write_atomic_local(path: str, data: bytes | str) -> None:
    """`write_atomic` for a local path; `data` as bytes or text (written as UTF-8)."""
    write_atomic(pafs.LocalFileSystem(), path, data.encode() if isinstance(data, str) else data)


STORAGE_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
               "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE")
"""The environment variables that carry object-store credentials and settings (pyarrow's S3
filesystem reads them) — the one list every process the driver starts gets forwarded."""


def storage_env() -> dict[str, str]:
    """The `STORAGE_ENV` variables set in this process (only those set, empty ones skipped)."""
    return {k: os.environ[k] for k in STORAGE_ENV if os.environ.get(k)}
