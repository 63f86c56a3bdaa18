"""End-to-end capture: real Ray actors, real engines, real shards; exactly-once under faults."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from orchestrator.driver.cli import main
from orchestrator.errors import ConfigError, DataError, ShardError
from orchestrator.driver.pipeline import capture
from orchestrator.shards.format import META_KEY, decode_rows, load_shard, read_shards
from tests.conftest import (assert_split_main_truncated_heldout, capture_config, capture_folder,
                            write_jsonl)


def ids_of(out: str) -> list[str]:
    return [r["sample_id"] for r in read_shards(out)]


def assert_exactly_once(out: str, expected: list[str]) -> None:
    got = ids_of(out)
    dupes = [i for i, c in collections.Counter(got).items() if c > 1]
    assert not dupes, f"duplicated: {dupes[:5]}"
    assert sorted(got) == sorted(expected)


@pytest.fixture
def dataset(tmp_path, texts):
    return write_jsonl(tmp_path / "d.jsonl", [{"id": f"t{i}", "text": t} for i, t in enumerate(texts[:40])])


def test_hf_score_capture_via_cli(tmp_path, tiny_teacher, dataset, ray_session, capsys):
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(f"teacher: {{model: {tiny_teacher}, backend: hf, k: 8, num_cpus: 0.5}}\n"
                        f"data: {{path: {dataset}, max_length: 64, long_text: split, "
                        "eval_fraction: 0}\n"
                        f"capture: {{samples_per_shard: 8}}\noutput_dir: {tmp_path / 'out'}\n")
    assert main(["capture", str(cfg_path), "--set", "teacher.num_actors=2"]) == 0
    # the behaviour-cloning baseline's samples were captured beside (train.baselines default)
    bc = list(read_shards(str(tmp_path / "out"), capture="bc"))
    assert {r["sample_id"].split("#")[0] for r in bc} == {f"t{i}" for i in range(40)}
    assert all(r["prompt_len"] < len(r["input_ids"]) for r in bc)
    rows = list(read_shards(str(tmp_path / "out")))
    # texts longer than 64 tokens were split into pieces with stable ids
    assert any("#p1" in r["sample_id"] for r in rows)
    assert {r["sample_id"].split("#")[0] for r in rows} == {f"t{i}" for i in range(40)}
    assert all(len(r["input_ids"]) <= 64 for r in rows)
    # the shards hold what the backend computes
    from actors.hf_backend import HFBackend

    ref = HFBackend(tiny_teacher).score([list(rows[0]["input_ids"])], k=8)[0]
    np.testing.assert_array_equal(rows[0]["topk_ids"], ref.topk_ids)
    # format 3 rounds top-k log-probs toward lower probability (Σp < 1): at most 1/51 nat below
    err = rows[0]["topk_logprobs"] - ref.topk_logprobs
    assert err.max() <= 1e-5 and err.min() >= -1 / 51 - 1e-5
    np.testing.assert_allclose(rows[0]["tail_mass"][:, 0], ref.tail_mass[:, 0], rtol=1e-6)
    # rerun: nothing to do
    assert main(["capture", str(cfg_path)]) == 0
    assert "capture: complete" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "out")]) == 0


@pytest.mark.parametrize("heldout", ["eval_fraction", "eval_path"])
def test_capture_splits_the_main_texts_and_truncates_the_heldout_split(
        heldout, tmp_path, tiny_teacher, texts, ray_session):
    """`capture` with long_text: split and a held-out split: the main capture runs first and
    starts the engine, yet the held-out capture after it on the same engine is truncated (its
    documented policy), and the main one is split, none of it truncated."""
    main = {f"t{i}": t for i, t in enumerate(texts[:24])}
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": i, "text": t} for i, t in main.items()])
    sets = {"data.long_text": "split", "data.max_length": 64, "train.eval_samples": 16}
    if heldout == "eval_path":
        held = {f"e{i}": t for i, t in enumerate(texts[60:66])}
        sets["data.eval_path"] = write_jsonl(tmp_path / "e.jsonl",
                                             [{"id": i, "text": t} for i, t in held.items()])
    else:
        held = {}
        sets["data.eval_fraction"] = 0.25
    cfg = capture_config(tmp_path, tiny_teacher, data, **sets)
    capture(cfg)
    assert_split_main_truncated_heldout(cfg.output_dir, tiny_teacher, main | held, max_length=64)


def test_one_engine_serves_captures_with_their_own_settings(tmp_path, tiny_teacher, dataset,
                                                            ray_session):
    """One pool (real Ray actor, transformers engine), two captures with different k, length and
    long-text policy, one after the other and back: each unit is labelled as its own capture
    says, whichever capture ran first on the engine."""
    from actors.pool import TeacherPool
    from orchestrator import data as data_mod
    from orchestrator.storage import filesystem

    records = data_mod.iter_records(data_mod.dataset_files(dataset), field="text",
                                    fallback_field=None, id_field="id", on_bad_line="stop",
                                    limit=8)
    units = list(data_mod.units(records, 4))
    specs = {"a": _capture_spec(str(tmp_path / "a"), k=4, max_length=48, long_text="truncate"),
             "b": _capture_spec(str(tmp_path / "b"), k=8, max_length=96, long_text="split"),
             "c": _capture_spec(str(tmp_path / "c"), k=2, max_length=32, long_text="split")}
    for spec in specs.values():
        filesystem(spec.output_dir)[0].create_dir(f"{spec.output_dir}/shards", recursive=True)
    pool = TeacherPool(_engine(tiny_teacher), num_actors=1, num_cpus=0.5, num_gpus=0,
                       log=lambda m: None)
    try:
        assert pool.wait_ready()["max_k"] >= 8
        for name in ("a", "b", "c"):
            pool.run(units, lambda info: None, capture=specs[name])
    finally:
        pool.shutdown()
    for name, spec in specs.items():
        files = sorted(Path(spec.output_dir, "shards").glob("*.parquet"))
        assert len(files) == 2
        rows = [r for f in files for r in decode_rows(load_shard(f.read_bytes(), name=str(f)))]
        assert {r["topk_ids"].shape[1] for r in rows} == {spec.k}
        assert max(len(r["input_ids"]) for r in rows) == spec.max_length
        split = any("#p" in r["sample_id"] for r in rows)
        assert split == (spec.long_text == "split"), name
        meta = json.loads(pq.read_schema(files[0]).metadata[META_KEY])
        assert (meta["k"], meta["max_length"], meta["long_text"]) == \
            (spec.k, spec.max_length, spec.long_text)


def test_sample_mode_capture(tmp_path, tiny_teacher, texts, ray_session):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": t[:80]} for t in texts[:6]])
    cfg = capture_config(tmp_path, tiny_teacher, data, **{
        "teacher.mode": "sample", "teacher.num_samples": 2, "teacher.max_new_tokens": 8,
        "teacher.temperature": 0.7})
    capture(cfg)
    rows = list(read_shards(cfg.output_dir))
    assert len(rows) == 12 and rows[0]["sample_id"].endswith("#s0")
    for r in rows:
        start, T = r["label_start"], len(r["input_ids"])
        assert start == r["prompt_len"] - 1 and T - r["prompt_len"] <= 8
        assert (r["topk_ids"][start:T - 1] >= 0).all() and (r["topk_ids"][:start] == -1).all()
        # the teacher's log-prob of each sampled token is known
        assert np.isfinite(r["target_logprobs"][start:T - 1]).all()


@pytest.mark.slow
def test_vllm_capture_two_actors(tmp_path, tiny_teacher, dataset, ray_session):
    cfg = capture_config(tmp_path, tiny_teacher, dataset, **{
        "teacher.backend": "vllm", "teacher.num_actors": 2, "teacher.kv_cache_gib": 0.25,
        "teacher.dtype": "float32", "data.long_text": "truncate", "data.max_length": 96})
    manifest = capture(cfg)
    assert manifest.complete and len(manifest.shards) == 5
    assert_exactly_once(cfg.output_dir, [f"t{i}" for i in range(40)])
    row = next(iter(read_shards(cfg.output_dir)))
    from actors.hf_backend import HFBackend

    ref = HFBackend(tiny_teacher).score([list(row["input_ids"])], k=8)[0]
    assert (row["topk_ids"][:, 0] == ref.topk_ids[:, 0]).mean() > 0.95
    assert np.abs(row["topk_logprobs"] - ref.topk_logprobs).max() < 0.02


def test_a_cpu_teacher_actor_runs_its_vllm_engine_in_its_own_process(tiny_teacher, ray_session):
    """No GPU: the engine core is not two more processes beside the actor (each importing torch and
    vLLM again, ~17 s a start) but runs in the actor, on the threads its num_cpus gives it."""
    import psutil

    from actors.pool import TeacherPool

    pool = TeacherPool(_engine(tiny_teacher, backend="vllm", kv_cache_gib=0.25, max_model_len=128),
                       num_actors=1, num_cpus=1, num_gpus=0, log=lambda m: None)
    try:
        pool.wait_ready()
        actor = psutil.Process(pool.ready_info[0]["pid"])
        assert [p.name() for p in actor.children(recursive=True)] == []
        assert pool.ready_info[0]["vocab_size"] == 1024  # the engine is up, in that process
    finally:
        pool.shutdown()


def test_the_user_s_engine_process_setting_wins(monkeypatch):
    from actors import engine_process

    monkeypatch.setenv(engine_process.ENV, "1")
    engine_process.engine_core_in_this_process()
    assert os.environ[engine_process.ENV] == "1"
    monkeypatch.delenv(engine_process.ENV)
    engine_process.engine_core_in_this_process()
    assert os.environ[engine_process.ENV] == "0"  # no GPU here


@pytest.mark.parametrize("how", ["process SIGKILL", "ray.kill"])
def test_actor_killed_midway_is_replaced(how, tmp_path, tiny_teacher, dataset, ray_session):
    import ray

    from actors.pool import TeacherPool
    from orchestrator import data as data_mod
    from orchestrator.storage import filesystem

    cfg = capture_config(tmp_path, tiny_teacher, dataset, **{"capture.samples_per_shard": 4})
    filesystem(cfg.output_dir)[0].create_dir(f"{cfg.output_dir}/shards", recursive=True)
    pool = TeacherPool(_engine(tiny_teacher), num_actors=1, num_cpus=0.5, num_gpus=0,
                       log=lambda m: None)
    pool.wait_ready()
    done = []

    def on_shard(info):
        done.append(info.unit)
        if len(done) == 2:  # kill the actor while it holds the next units
            if how == "ray.kill":
                ray.kill(pool.actors[0], no_restart=True)
            else:
                os.kill(pool.ready_info[0]["pid"], signal.SIGKILL)

    records = data_mod.iter_records(data_mod.dataset_files(dataset), field="text",
                                    fallback_field=None, id_field="id", on_bad_line="stop")
    units = list(data_mod.units(records, 4))
    try:
        pool.run(units, on_shard, capture=_capture_spec(cfg.output_dir, k=8, max_length=128))
    finally:
        pool.shutdown()
    assert pool.replacements == 1
    assert sorted(done) == list(range(10))  # every unit exactly once, none lost
    import pyarrow.parquet as pq

    from orchestrator.shards.format import shard_name

    files = sorted(Path(cfg.output_dir, "shards").iterdir())
    assert [p.name for p in files] == [shard_name(u) for u in range(10)]  # no .tmp left over
    ids = [i for p in files for i in pq.read_table(p, columns=["sample_id"])["sample_id"].to_pylist()]
    assert len(ids) == len(set(ids))  # no piece twice
    assert {i.split("#")[0] for i in ids} == {f"t{i}" for i in range(40)}  # no sample lost


def _engine(model: str, **overrides):
    """A transformers-backend engine spec for pool tests (score mode)."""
    from orchestrator.shards.specs import EngineSpec

    return EngineSpec(**{"backend": "hf", "model": model, "revision": None, "mode": "score",
                         "max_k": 8, "dtype": "float32", "scoring": "hidden",
                         "memory_fraction": 0.15, "kv_cache_gib": None, "max_model_len": None,
                         "tensor_parallel_size": 1, "chunk_rows": 512, "batch_tokens": 8192,
                         "seed": 0} | overrides)


def _capture_spec(output_dir: str, *, k: int, max_length: int, long_text: str = "split"):
    from orchestrator.shards.specs import CaptureSpec

    return CaptureSpec(output_dir=output_dir, mode="score", k=k, max_length=max_length,
                       long_text=long_text, shard_meta={"fingerprint": "x"})


def assert_manifest_matches_files(out: Path) -> None:
    """Every listed shard exists with its checksum; every shard file is listed; no `.tmp`."""
    import hashlib
    import json

    listed = {e["file"]: e["sha256"] for e in json.loads((out / "manifest.json").read_text())["shards"]}
    files = {p.name: p for p in (out / "shards").iterdir()}
    assert set(files) == set(listed)
    for name, sha in listed.items():
        assert hashlib.sha256(files[name].read_bytes()).hexdigest() == sha


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_interrupted_capture_resumes_exactly_once(sig, tmp_path, tiny_teacher, texts, ray_session):
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": f"t{i}", "text": t} for i, t in enumerate(texts * 3)])
    out = tmp_path / "out"
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(f"teacher: {{model: {tiny_teacher}, backend: hf, k: 8, num_cpus: 0.5}}\n"
                        f"data: {{path: {data}, max_length: 128, long_text: truncate, "
                        "eval_fraction: 0}\ntrain: {baselines: []}\n"
                        f"capture: {{samples_per_shard: 10}}\noutput_dir: {out}\n")
    env = dict(os.environ, RAY_ADDRESS=ray_session.address_info["address"])
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.driver.cli", "capture", str(cfg_path)],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(list(out.glob("captures/*/shards/*.parquet"))) < 3:
            time.sleep(0.2)
        proc.send_signal(sig)  # Ctrl-C, or the driver's process killed outright
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    if sig == signal.SIGINT:
        assert proc.returncode == 2, err
        assert "rerun the same command" in err
    else:
        assert proc.returncode == -signal.SIGKILL
    folder = capture_folder(out)
    first = {p.name: p.stat().st_mtime_ns for p in (folder / "shards").glob("*.parquet")}
    assert 3 <= len(first) < 30
    assert main(["capture", str(cfg_path)]) == 0
    assert_exactly_once(str(out), [f"t{i}" for i in range(len(texts) * 3)])
    assert_manifest_matches_files(folder)
    # shards finished before the interrupt were not redone
    for name, mtime in first.items():
        assert (folder / "shards" / name).stat().st_mtime_ns == mtime


def test_published_but_unrecorded_shard_is_adopted_and_corrupt_one_repaired(
        tmp_path, tiny_teacher, dataset, ray_session):
    import json

    cfg = capture_config(tmp_path, tiny_teacher, dataset, **{"data.long_text": "truncate"})
    capture(cfg)
    out = capture_folder(cfg.output_dir)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"] = manifest["shards"][:-1]  # as if the driver died before recording it
    manifest["complete"] = False
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "shards" / "shard-000000.parquet.tmp").write_bytes(b"half-written")
    capture(cfg)
    assert not list(out.glob("shards/*.tmp"))
    assert_exactly_once(cfg.output_dir, [f"t{i}" for i in range(40)])
    victim = out / "shards" / "shard-000002.parquet"
    victim.write_bytes(victim.read_bytes()[:100])  # truncated
    flipped = out / "shards" / "shard-000003.parquet"
    content = bytearray(flipped.read_bytes())
    content[len(content) // 2] ^= 0x01  # one bit flipped mid-file
    flipped.write_bytes(bytes(content))
    with pytest.raises(ShardError, match="shard-000002.*checksum.*--repair"):
        list(read_shards(cfg.output_dir))
    sha = {e["file"]: e["sha256"] for e in json.loads((out / "manifest.json").read_text())["shards"]}
    with pytest.raises(ShardError, match="shard-000003.*checksum.*--repair"):
        load_shard(flipped.read_bytes(), name=str(flipped), sha256=sha[flipped.name])
    capture(cfg, repair=True)
    assert_exactly_once(cfg.output_dir, [f"t{i}" for i in range(40)])


def test_bad_inputs_fail_before_work(tmp_path, tiny_teacher, dataset, texts):
    def run(**kw):
        capture(capture_config(tmp_path, kw.pop("model", tiny_teacher), kw.pop("data", dataset), **kw))

    with pytest.raises(ConfigError, match="does not exist; set it to a model directory"):
        run(model=str(tmp_path / "no-model"))
    empty_model = tmp_path / "m"
    empty_model.mkdir()
    (empty_model / "config.json").write_text((Path(tiny_teacher) / "config.json").read_text())
    with pytest.raises(ConfigError, match="no weights"):
        run(model=str(empty_model))
    with pytest.raises(ConfigError, match=r"teacher.k must be between 1 and the vocabulary size \(1024\), got 5000"):
        run(**{"teacher.k": 5000})
    with pytest.raises(DataError, match="holds no usable records"):
        run(data=write_jsonl(tmp_path / "e.jsonl", ["", ""]))
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON"):
        run(data=write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, "{oops"]))
    with pytest.raises(ConfigError, match="leaves no room for a prompt"):
        run(**{"teacher.mode": "sample", "teacher.max_new_tokens": 200})
    assert not (tmp_path / "out").exists()  # nothing was started or written


def _mtimes(folder) -> dict:
    return {p: p.stat().st_mtime_ns for p in Path(folder).rglob("*") if p.is_file()}


def test_captures_of_other_settings_sit_side_by_side(tmp_path, tiny_teacher, dataset,
                                                     ray_session, capsys):
    """Two configs that differ in teacher.k capture into one output_dir, each into the folder
    its fingerprint names: nothing refused, nothing mixed, the first one said to be kept;
    reading the output_dir then needs the folder; --fresh deletes only this config's capture."""
    from orchestrator.shards.dirs import list_captures

    cfg = capture_config(tmp_path, tiny_teacher, dataset, **{"data.limit": 8})
    capture(cfg)
    (first,) = list_captures(cfg.output_dir)
    assert first.uri == str(capture_folder(cfg.output_dir)) and not first.old_layout
    kept = _mtimes(first.uri)
    other = capture_config(tmp_path, tiny_teacher, dataset, **{"data.limit": 8, "teacher.k": 4})
    capsys.readouterr()
    capture(other)
    said = " ".join(capsys.readouterr().err.split())
    assert f"{cfg.output_dir} also holds 1 other capture(s) (" in said
    assert f"kept; `raydistill inspect {cfg.output_dir}` lists them" in said
    assert _mtimes(first.uri) == kept
    second = next(c for c in list_captures(cfg.output_dir) if c.uri != first.uri)
    assert {next(iter(read_shards(c.uri)))["topk_ids"].shape[1] for c in (first, second)} == {8, 4}
    with pytest.raises(ShardError, match=r"holds 2 main captures .*pass the folder of the one "
                                         r"you mean:\n  .*main-"):
        list(read_shards(cfg.output_dir))

    (Path(cfg.output_dir) / "notes.txt").write_text("mine")
    redone = _mtimes(second.uri)
    time.sleep(0.01)
    capture(other, fresh=True)
    assert f"--fresh: deleting this config's capture in {second.uri}" in capsys.readouterr().err
    assert _mtimes(first.uri) == kept  # only this config's capture was deleted
    assert all(_mtimes(second.uri)[p] != t for p, t in redone.items() if p.suffix == ".parquet")
    assert (Path(cfg.output_dir) / "notes.txt").read_text() == "mine"
    capture(cfg)  # the first config resumes its own capture: nothing to do
    assert _mtimes(first.uri) == kept


def test_captures_are_content_addressed(tmp_path, tiny_teacher, texts, ray_session):
    """The fingerprint covers the data's bytes, not its path: a moved copy resumes (nothing
    recaptured); an edited dataset is another capture, in its own folders beside the first. The
    behaviour-cloning prompts live in the bc capture's folder, made again from the data on
    every command (an edited prompts file is put right, the capture resumed)."""
    import shutil

    from orchestrator.shards.dirs import list_captures

    rows = [{"id": i, "text": t} for i, t in enumerate(texts[:8])]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    sets = {"train.baselines": "[bc]", "train.bc_prompt_tokens": 8, "data.max_length": 48}
    capture(capture_config(tmp_path, tiny_teacher, data, **sets))
    out = tmp_path / "out"
    (prompts,) = capture_folder(out, "bc").glob("prompts-*.jsonl")
    shards = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}

    moved = tmp_path / "elsewhere" / "d.jsonl"
    moved.parent.mkdir()
    shutil.copy(data, moved)
    cfg = capture_config(tmp_path, tiny_teacher, str(moved), **sets)
    capture(cfg)  # same bytes, another path: resumed, nothing redone
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")} == shards
    assert not list((out / "captures").glob(".staging-*"))  # the prompts' staging is gone

    original = prompts.read_text()
    prompts.write_text(original.replace('"prompt": "', '"prompt": "# ', 1))
    capture(cfg)
    assert prompts.read_text() == original
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")} == shards

    write_jsonl(moved, [{"id": 0, "text": "edited = True\n" + texts[0]}, *rows[1:]])
    capture(cfg)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")
            if p in shards} == shards  # the first data's captures are kept as they were
    stored = list_captures(str(out))
    assert sorted(c.kind for c in stored) == ["bc", "bc", "main", "main"]
    new_bc = next(c for c in stored if c.kind == "bc" and Path(c.uri) != prompts.parent)
    (new_prompts,) = Path(new_bc.uri).glob("prompts-*.jsonl")
    assert json.loads(new_prompts.read_text().splitlines()[0])["prompt"].startswith("edited")
    assert {r["sample_id"] for r in read_shards(new_bc.uri)} == {f"{i}#s0" for i in range(8)}


def test_a_capture_of_the_previous_layout(tmp_path, tiny_teacher, dataset, ray_session, capsys):
    """A capture made by the previous layout (manifest.json and shards/ directly in output_dir)
    resumes in place when its fingerprint is this config's; another config's capture goes to
    captures/ and the old one is kept, said in one line; --fresh deletes only what the old
    capture owns there and starts over in captures/."""
    import shutil

    from orchestrator.shards.dirs import list_captures

    cfg = capture_config(tmp_path, tiny_teacher, dataset, **{"data.limit": 8})
    capture(cfg)
    out = Path(cfg.output_dir)
    for entry in capture_folder(out).iterdir():  # as the previous raydistill laid it out
        entry.rename(out / entry.name)
    shutil.rmtree(out / "captures")
    (old,) = list_captures(str(out))
    assert old.old_layout and old.uri == str(out)
    kept = _mtimes(out)
    capture(cfg)
    assert "capture: complete" in capsys.readouterr().err and _mtimes(out) == kept
    assert not (out / "captures").exists()

    other = capture_config(tmp_path, tiny_teacher, dataset, **{"data.limit": 8, "teacher.k": 4})
    capture(other)
    said = " ".join(capsys.readouterr().err.split())
    assert "also holds 1 other capture(s) (" in said and "1 in the previous layout" in said
    assert {p: t for p, t in _mtimes(out).items() if "captures" not in p.parts} == kept
    (new,) = [c for c in list_captures(str(out)) if not c.old_layout]
    assert next(iter(read_shards(new.uri)))["topk_ids"].shape[1] == 4

    (out / "notes.txt").write_text("mine")
    capture(cfg, fresh=True)
    said = " ".join(capsys.readouterr().err.split())
    assert f"--fresh: deleting this config's capture (manifest.json, shards/) in {out}" in said
    assert not (out / "manifest.json").exists() and (out / "notes.txt").read_text() == "mine"
    assert sorted(c.kind for c in list_captures(str(out))) == ["main", "main"]


def test_derived_captures_sit_under_the_output_dir_of_an_s3_compatible_store():
    from orchestrator.shards.dirs import capture_dir, find_capture, join

    assert capture_dir("s3://b/run1?endpoint_override=h:9&scheme=http", kind="heldout",
                       fingerprint="0123abcd") == \
        "s3://b/run1/captures/heldout-0123abcd?endpoint_override=h:9&scheme=http"
    assert join("/data/out/", "captures/bc-1") == "/data/out/captures/bc-1"
    assert join("/data/out", "") == "/data/out"
    with pytest.raises(ShardError, match="has no manifest.json and no main capture"):
        find_capture("/nonexistent/out")


def test_capture_to_s3_compatible_store(tmp_path, tiny_teacher, dataset, ray_session, s3_server):
    """The whole capture with output_dir on S3 (moto server): actors write, driver records, the
    reader reads back; credentials reach the actors from the driver's environment."""
    cfg = capture_config(tmp_path, tiny_teacher, dataset, **{
        "output_dir": s3_server, "data.long_text": "truncate", "data.limit": 16})
    manifest = capture(cfg)
    assert manifest.complete and len(manifest.shards) == 2
    assert_exactly_once(s3_server, [f"t{i}" for i in range(16)])
    capture(cfg)  # resume against S3: nothing left to do
