"""Where a train worker's samples come from: a deterministic, resumable stream over a capture's
shards, read, verified and decoded by Ray Data tasks ahead of the training step.

Order. Epoch e visits the shards in a seeded permutation of the units (epoch 0 of a streaming run
keeps capture order, so the first shards published are the first read); worker r of W takes every
W-th shard of that order; it reads them `shuffle_shards` at a time (a window) and shuffles the rows
of each window together, with a seed derived from (seed, epoch, the window's first unit). A window
of several shards matters: a capture keeps its data file's order, so one shard of a sorted or
grouped file holds one topic (the demo's: a few standard-library modules), and a student fed one
shard at a time follows that topic for a dozen steps and forgets the last one (the demo's KD
student: 4.95 nats/token held-out instead of 4.60; BENCHMARKS.md, "Demo quality"). The stream
is a pure function of (seed, rank, world, units, shuffle_shards), so a restarted worker resumes
exactly where its checkpoint says: it skips `position` samples using the manifest's row counts —
no shard is skipped or read twice within an epoch because of a restart.

Streaming. A shard exists for readers once manifest.json lists it (the driver records it after the
atomic write). A read task waits, polling the manifest, until its shard is listed; the wait shows up
as data-wait time in the training step. Ray Data's streaming executor bounds how many shards are
read ahead (memory); each read task tells the run's board when it has read its shard, and the
capture pauses while it is too far ahead of the readers (`ShardBoard`). Counting reads, not rows
trained on, keeps the chain deadlock-free: a slow trainer backpressures Ray Data, whose readers stop,
which pauses the capture — while Ray Data's own read-ahead can never wait on a paused capture.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import numpy as np

from orchestrator.errors import ShardError
from orchestrator.shards.manifest import MANIFEST, SHARDS_DIR, ShardInfo, load_manifest
from orchestrator.storage import exists, filesystem
from orchestrator.shards.format import decode_rows, load_shard, read_bytes, shard_metadata

_FIELDS = ("sample_id", "input_ids", "prompt_len", "topk_ids", "topk_logprobs", "tail_mass",
           "tail_temperatures", "loss_mask")
_MAX_PIPELINE_EPOCHS = 8
"""Epochs one Ray Data pipeline spans at most: starting one costs seconds, but a pipeline reads and
decodes its shards as fast as its read tasks can, whether or not the student gets to them — a
sweep trial of a third of an epoch decoded all eight on the CPUs it trains on. So the first
pipeline spans one epoch, and each next one twice as many as the last, up to this."""
_OUT_ROWS = 32  # samples per Ray Data block a read task yields


def epoch_order(units: list[int], *, seed: int, epoch: int, capture_order: bool) -> list[int]:
    """The order of units in one epoch: capture order for a streaming first epoch, else seeded."""
    if capture_order:
        return sorted(units)
    rng = np.random.default_rng([seed, epoch, 0x5EED])
    return [units[i] for i in rng.permutation(len(units))]


def _row_seed(seed: int, epoch: int, unit: int) -> list[int]:
    """The row shuffle's seed of the window (or single shard) that starts with `unit`."""
    return [seed, epoch, unit, 0xB10C]


def windows(units: list[int], size: int) -> list[list[int]]:
    """`units` (one worker's epoch order) cut into consecutive windows of `size` shards, the last
    one shorter: the shards whose rows are shuffled together."""
    return [units[i:i + size] for i in range(0, len(units), size)]


class ShardWatcher:
    """Looks up shards in a capture's manifest, waiting for them in a streaming run (picklable)."""

    def __init__(self, root_uri: str, *, wait: bool, board=None, poll_s: float = 0.5):
        self.root_uri = root_uri
        self.wait = wait
        self.board = board
        self.poll_s = poll_s

    def info(self, unit: int) -> ShardInfo:
        fs, root = filesystem(self.root_uri)
        while True:
            manifest = load_manifest(fs, root)
            if manifest is not None and unit in manifest.shards:
                return manifest.shards[unit]
            if not self.wait:
                raise ShardError(f"shard unit {unit} is not in {self.root_uri}/{MANIFEST}; the "
                                 "capture is incomplete: finish it with `raydistill capture CONFIG`")
            if self.board is not None:
                import ray

                failure = ray.get(self.board.capture_failure.remote())
                if failure:
                    raise ShardError(f"the capture stopped before shard unit {unit}: {failure}")
            time.sleep(self.poll_s)

    def read(self, unit: int, *, expect: dict | None = None) -> list[dict]:
        """The decoded, checksum-verified samples of one shard, in stored order."""
        info = self.info(unit)
        fs, root = filesystem(self.root_uri)
        path = f"{root}/{SHARDS_DIR}/{info.file}"
        if not exists(fs, path):
            raise ShardError(f"shard {path} is listed in {MANIFEST} but missing; recapture it with "
                             "`raydistill capture CONFIG --repair`")
        table = load_shard(read_bytes(fs, path), name=path, sha256=info.sha256)
        if expect:
            check_shard_origin(shard_metadata(table), expect, name=path)
        return list(decode_rows(table))


def check_shard_origin(meta: dict, expect: dict, *, name: str) -> None:
    """Refuse shards whose teacher or tokenizer differs from the one the config names, or that
    record another way of capturing (mode, k, max_length, long_text, temperature…: every other
    key of `expect`) than the config's capture does."""
    for key, what in (("tokenizer_fingerprint", "tokenizer"), ("teacher_model", "teacher model")):
        if key in expect and meta.get(key) != expect[key]:
            raise ShardError(
                f"shard {name} was captured with another {what} ({meta.get(key)!r}) than the "
                f"config's teacher ({expect[key]!r}); the student would learn another model's "
                "labels. Point output_dir at a capture of this teacher, or recapture with --fresh")
    checked_above = ("tokenizer_fingerprint", "teacher_model", "tail_temperature")
    other = [f"{key} {meta.get(key)!r} (the config's: {want!r})" for key, want in expect.items()
             if key not in checked_above and meta.get(key) != want]
    if other:
        raise ShardError(
            f"shard {name} was captured otherwise than the config says: {', '.join(other)}; the "
            "student would learn from other labels than it asks for. Recapture with --fresh")
    if "tail_temperature" in expect:  # train.tail=bucket at this temperature
        T, stored = expect["tail_temperature"], meta.get("tail_temperatures", [])
        if not any(abs(float(x) - T) <= 1e-6 * max(1.0, T) for x in stored):
            raise ShardError(
                f"shard {name} holds the teacher's tail mass at temperatures {stored}, not at "
                f"train.temperature={T:g} that train.tail=bucket needs: add {T:g} to "
                "teacher.tail_temperatures and recapture with --fresh, or use "
                "train.tail=renormalize")


class _ReadShard:
    """Ray Data map_batches function: one window of shard units in (their ids joined by commas),
    their samples shuffled together out."""

    def __init__(self, watcher: ShardWatcher, *, seed: int, expect: dict | None,
                 reported: tuple | None = None):
        self.watcher, self.seed, self.expect = watcher, seed, expect
        self.reported = reported  # (board, label): where to report each shard read

    def __call__(self, batch: dict) -> Iterator[dict]:
        """Yields the window's shuffled samples `_OUT_ROWS` at a time: Ray Data stores each
        yield as one block, so the object store never holds a whole window in one piece."""
        for epoch, window, skip in zip(batch["epoch"], batch["units"], batch["skip"]):
            units = [int(u) for u in str(window).split(",")]
            samples: list[tuple[int, dict]] = []
            for unit in units:
                samples += [(unit, s) for s in self.watcher.read(unit, expect=self.expect)]
                if self.reported is not None:
                    board, label = self.reported
                    board.shard_read.remote(label, unit)
            rng = np.random.default_rng(_row_seed(self.seed, int(epoch), units[0]))
            order = rng.permutation(len(samples))[int(skip):]
            for start in range(0, len(order), _OUT_ROWS):
                out: dict[str, list] = {name: [] for name in (*_FIELDS, "unit", "epoch")}
                for i in order[start:start + _OUT_ROWS]:
                    unit, s = samples[i]
                    for name in _FIELDS:
                        out[name].append(s[name])
                    out["unit"].append(unit)
                    out["epoch"].append(int(epoch))
                yield {name: _column(values) for name, values in out.items()}


def _column(values: list) -> np.ndarray:
    if values and isinstance(values[0], np.ndarray):
        col = np.empty(len(values), dtype=object)
        col[:] = values
        return col
    return np.asarray(values)


class SampleStream:
    """The samples of one train worker from `position` on, epoch after epoch, without end.

    `units`: every unit of the capture (all of them, published or not, in a streaming run).
    `position`: samples this worker has already consumed (restored from a checkpoint).
    `shuffle_shards`: shards whose rows are shuffled together (train.shuffle_shards).
    """

    def __init__(self, watcher: ShardWatcher, *, units: list[int], rank: int, world: int,
                 seed: int, position: int = 0, streaming: bool = False, expect: dict | None = None,
                 reader_cpus: float = 0.25, report_to: tuple | None = None,
                 shuffle_shards: int = 1):
        self.watcher, self.units, self.rank, self.world = watcher, list(units), rank, world
        self.shuffle_shards = max(1, shuffle_shards)
        self.seed, self.position, self.streaming = seed, position, streaming
        self.expect, self.reader_cpus, self.report_to = expect, reader_cpus, report_to
        self.epoch = 0
        if len(self.units) < world:
            raise ShardError(f"the capture has {len(self.units)} shards for {world} train workers; "
                             "each worker needs at least one: lower train.num_workers or "
                             "capture.samples_per_shard")

    def _my_windows(self, epoch: int) -> list[list[int]]:
        order = epoch_order(self.units, seed=self.seed, epoch=epoch,
                            capture_order=self.streaming and epoch == 0)
        return windows(order[self.rank::self.world], self.shuffle_shards)

    def __iter__(self) -> Iterator[dict]:
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # the order is part of the resumable state
        ctx.enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        epoch, (first, rows_in) = self._locate(self.position)
        span = 1
        while True:
            items = []
            for e in range(epoch, epoch + span):
                todo = self._my_windows(e)[first if e == epoch else 0:]
                items += [{"epoch": e, "units": ",".join(map(str, w)),
                           "skip": rows_in if (e == epoch and i == 0) else 0}
                          for i, w in enumerate(todo)]
            ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
            ds = ds.map_batches(_ReadShard(self.watcher, seed=self.seed, expect=self.expect,
                                           reported=self.report_to),
                                batch_size=1, num_cpus=self.reader_cpus, batch_format="numpy")
            for row in ds.iter_rows():
                self.epoch = int(row["epoch"])
                self.position += 1
                yield row
            epoch, first, rows_in = epoch + span, 0, 0
            span = min(2 * span, _MAX_PIPELINE_EPOCHS)

    def _locate(self, position: int) -> tuple[int, tuple[int, int]]:
        """(epoch, (window index within the epoch, rows into it)) of the `position`-th sample.
        Only the row counts of windows this worker has read are asked for: in a streaming run the
        next window's shards may not exist yet, and waiting for them here, before any read has
        let the paused capture go on, would never end."""
        epoch = 0
        while True:
            todo = self._my_windows(epoch)
            for i, window in enumerate(todo):
                if position == 0:  # at a window's start (a fresh worker: the first one)
                    return epoch, (i, 0)
                rows = sum(self.watcher.info(unit).rows for unit in window)
                if position < rows:
                    return epoch, (i, position)
                position -= rows
            epoch += 1


def heldout_samples(watcher: ShardWatcher, *, rank: int, world: int, limit: int | None,
                    expect: dict | None = None) -> list[dict]:
    """This worker's slice of a held-out capture: every world-th sample, at most `limit` in all."""
    fs, root = filesystem(watcher.root_uri)
    manifest = load_manifest(fs, root)
    if manifest is None or not manifest.shards:
        raise ShardError(f"no held-out capture at {watcher.root_uri}; it is captured by "
                         "`raydistill run` / `raydistill train` before training")
    samples: list[dict] = []
    for unit in sorted(manifest.shards):
        samples.extend(watcher.read(unit, expect=expect))
        if limit is not None and len(samples) >= limit:
            break
    samples = samples[:limit] if limit is not None else samples
    return samples[rank::world]
