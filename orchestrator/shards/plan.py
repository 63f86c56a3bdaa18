"""Capture planning for the pipeline (only the driver imports it: the recipes and their helpers,
inspect). A plan is one capture — the main one, the held-out split, or the behaviour-cloning
samples (`CaptureKind`) — with its derived config, output, manifest and the units still to do.
`orchestrator.driver.capture_run.Teachers` runs them.

Captures are content-addressed: the fingerprint covers the sha256 of the data files' bytes
(`orchestrator.data.content_digest`), not their path, and names the capture's folder
(`orchestrator.shards.dirs`): a moved or copied dataset resumes its capture, an edited one (or
other settings) gets a folder of its own beside it. Every input of the main and held-out captures
is read and checked, and every output checked, before anything is written (`scan_captures`,
`orchestrator.shards.output`).
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace


from orchestrator import data as data_mod
from orchestrator.config import Config
from orchestrator.config_checks import check_packed_room
from orchestrator.shards.dirs import CAPTURES_DIR, join
from orchestrator.shards.output import Found, locate, open_output, say_others
from orchestrator.shards.records import record_args, rendering_of
from orchestrator.errors import ConfigError
from orchestrator.shards.manifest import MANIFEST, Manifest, reconcile, save_manifest
from orchestrator.storage import exists, filesystem, write_atomic_local
from orchestrator.console import say
from orchestrator.shards.format import FORMAT_VERSION
from orchestrator.shards.resume import adopt, drop_corrupt
from orchestrator.teacher_info import TeacherInfo, inspect_teacher


class CaptureKind(enum.Enum):
    """Which capture a plan is: code tells captures apart by these members (never by their
    text); the value is recorded in its shards (`capture`)."""

    MAIN = "main"
    HELDOUT = "heldout"
    BC = "bc"

    @property
    def label(self) -> str:
        """Display text: how messages, `inspect` and the report's `captures` name it."""
        return {CaptureKind.MAIN: "capture", CaptureKind.HELDOUT: "held-out",
                CaptureKind.BC: "bc samples"}[self]


@dataclass(frozen=True)
class Split:
    """The train or held-out side of `data.eval_fraction` of data.path, by a hash of each
    record's id (the same split every run). Called with a sample id: keep it?"""

    heldout: bool
    fraction: float

    def __call__(self, sample_id: str) -> bool:
        from orchestrator.data import stable_fraction

        return (stable_fraction(sample_id) < self.fraction) == self.heldout

    def describe(self) -> str:
        return f"{'heldout' if self.heldout else 'train'}:{self.fraction!r}"


@dataclass
class CapturePlan:
    """One capture to run: its (derived) config — output_dir is the capture's own folder —,
    output, manifest and the units still to do."""

    kind: CaptureKind
    cfg: Config
    fs: object
    root: str
    manifest: Manifest
    todo: list[int]
    max_length: int
    shard_meta: dict
    """Provenance for every shard (teacher, tokenizer, fingerprint, capture kind)."""
    split: Split | None = None
    data_key: str = "data.path"
    """The config field that names this capture's data (`data.eval_path` for a held-out file)."""
    new: bool = False
    """Started by this command: nothing of it existed in output_dir."""
    chat_template: str = ""
    """The chat template's text when the data holds chat records (`orchestrator.chat`)."""

    @property
    def label(self) -> str:
        return self.kind.label

    def units(self):
        """(unit, [Record, …]) of the units still to do, in order."""
        d = self.cfg.data
        records = data_mod.iter_records(data_mod.dataset_files(d.path, key=self.data_key),
                                        id_field=d.id_field, on_bad_line=d.on_bad_line,
                                        limit=d.limit, keep=self.split, key=self.data_key,
                                        **record_args(self.cfg))
        wanted = set(self.todo)
        return ((u, batch)
                for u, batch in data_mod.units(records, self.cfg.capture.samples_per_shard)
                if u in wanted)

    def capture_spec(self):
        """This capture's own settings, sent with each of its units (`actors.teacher`)."""
        from orchestrator.shards.specs import CaptureSpec

        t, d = self.cfg.teacher, self.cfg.data
        return CaptureSpec(output_dir=self.cfg.output_dir, mode=t.mode, k=t.k,
                           max_length=self.max_length, long_text=d.long_text,
                           shard_meta=self.shard_meta, temperature=t.temperature, top_p=t.top_p,
                           num_samples=t.num_samples, max_new_tokens=t.max_new_tokens, seed=t.seed,
                           chat_template=self.chat_template, train_on_prompt=d.train_on_prompt)

    def expect(self) -> dict:
        """What every shard of this capture must record (checked before and during training):
        its tokenizer, and what the capture did (mode, k, max_length, long_text, temperature…)."""
        return {"tokenizer_fingerprint": self.shard_meta["tokenizer_fingerprint"],
                **self.capture_spec().done()}

    def engine_spec(self):
        """The engine this capture needs (captures with equal specs share a pool)."""
        from orchestrator.shards.specs import EngineSpec

        t = self.cfg.teacher
        return EngineSpec(
            backend=t.backend, model=t.model, revision=t.revision, mode=t.mode, max_k=t.k,
            dtype=t.dtype, scoring=t.scoring, memory_fraction=t.memory_fraction,
            kv_cache_gib=t.kv_cache_gib, max_model_len=t.max_model_len,
            tensor_parallel_size=t.tensor_parallel_size, chunk_rows=t.chunk_rows,
            batch_tokens=t.batch_tokens, seed=t.seed,
            tail_temperatures=tuple(float(x) for x in t.tail_temperatures))


@dataclass
class ScannedCapture:
    """A capture checked against the teacher and its data read, before any output is opened."""

    kind: CaptureKind
    cfg: Config
    split: Split | None
    key: str
    max_length: int
    records: int
    digest: dict
    keys: dict
    """What the fingerprint covers (`Config.capture_keys` and, for bc, the prompts' origin)."""
    fingerprint: str
    chat_template: str = ""
    """The chat template's text when the data holds chat records."""

    def locate(self, *, fresh: bool, command: str) -> Found:
        """Where this capture lives in output_dir and what is there (reads only)."""
        return locate(self.cfg.output_dir, kind=self.kind.value, fingerprint=self.fingerprint,
                      fresh=fresh, command=command)


def plan_captures(cfg: Config, *, fresh: bool = False, repair: bool = False,
                  command: str = "capture") -> list[CapturePlan]:
    """The main capture, then (if evaluation is on) the held-out split, then (if the `bc` baseline
    is asked for and the main capture holds no samples) the behaviour-cloning samples, each in
    the folder its fingerprint names. Every input of the first two is read and checked, and
    every output checked, before any output is written; `command` is the CLI command planning
    (its refusals give advice it accepts). `fresh` deletes only this config's captures."""
    info = inspect_teacher(cfg.teacher.model, revision=cfg.teacher.revision)
    scanned = scan_captures(cfg, info)
    with_bc = "bc" in cfg.train.baselines and cfg.teacher.mode == "score"
    if with_bc:
        _bc_room(cfg, scanned[0].max_length)
    if cfg.train.packing and cfg.train.max_tokens_per_batch is not None:  # data.max_length unset
        check_packed_room(cfg.train.max_tokens_per_batch, max_length=scanned[0].max_length)
    found = [s.locate(fresh=fresh, command=command) for s in scanned]
    plans = [_open(s, f, info, repair=repair) for s, f in zip(scanned, found)]
    if with_bc:
        plans.append(_plan_bc(cfg, plans[0], info, fresh=fresh, repair=repair, command=command))
    if any(p.new for p in plans):
        say_others(cfg.output_dir, mine={p.cfg.output_dir for p in plans})
    return plans


def scan_captures(cfg: Config, info: TeacherInfo) -> list[ScannedCapture]:
    """The main capture and (if evaluation is on) the held-out one, each checked against the
    teacher, its data read once (records, bad lines, content digest) and its fingerprint
    computed; nothing is written. Each error names the config field whose value failed."""
    d = cfg.data
    if d.eval_path:  # named as what it is, before anything else is read
        data_mod.dataset_files(d.eval_path, key="data.eval_path")
    scanned = [_scan(cfg, info, kind=CaptureKind.MAIN, split=_split(d, heldout=False))]
    held = heldout_config(cfg)
    if held is not None:
        scanned.append(_scan(held, info, kind=CaptureKind.HELDOUT,
                             split=None if d.eval_path else _split(d, heldout=True),
                             key="data.eval_path" if d.eval_path else "data.path"))
    return scanned


def heldout_config(cfg: Config) -> Config | None:
    """The held-out capture: teacher-scored text, in its own folder of output_dir. Long texts are
    truncated, whatever data.long_text says: the held-out set is a measurement, one sequence per
    record (its first max_length tokens), so train.eval_samples counts distinct texts and one
    long text cannot fill the evaluation with its pieces (README, *Training students*). The
    held-out records of a sample-mode capture are prompts: every token of them is measured
    (train_on_prompt), as for text prompts, since a chat prompt holds no reply to measure."""
    d = cfg.data
    if not d.eval_path and d.eval_fraction == 0:
        return None
    data = replace(d, path=d.eval_path or d.path, limit=cfg.train.eval_samples, eval_path="",
                   eval_fraction=0.0, text_field=d.text_field, long_text="truncate",
                   train_on_prompt=d.train_on_prompt or cfg.teacher.mode == "sample")
    return replace(cfg, teacher=replace(cfg.teacher, mode="score"), data=data,
                   capture=replace(cfg.capture, samples_per_shard=64))


def bc_config(cfg: Config) -> Config:
    """Behaviour cloning: the teacher samples continuations of each training text's first
    `train.bc_prompt_tokens` tokens (the prompts file: `_plan_bc`)."""
    data = replace(cfg.data, path="", prompt_field="prompt", text_field="prompt", format="auto",
                   id_field="id", eval_path="", eval_fraction=0.0, limit=None, on_bad_line="stop")
    # the BC student learns only the sampled tokens: k=1 keeps the sampling engine's per-token
    # log-prob bookkeeping (Python objects per rank) to a minimum
    return replace(cfg, teacher=replace(cfg.teacher, mode="sample", k=1), data=data)


def _plan_bc(cfg: Config, main: CapturePlan, info: TeacherInfo, *, fresh: bool, repair: bool,
             command: str) -> CapturePlan:
    """The behaviour-cloning capture. Its prompts derive from the main capture's records: they
    live in the bc capture's folder (prompts-<key>.jsonl; in the local cache for an
    object-store output_dir, since the data reader reads local files), named by the main
    capture's fingerprint and bc_prompt_tokens. The capture's fingerprint — its folder's name —
    covers their content, so they are made first (beside, in a staging folder) and moved in."""
    bc = bc_config(cfg)
    room = _bc_room(cfg, main.max_length)
    origin = {"prompts_from": main.manifest.fingerprint,
              "bc_prompt_tokens": cfg.train.bc_prompt_tokens}
    key = hashlib.sha256(json.dumps(origin, sort_keys=True).encode()).hexdigest()[:16]
    name = f"prompts-{key}.jsonl"  # the file name counts in the content digest
    staging = _bc_prompts_dir(join(cfg.output_dir, CAPTURES_DIR))
    os.makedirs(staging, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".staging-", dir=staging)
    try:
        staged = os.path.join(staging, name)
        _write_bc_prompts(main, staged, tokens=cfg.train.bc_prompt_tokens)
        # continuations fill the context, so the BC student sees about as many tokens per
        # sequence as the KD student (same token budget)
        bc = replace(bc, teacher=replace(bc.teacher, max_new_tokens=room),
                     data=replace(bc.data, path=staged))
        scanned = _scan(bc, info, kind=CaptureKind.BC, split=None, key="the bc prompts",
                        extra=origin)
        found = scanned.locate(fresh=fresh, command=command)
        prompts = os.path.join(_bc_prompts_dir(found.where), name)
        scanned.cfg = replace(scanned.cfg, data=replace(scanned.cfg.data, path=prompts))
        plan = _open(scanned, found, info, repair=repair)
        os.makedirs(os.path.dirname(prompts), exist_ok=True)
        os.replace(staged, prompts)  # the same bytes when it was there
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return plan


def _bc_room(cfg: Config, max_length: int) -> int:
    """Tokens left for a behaviour-cloning continuation after its prompt (checked before any
    output is written)."""
    room = max_length - cfg.train.bc_prompt_tokens - 1
    if room < 1:
        raise ConfigError(f"train.bc_prompt_tokens ({cfg.train.bc_prompt_tokens}) leaves no "
                          f"room for a continuation in {max_length} tokens; lower it, or "
                          "drop bc from train.baselines")
    return room


def _bc_prompts_dir(folder: str) -> str:
    """Where the bc prompts of a capture folder are: in it, or (object-store output_dir) in a
    local cache folder named by it."""
    if "://" in folder:
        key = hashlib.sha256(folder.encode()).hexdigest()[:16]
        return os.path.expanduser(f"~/.cache/raydistill/bc-prompts/{key}")
    return folder


def _scan(cfg: Config, info: TeacherInfo, *, kind: CaptureKind, split: Split | None,
          key: str = "data.path", extra: dict | None = None) -> ScannedCapture:
    """Validate against the teacher, read the data once (records, bad lines, content digest),
    compute the fingerprint (`extra`: more keys it covers)."""
    t, d = cfg.teacher, cfg.data
    if t.k > info.vocab_size:
        raise ConfigError(f"teacher.k must be between 1 and the vocabulary size ({info.vocab_size}), "
                          f"got {t.k}")
    engine_len = t.max_model_len or info.max_positions
    max_length = min(d.max_length or engine_len, engine_len)
    if t.mode == "sample" and t.max_new_tokens >= max_length:
        raise ConfigError(f"teacher.max_new_tokens ({t.max_new_tokens}) leaves no room for a prompt "
                          f"in the context of {max_length} tokens; lower it or raise data.max_length")
    scan = data_mod.scan(d.path, id_field=d.id_field, on_bad_line=d.on_bad_line, limit=d.limit,
                         keep=split, key=key, **record_args(cfg))
    for line in scan.skipped[:5]:
        say(f"[yellow]skipped[/] {line}")
    if scan.skipped:
        say(f"[yellow]{len(scan.skipped)} bad lines skipped[/] (data.on_bad_line=skip)")
    template, rendering = rendering_of(cfg, scan.formats)
    digest = data_mod.content_digest(scan.files, key=key)
    keys = cfg.capture_keys(format_version=FORMAT_VERSION, data_sha256=digest["sha256"],
                            selection=split.describe() if split else "all",
                            rendering=rendering) | (extra or {})
    fingerprint = hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]
    return ScannedCapture(kind, cfg, split, key, max_length, scan.records, digest, keys,
                          fingerprint, template)


def _open(s: ScannedCapture, found: Found, info: TeacherInfo, *, repair: bool) -> CapturePlan:
    """Open (new, or resume) the capture folder that `s.locate` found; adopt or repair what is
    there. The plan's config names that folder as its output_dir."""
    cfg, t, fingerprint = replace(s.cfg, output_dir=found.where), s.cfg.teacher, s.fingerprint
    fs, root = filesystem(cfg.output_dir)
    total_units = -(-s.records // cfg.capture.samples_per_shard)
    record = {"teacher": asdict(t), "data": asdict(cfg.data), "capture": asdict(cfg.capture),
              "fingerprint_keys": s.keys, "data_files": s.digest["files"]}
    manifest = open_output(found, fingerprint=fingerprint, record=record,
                           total_units=total_units, total_records=s.records)
    as_read = manifest.to_json()
    shard_meta = {"teacher_model": t.model, "teacher_revision": info.revision,
                  "tokenizer_fingerprint": info.tokenizer_fingerprint, "backend": t.backend,
                  "fingerprint": fingerprint, "vocab_size": info.vocab_size,
                  "capture": s.kind.value}
    adopted, dropped = reconcile(fs, root, manifest,
                                 verify=lambda path, unit: adopt(fs, path, unit, fingerprint))
    if adopted or dropped:
        say(f"resume ({s.kind.label}): adopted {adopted} published shards, {dropped} listed shards "
            "were missing")
    if repair:
        drop_corrupt(fs, root, manifest)
    todo = [u for u in range(total_units) if u not in manifest.shards]
    manifest.complete = not todo
    if manifest.to_json() != as_read or not exists(fs, f"{root}/{MANIFEST}"):
        save_manifest(fs, root, manifest)  # a finished capture is only read (sweeps share it)
    if manifest.shards and todo:
        say(f"resuming {s.kind.label}: {len(manifest.shards)}/{total_units} shards already captured")
    return CapturePlan(s.kind, cfg, fs, root, manifest, todo, s.max_length, shard_meta, s.split,
                       data_key=s.key, new=found.manifest is None, chat_template=s.chat_template)


def _split(d, *, heldout: bool) -> Split | None:
    """Record filter of the train or held-out split when the held-out set comes from data.path."""
    if d.eval_path or d.eval_fraction == 0:
        return None
    return Split(heldout=heldout, fraction=d.eval_fraction)


def _write_bc_prompts(main: CapturePlan, path: str, *, tokens: int) -> None:
    """Prompts for behaviour cloning, one JSON line per record (ids kept), atomically: the first
    `tokens` tokens of each training text, decoded back to text; a completion record's prompt;
    a chat record's messages before its last assistant turn (the teacher writes that turn)."""
    from orchestrator.teacher_info import load_tokenizer

    d = main.cfg.data
    tok = load_tokenizer(main.cfg.teacher.model, revision=main.cfg.teacher.revision)
    records = data_mod.iter_records(data_mod.dataset_files(d.path), id_field=d.id_field,
                                    on_bad_line=d.on_bad_line, limit=d.limit, keep=main.split,
                                    **record_args(main.cfg))
    lines = []
    for r in records:
        if r.format == "chat":
            turns = r.messages[:-1] if r.messages[-1][0] == "assistant" else r.messages
            lines.append(json.dumps({"id": r.sample_id, "messages": [
                {"role": role, "content": content} for role, content in turns]}))
            continue
        prompt = r.text
        if r.format == "text":
            prompt = tok.decode(tok(r.text, add_special_tokens=False)["input_ids"][:tokens])
        lines.append(json.dumps({"id": r.sample_id, "prompt": prompt}))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomic_local(path, "\n".join(lines) + "\n")

