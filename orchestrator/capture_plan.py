"""Capture planning and execution for the pipeline (driver-internal: only `orchestrator.pipeline`
imports it). A plan is one capture — the main one, the held-out split, or the behaviour-cloning
samples — with its derived config, output, manifest and the units still to do; `Teachers` runs
plans on teacher pools started per mode.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, replace

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

HELDOUT_DIR = "heldout"
BC_DIR = "bc"


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


@dataclass
class CapturePlan:
    """One capture to run: its (derived) config, output, manifest and the units still to do."""

    label: str
    cfg: Config
    fs: object
    root: str
    manifest: Manifest
    todo: list[int]
    max_length: int
    shard_meta: dict
    keep: object = None

    def units(self):
        d = self.cfg.data
        field = d.text_field if self.cfg.teacher.mode == "score" else d.prompt_field
        records = data_mod.iter_records(data_mod.dataset_files(d.path), field=field,
                                        fallback_field=d.text_field, id_field=d.id_field,
                                        on_bad_line=d.on_bad_line, limit=d.limit, keep=self.keep)
        wanted = set(self.todo)
        return ((u, [(r.sample_id, r.text) for r in batch])
                for u, batch in data_mod.units(records, self.cfg.capture.samples_per_shard)
                if u in wanted)


def plan_captures(cfg: Config, *, fresh: bool = False, repair: bool = False) -> list[CapturePlan]:
    """The main capture, then (if evaluation is on) the held-out split, then (if the `bc` baseline
    is asked for and the main capture holds no samples) the behaviour-cloning samples."""
    main = plan_capture(cfg, label="capture", keep=_split(cfg.data, heldout=False), fresh=fresh,
                        repair=repair)
    plans = [main]
    held = heldout_config(cfg)
    if held is not None:
        keep = None if cfg.data.eval_path else _split(cfg.data, heldout=True)
        plans.append(plan_capture(held, label="held-out", keep=keep, fresh=fresh, repair=repair))
    if "bc" in cfg.train.baselines and cfg.teacher.mode == "score":
        bc = bc_config(cfg)
        room = main.max_length - cfg.train.bc_prompt_tokens - 1
        if room < 1:
            raise ConfigError(f"train.bc_prompt_tokens ({cfg.train.bc_prompt_tokens}) leaves no "
                              f"room for a continuation in {main.max_length} tokens; lower it, or "
                              "drop bc from train.baselines")
        # continuations fill the context, so the BC student sees about as many tokens per
        # sequence as the KD student (same token budget)
        bc = replace(bc, teacher=replace(bc.teacher, max_new_tokens=room))
        _write_bc_prompts(main, bc.data.path, tokens=cfg.train.bc_prompt_tokens)
        # the prompts derive from the main capture: fingerprint them by its fingerprint and the
        # sampling settings, not by the prompts file's location (a moved output_dir stays valid)
        t = bc.teacher
        keys = [main.manifest.fingerprint, cfg.train.bc_prompt_tokens, t.temperature, t.top_p,
                t.num_samples, t.max_new_tokens, t.seed, t.k, FORMAT_VERSION]
        fingerprint = hashlib.sha256(json.dumps(keys).encode()).hexdigest()[:16]
        plans.append(plan_capture(bc, label="bc samples", fresh=fresh, repair=repair,
                                  fingerprint=fingerprint))
    return plans


def heldout_config(cfg: Config) -> Config | None:
    """The held-out capture: teacher-scored text, under output_dir/heldout."""
    d = cfg.data
    if not d.eval_path and d.eval_fraction == 0:
        return None
    data = replace(d, path=d.eval_path or d.path, limit=cfg.train.eval_samples, eval_path="",
                   eval_fraction=0.0, text_field=d.text_field, long_text="truncate")
    return replace(cfg, teacher=replace(cfg.teacher, mode="score"), data=data,
                   capture=replace(cfg.capture, samples_per_shard=64),
                   output_dir=_join(cfg.output_dir, HELDOUT_DIR))


def bc_config(cfg: Config) -> Config:
    """Behaviour cloning: the teacher samples continuations of each training text's first
    `train.bc_prompt_tokens` tokens; the prompts file is written next to the capture (in the
    local cache when output_dir is an object store: the data reader reads local files)."""
    out = _join(cfg.output_dir, BC_DIR)
    if "://" in cfg.output_dir:
        key = hashlib.sha256(cfg.output_dir.encode()).hexdigest()[:16]
        prompts = os.path.expanduser(f"~/.cache/raydistill/bc-prompts/{key}.jsonl")
    else:
        prompts = _join(out, "prompts.jsonl")
    data = replace(cfg.data, path=prompts, prompt_field="prompt", text_field="prompt",
                   id_field="id", eval_path="", eval_fraction=0.0, limit=None, on_bad_line="stop")
    # the BC student learns only the sampled tokens: k=1 keeps the sampling engine's per-token
    # log-prob bookkeeping (Python objects per rank) to a minimum
    return replace(cfg, teacher=replace(cfg.teacher, mode="sample", k=1), data=data,
                   output_dir=out)


def plan_capture(cfg: Config, *, label: str, keep=None, fresh: bool = False,
                 repair: bool = False, fingerprint: str | None = None) -> CapturePlan:
    """Validate against the teacher, scan the data, open (or resume, or refuse) the output."""
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
                         on_bad_line=d.on_bad_line, limit=d.limit, keep=keep)
    for line in scan.skipped[:5]:
        say(f"[yellow]skipped[/] {line}")
    if scan.skipped:
        say(f"[yellow]{len(scan.skipped)} bad lines skipped[/] (data.on_bad_line=skip)")

    fingerprint = fingerprint or cfg.capture_fingerprint(format_version=FORMAT_VERSION)
    fs, root = filesystem(cfg.output_dir)
    total_units = -(-scan.records // cfg.capture.samples_per_shard)
    manifest = _open_output(fs, root, fingerprint=fingerprint, fresh=fresh, cfg=cfg,
                            total_units=total_units, total_records=scan.records)
    as_read = manifest.to_json()
    shard_meta = {"teacher_model": t.model, "teacher_revision": info.revision,
                  "tokenizer_fingerprint": info.tokenizer_fingerprint, "k": t.k, "mode": t.mode,
                  "capture_temperature": t.temperature if t.mode == "sample" else 1.0,
                  "backend": t.backend, "fingerprint": fingerprint, "vocab_size": info.vocab_size}
    adopted, dropped = reconcile(fs, root, manifest,
                                 verify=lambda path, unit: _adopt(fs, path, unit, fingerprint))
    if adopted or dropped:
        say(f"resume ({label}): adopted {adopted} published shards, {dropped} listed shards were "
            "missing")
    if repair:
        _drop_corrupt(fs, root, manifest)
    todo = [u for u in range(total_units) if u not in manifest.shards]
    manifest.complete = not todo
    if manifest.to_json() != as_read or not exists(fs, f"{root}/{MANIFEST}"):
        save_manifest(fs, root, manifest)  # a finished capture is only read (sweeps share it)
    if manifest.shards and todo:
        say(f"resuming {label}: {len(manifest.shards)}/{total_units} shards already captured")
    return CapturePlan(label, cfg, fs, root, manifest, todo, max_length, shard_meta, keep)


def _split(d, *, heldout: bool):
    """Record filter of the train or held-out split when the held-out set comes from data.path."""
    if d.eval_path or d.eval_fraction == 0:
        return None
    from orchestrator.train_data import stable_fraction

    f = d.eval_fraction
    return (lambda sid: stable_fraction(sid) < f) if heldout else \
        (lambda sid: stable_fraction(sid) >= f)


def _write_bc_prompts(main: CapturePlan, path: str, *, tokens: int) -> None:
    """Prompts for behaviour cloning: the first `tokens` tokens of each training text, decoded
    back to text, one JSON line per record (ids kept). Written once, atomically."""
    from orchestrator.teacher_info import load_tokenizer

    if os.path.exists(path):
        return
    d = main.cfg.data
    tok = load_tokenizer(main.cfg.teacher.model, revision=main.cfg.teacher.revision)
    records = data_mod.iter_records(data_mod.dataset_files(d.path), field=d.text_field,
                                    fallback_field=None, id_field=d.id_field,
                                    on_bad_line=d.on_bad_line, limit=d.limit, keep=main.keep)
    lines = []
    for r in records:
        ids = tok(r.text, add_special_tokens=False)["input_ids"][:tokens]
        lines.append(json.dumps({"id": r.sample_id, "prompt": tok.decode(ids)}))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


def _open_output(fs, root, *, fingerprint, fresh, cfg, total_units, total_records) -> Manifest:
    try:
        existing = load_manifest(fs, root)
    except ShardError:
        if not fresh:
            raise
        existing = None  # unreadable: --fresh deletes it below
    if existing is not None and existing.fingerprint != fingerprint and not fresh:
        raise ConfigError(
            f"output_dir {cfg.output_dir} holds another capture (fingerprint {existing.fingerprint},"
            f" this config {fingerprint}); its shards would mix with these. Use a new output_dir, "
            "or rerun with --fresh to delete that capture and start over")
    if fresh and (exists(fs, f"{root}/{MANIFEST}") or exists(fs, f"{root}/{SHARDS_DIR}")):
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


class Teachers:
    """The teacher actors of one command: a pool started on first use for a capture's mode (a
    scoring engine cannot sample) and reused by every capture of that mode; stopped on exit."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.pool = None
        self.mode: str | None = None

    def __enter__(self) -> Teachers:
        return self

    def __exit__(self, *exc) -> None:
        self._stop()

    def _stop(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        self.pool, self.mode = None, None

    def _pool_for(self, plan: CapturePlan):
        from actors.pool import TeacherPool

        t = plan.cfg.teacher
        if self.pool is not None and self.mode == t.mode:
            return self.pool
        self._stop()
        say(f"starting {t.num_actors} {t.backend} teacher actor(s) ({t.mode} mode) for {t.model}")
        t0 = time.time()
        spec = _worker_spec(plan.cfg, max_length=plan.max_length, shard_meta=plan.shard_meta)
        self.pool = TeacherPool(spec, num_actors=t.num_actors, num_cpus=t.num_cpus,
                                num_gpus=t.num_gpus, max_inflight=plan.cfg.capture.max_inflight_per_actor,
                                max_unit_failures=plan.cfg.capture.max_unit_failures,
                                runtime_env=_actor_env(plan.cfg.output_dir), log=say)
        self.mode = t.mode
        self.pool.wait_ready()
        say(f"teachers ready in {time.time() - t0:.0f}s")
        return self.pool

    def capture(self, plan: CapturePlan, *, may_submit=None, on_published=None,
                quiet: bool = False) -> None:
        """Run one planned capture to the end (a no-op when it is complete)."""
        m = plan.manifest
        if not plan.todo:
            say(f"{plan.label}: complete, {len(m.shards)} shards in {plan.cfg.output_dir}")
            return
        pool = self._pool_for(plan)
        progress = CaptureProgress(total_units=m.total_units, done_units=len(m.shards),
                                   label=plan.label, quiet=quiet)
        pool.log = progress.log

        def on_shard(info: ShardInfo) -> None:
            m.shards[info.unit] = info
            m.complete = len(m.shards) == m.total_units
            save_manifest(plan.fs, plan.root, m)
            progress.advance(info)
            if on_published is not None:
                on_published(len(m.shards))

        try:
            with progress:
                pool.run(plan.units(), on_shard, target=(plan.cfg.output_dir, plan.shard_meta),
                         may_submit=may_submit)
        except KeyboardInterrupt:
            raise RaydistillError(
                f"interrupted: {len(m.shards)}/{m.total_units} {plan.label} shards are safely "
                "written; rerun the same command to capture the rest") from None
        plan.todo = [u for u in plan.todo if u not in m.shards]
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
        shard_meta=shard_meta, tail_temperatures=tuple(float(x) for x in t.tail_temperatures))


_STORAGE_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
                "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE")


def _actor_env(output_dir: str) -> dict | None:
    """Teacher actors write the shards themselves, possibly on other nodes: for an object-store
    output_dir, forward the storage credentials and endpoint the driver has (only those set)."""
    hook = {k: os.environ[k] for k in ("RAYDISTILL_TEST_TEACHER_DELAY_S",) if os.environ.get(k)}
    if "://" not in output_dir:
        return {"env_vars": hook} if hook else None
    env = hook | {k: os.environ[k] for k in _STORAGE_ENV if os.environ.get(k)}
    return {"env_vars": env} if env else None
