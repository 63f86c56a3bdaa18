"""The driver: the one place that holds the whole config, calls `ray.init` and starts actors.

Reads top to bottom like a recipe: validate config → inspect teacher → scan data → open the output
(resume or refuse) → start teachers → capture → record. Run it with `raydistill capture CONFIG`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import asdict

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from orchestrator import data as data_mod
from orchestrator.config import Config
from orchestrator.errors import ConfigError, RaydistillError, ShardError
from orchestrator.manifest import (MANIFEST, SHARDS_DIR, Manifest, ShardInfo, exists, filesystem,
                                   load_manifest, reconcile, save_manifest)
from orchestrator.progress import CaptureProgress, say
from orchestrator.shards import FORMAT_VERSION, load_shard, read_bytes, shard_metadata
from orchestrator.teacher_info import inspect_teacher


def capture(cfg: Config, *, fresh: bool = False, repair: bool = False) -> Manifest:
    """Capture soft labels for every record of `cfg.data` into `cfg.output_dir`, resumably."""
    t, d = cfg.teacher, cfg.data
    info = inspect_teacher(t.model, revision=t.revision)
    if t.k > info.vocab_size:
        raise ConfigError(f"teacher.k must be between 1 and the vocabulary size ({info.vocab_size}), "
                          f"got {t.k}")
    engine_len = t.max_model_len or info.max_positions
    max_length = min(d.max_length or engine_len, engine_len)
    if t.mode == "sample" and t.max_new_tokens >= max_length:
        raise ConfigError(f"teacher.max_new_tokens ({t.max_new_tokens}) leaves no room for a prompt "
                          f"in the context of {max_length} tokens; lower it or raise data.max_length")
    field = d.text_field if t.mode == "score" else d.prompt_field
    scan = data_mod.scan(d.path, field=field, fallback_field=d.text_field, id_field=d.id_field,
                         on_bad_line=d.on_bad_line, limit=d.limit)
    for line in scan.skipped[:5]:
        say(f"[yellow]skipped[/] {line}")
    if scan.skipped:
        say(f"[yellow]{len(scan.skipped)} bad lines skipped[/] (data.on_bad_line=skip)")

    fingerprint = cfg.capture_fingerprint(format_version=FORMAT_VERSION)
    fs, root = filesystem(cfg.output_dir)
    total_units = -(-scan.records // cfg.capture.samples_per_shard)
    manifest = _open_output(fs, root, fingerprint=fingerprint, fresh=fresh, cfg=cfg,
                            total_units=total_units, total_records=scan.records)
    shard_meta = {"teacher_model": t.model, "teacher_revision": info.revision,
                  "tokenizer_fingerprint": info.tokenizer_fingerprint, "k": t.k, "mode": t.mode,
                  "capture_temperature": t.temperature if t.mode == "sample" else 1.0,
                  "backend": t.backend, "fingerprint": fingerprint, "vocab_size": info.vocab_size}
    adopted, dropped = reconcile(fs, root, manifest,
                                 verify=lambda path, unit: _adopt(fs, path, unit, fingerprint))
    if adopted or dropped:
        say(f"resume: adopted {adopted} published shards, {dropped} listed shards were missing")
    if repair:
        _drop_corrupt(fs, root, manifest)
    save_manifest(fs, root, manifest)
    todo = [u for u in range(total_units) if u not in manifest.shards]
    if not todo:
        manifest.complete = True
        save_manifest(fs, root, manifest)
        say(f"capture already complete: {len(manifest.shards)} shards in {cfg.output_dir}")
        return manifest
    if manifest.shards:
        say(f"resuming: {len(manifest.shards)}/{total_units} shards already captured")

    records = data_mod.iter_records(scan.files, field=field, fallback_field=d.text_field,
                                    id_field=d.id_field, on_bad_line=d.on_bad_line, limit=d.limit)
    wanted = set(todo)
    units = ((u, [(r.sample_id, r.text) for r in batch])
             for u, batch in data_mod.units(records, cfg.capture.samples_per_shard) if u in wanted)
    _run_pool(cfg, manifest, fs, root, units, todo, max_length, shard_meta)
    manifest.complete = len(manifest.shards) == total_units
    save_manifest(fs, root, manifest)
    return manifest


def _open_output(fs, root, *, fingerprint, fresh, cfg, total_units, total_records) -> Manifest:
    existing = load_manifest(fs, root)
    if existing is not None and existing.fingerprint != fingerprint and not fresh:
        raise ConfigError(
            f"output_dir {cfg.output_dir} holds another capture (fingerprint {existing.fingerprint},"
            f" this config {fingerprint}); its shards would mix with these. Use a new output_dir, "
            "or rerun with --fresh to delete that capture and start over")
    if fresh and (existing is not None or exists(fs, f"{root}/{SHARDS_DIR}")):
        # only what a capture owns: other files a user keeps in output_dir stay
        say(f"--fresh: deleting the previous capture (manifest.json, shards/) in {cfg.output_dir}")
        if exists(fs, f"{root}/{SHARDS_DIR}"):
            fs.delete_dir(f"{root}/{SHARDS_DIR}")
        if exists(fs, f"{root}/{MANIFEST}"):
            fs.delete_file(f"{root}/{MANIFEST}")
        existing = None
    if existing is None:
        if exists(fs, f"{root}/{SHARDS_DIR}"):
            raise ConfigError(f"output_dir {cfg.output_dir} has a shards/ folder but no "
                              "manifest.json; it is not a capture this config can resume. Use a new "
                              "output_dir, or rerun with --fresh to delete it")
        fs.create_dir(f"{root}/{SHARDS_DIR}", recursive=True)
        capture_keys = {"teacher": asdict(cfg.teacher), "data": asdict(cfg.data),
                        "capture": asdict(cfg.capture)}
        existing = Manifest(fingerprint=fingerprint, capture=capture_keys, total_units=total_units,
                            total_records=total_records)
    return existing


def _drop_corrupt(fs, root: str, manifest: Manifest) -> None:
    """--repair: check every listed shard against its checksum; bad ones are deleted and redone."""
    bad = []
    for unit, info in sorted(manifest.shards.items()):
        path = f"{root}/{SHARDS_DIR}/{info.file}"
        if hashlib.sha256(read_bytes(fs, path)).hexdigest() != info.sha256:
            bad.append(unit)
            say(f"[yellow]repair:[/] {path} does not match its checksum; it will be recaptured")
            fs.delete_file(path)
    for unit in bad:
        del manifest.shards[unit]
    say(f"repair: {len(manifest.shards)} shards verified, {len(bad)} to recapture")


def _adopt(fs, path: str, unit: int, fingerprint: str) -> ShardInfo | None:
    """Check a published-but-unrecorded shard; keep it only if it is whole and of this capture."""
    data = read_bytes(fs, path)
    try:
        table = load_shard(data, name=path)
    except ShardError as e:
        say(f"[yellow]dropping unreadable shard[/] {path}: {e}")
        fs.delete_file(path)
        return None
    meta = shard_metadata(table)
    if meta.get("fingerprint") != fingerprint or meta.get("unit") != unit:
        fs.delete_file(path)
        return None
    tokens = int(pa.compute.sum(pa.compute.list_value_length(table.column("input_ids"))).as_py())
    labelled = int(pa.compute.sum(table.column("num_labels")).as_py())
    return ShardInfo(unit, os.path.basename(path), table.num_rows, tokens, labelled, len(data),
                     hashlib.sha256(data).hexdigest())


def _run_pool(cfg: Config, manifest: Manifest, fs, root, units, todo, max_length, shard_meta):
    import ray

    from actors.pool import TeacherPool

    t = cfg.teacher
    spec = _worker_spec(cfg, max_length=max_length, shard_meta=shard_meta)
    started_ray = _init_ray()
    pool = None
    progress = CaptureProgress(total_units=manifest.total_units, done_units=len(manifest.shards))
    try:
        say(f"starting {t.num_actors} {t.backend} teacher actor(s) for {t.model}")
        t0 = time.time()
        pool = TeacherPool(spec, num_actors=t.num_actors, num_cpus=t.num_cpus, num_gpus=t.num_gpus,
                           max_inflight=cfg.capture.max_inflight_per_actor,
                           max_unit_failures=cfg.capture.max_unit_failures,
                           runtime_env=_actor_env(cfg.output_dir), log=progress.log)
        pool.wait_ready()
        say(f"teachers ready in {time.time() - t0:.0f}s; capturing {len(todo)} shards")

        def on_shard(info: ShardInfo) -> None:
            manifest.shards[info.unit] = info
            save_manifest(fs, root, manifest)
            progress.advance(info)

        with progress:
            pool.run(units, on_shard)
    except KeyboardInterrupt:
        raise RaydistillError(
            f"interrupted: {len(manifest.shards)}/{manifest.total_units} shards are safely written; "
            "rerun the same command to capture the rest") from None
    finally:
        if pool is not None:
            pool.shutdown()
        if started_ray:
            ray.shutdown()
    say(progress.summary())


def _worker_spec(cfg: Config, *, max_length: int, shard_meta: dict):
    """The plain values a teacher actor needs (it never sees the whole config)."""
    from actors.teacher import WorkerSpec

    t = cfg.teacher
    return WorkerSpec(
        backend=t.backend, model=t.model, revision=t.revision, mode=t.mode, k=t.k, dtype=t.dtype,
        scoring=t.scoring, memory_fraction=t.memory_fraction, kv_cache_gib=t.kv_cache_gib, max_model_len=t.max_model_len,
        tensor_parallel_size=t.tensor_parallel_size, chunk_rows=t.chunk_rows,
        batch_tokens=t.batch_tokens, temperature=t.temperature, top_p=t.top_p,
        num_samples=t.num_samples, max_new_tokens=t.max_new_tokens, seed=t.seed,
        max_length=max_length, long_text=cfg.data.long_text, output_dir=cfg.output_dir,
        shard_meta=shard_meta)


_STORAGE_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
                "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE")


def _actor_env(output_dir: str) -> dict | None:
    """Teacher actors write the shards themselves, possibly on other nodes: for an object-store
    output_dir, forward the storage credentials and endpoint the driver has (only those set)."""
    if "://" not in output_dir:
        return None
    env = {k: os.environ[k] for k in _STORAGE_ENV if os.environ.get(k)}
    return {"env_vars": env} if env else None


def _init_ray() -> bool:
    """Connect to RAY_ADDRESS if set, else start a local Ray; True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False,
                 logging_level=logging.ERROR)
    else:
        ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                 object_store_memory=256 * 1024 * 1024)
    return True
