"""orchestrator.storage: the one atomic-write helper and the one storage-variable list."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestrator import storage
from orchestrator.errors import ShardError


def test_every_consumer_forwards_the_one_storage_variable_list(monkeypatch, tmp_path):
    """The teacher actors' runtime_env and a Ray Job's runtime_env both take storage.STORAGE_ENV:
    a variable added to that list (and only there) reaches both; the list holds the endpoint and
    the profile (they had drifted apart: jobs forwarded no AWS_PROFILE)."""
    from orchestrator.driver import capture_run, jobs

    assert {"AWS_ACCESS_KEY_ID", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
            "AWS_PROFILE"} <= set(storage.STORAGE_ENV)
    for name in storage.STORAGE_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(storage, "STORAGE_ENV", (*storage.STORAGE_ENV, "RAYDISTILL_TEST_STORE"))
    monkeypatch.setenv("RAYDISTILL_TEST_STORE", "x")
    monkeypatch.setenv("AWS_PROFILE", "p")
    actors = capture_run._actor_env("s3://bucket/out")["env_vars"]
    job = jobs.runtime_env(project=Path(tmp_path), output_dir="s3://bucket/out",
                           pip=False)["env_vars"]
    for env in (actors, job):
        assert env["RAYDISTILL_TEST_STORE"] == "x" and env["AWS_PROFILE"] == "p"
        assert "AWS_ACCESS_KEY_ID" not in env  # unset variables are not forwarded


def test_write_atomic_local_text_and_bytes(tmp_path):
    path = tmp_path / "a.txt"
    storage.write_atomic_local(str(path), "é\n")
    assert path.read_bytes() == "é\n".encode()
    storage.write_atomic_local(str(path), b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert os.listdir(tmp_path) == ["a.txt"]  # no .tmp left behind


def test_write_atomic_local_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "missing-dir" / "a.txt"
    with pytest.raises(ShardError, match="could not write"):
        storage.write_atomic_local(str(path), "x")
    assert not path.parent.exists()
