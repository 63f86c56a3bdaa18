"""The students' data stream: deterministic order, every sample once per epoch across workers,
exact resume from a position, refusal of missing or foreign shards."""

from __future__ import annotations

import time

import pytest

from orchestrator.errors import ShardError
from orchestrator.storage import filesystem
from orchestrator.shards.manifest import load_manifest
from orchestrator.train.stream import SampleStream, ShardWatcher, check_shard_origin, epoch_order
from orchestrator.data import stable_fraction
from tests.conftest import capture_folder


def test_epoch_order_is_seeded_and_streaming_first_epoch_keeps_capture_order():
    units = list(range(20))
    a = epoch_order(units, seed=1, epoch=1, capture_order=False)
    assert a == epoch_order(units, seed=1, epoch=1, capture_order=False)
    assert sorted(a) == units and a != units
    assert a != epoch_order(units, seed=1, epoch=2, capture_order=False)
    assert a != epoch_order(units, seed=2, epoch=1, capture_order=False)
    assert epoch_order(units, seed=1, epoch=0, capture_order=True) == units


def test_held_out_split_is_stable_and_about_the_right_size():
    ids = [str(i) for i in range(4000)]
    held = [i for i in ids if stable_fraction(i) < 0.1]
    assert held == [i for i in ids if stable_fraction(i) < 0.1]
    assert 300 < len(held) < 500


def _take(stream, n):
    it = iter(stream)
    return [next(it)["sample_id"] for _ in range(n)]


def test_workers_see_every_sample_once_per_epoch(captured):
    fs, root = filesystem(str(capture_folder(captured["out"])))
    m = load_manifest(fs, root)
    units = sorted(m.shards)
    total = sum(s.rows for s in m.shards.values())
    watcher = ShardWatcher(str(capture_folder(captured["out"])), wait=False)
    seen = []
    for rank in range(2):
        rows = sum(m.shards[u].rows for u in epoch_order(units, seed=3, epoch=0,
                                                         capture_order=False)[rank::2])
        seen += _take(SampleStream(watcher, units=units, rank=rank, world=2, seed=3), rows)
    assert len(seen) == total == len(set(seen))


def test_resume_continues_exactly_where_the_position_says(captured):
    fs, root = filesystem(str(capture_folder(captured["out"])))
    units = sorted(load_manifest(fs, root).shards)
    watcher = ShardWatcher(str(capture_folder(captured["out"])), wait=False)
    whole = _take(SampleStream(watcher, units=units, rank=0, world=1, seed=5), 140)  # > 1 epoch
    for position in (0, 13, 61, 100):
        resumed = _take(SampleStream(watcher, units=units, rank=0, world=1, seed=5,
                                     position=position), 140 - position)
        assert resumed == whole[position:]


def test_missing_shard_and_foreign_tokenizer_are_refused(captured):
    watcher = ShardWatcher(str(capture_folder(captured["out"])), wait=False)
    with pytest.raises(ShardError, match="capture is incomplete"):
        watcher.info(999)
    with pytest.raises(ShardError, match="another tokenizer"):
        check_shard_origin({"tokenizer_fingerprint": "abc"}, {"tokenizer_fingerprint": "xyz"},
                           name="shards/unit-00000.parquet")


def test_packed_micro_batches_resume_from_the_samples_consumed(captured):
    """A packed micro-batch holds as many samples as fit its token budget, and the packer holds
    back the one drawn that did not fit: the data position is the stream's count minus it, and a
    stream resumed there packs the very same micro-batches as an uninterrupted one."""
    from orchestrator.kd.batches import Packer

    fs, root = filesystem(str(capture_folder(captured["out"])))
    units = sorted(load_manifest(fs, root).shards)
    watcher = ShardWatcher(str(capture_folder(captured["out"])), wait=False)

    def micro_batches(position, n):
        stream = SampleStream(watcher, units=units, rank=0, world=1, seed=5, position=position)
        packer = Packer(iter(stream), max_tokens=300, row_tokens=128)  # 2 rows of 128
        taken = [[s["sample_id"] for s in packer.take()] for _ in range(n)]
        return taken, stream.position - packer.held

    whole, _ = micro_batches(0, 30)
    assert len({len(b) for b in whole}) > 1  # a variable number of samples per micro-batch
    first, consumed = micro_batches(0, 11)
    assert consumed == sum(len(b) for b in first)  # not what the stream yielded
    resumed, _ = micro_batches(consumed, 19)
    assert first + resumed == whole


def test_a_shuffle_window_mixes_its_shards_and_still_resumes_exactly(captured):
    """train.shuffle_shards: a worker reads its shards `shuffle_shards` at a time and shuffles
    their rows together, so consecutive batches mix the shards (a shard of a sorted file is one
    topic) — still every sample once per epoch, and a resume from any position continues the same
    order."""
    fs, root = filesystem(str(capture_folder(captured["out"])))
    m = load_manifest(fs, root)
    units = sorted(m.shards)
    total = sum(s.rows for s in m.shards.values())
    watcher = ShardWatcher(str(capture_folder(captured["out"])), wait=False)
    first = epoch_order(units, seed=5, epoch=0, capture_order=False)[0]
    n = m.shards[first].rows

    def head(size, count, position=0):
        it = iter(SampleStream(watcher, units=units, rank=0, world=1, seed=5, position=position,
                               shuffle_shards=size))
        return [next(it) for _ in range(count)]

    assert {int(r["unit"]) for r in head(1, n)} == {first}  # one shard at a time: one topic
    mixed = head(4, total + 20)
    assert len({int(r["unit"]) for r in mixed[:n]}) >= 3    # four shards interleaved
    ids = [r["sample_id"] for r in mixed]
    assert len(set(ids[:total])) == total                   # every sample once per epoch
    for position in (0, 5, n + 3, total - 2):
        assert [r["sample_id"] for r in head(4, 20, position)] == ids[position:position + 20]


def test_the_shuffle_window_is_part_of_the_batch_layout_a_resume_keeps():
    """Another window reorders the samples, so a resume with another train.shuffle_shards is
    refused — and a checkpoint from before windows existed read one shard at a time."""
    from orchestrator.errors import ConfigError
    from orchestrator.train.layout import batch_layout, refuse_changed_layout

    def layout(w):
        return batch_layout(batch_size=8, grad_accum=1, num_workers=1, seed=0, shuffle_shards=w)

    before = {k: v for k, v in layout(1).items() if k != "train.shuffle_shards"}
    refuse_changed_layout(before, layout(1), what="run")
    refuse_changed_layout(layout(8), layout(8), what="run")
    for old in (before, layout(4)):
        with pytest.raises(ConfigError, match=r"train.shuffle_shards (1|4) → 8"):
            refuse_changed_layout(old, layout(8), what="run")


def test_a_fresh_streaming_worker_starts_before_its_first_window_is_captured(captured):
    """In a streaming run the first window's later shards do not exist yet, and the capture
    pauses until the readers catch up (train.max_shards_ahead): a fresh worker must start
    reading without asking for their row counts — waiting for them hung `run` with
    max_shards_ahead below train.shuffle_shards. A resumed worker asks only for the windows it
    has read."""
    fs, root = filesystem(str(capture_folder(captured["out"])))
    m = load_manifest(fs, root)
    published = sorted(m.shards)
    units = published + [max(published) + 1, max(published) + 2]  # two not captured yet
    watcher = ShardWatcher(str(capture_folder(captured["out"])), wait=False)  # raises if asked

    whole = SampleStream(watcher, units=units, rank=0, world=1, seed=5, streaming=True,
                         shuffle_shards=len(units))
    assert whole._locate(0) == (0, (0, 0))
    small = SampleStream(watcher, units=units, rank=0, world=1, seed=5, streaming=True,
                         shuffle_shards=2)
    first_two = sum(m.shards[u].rows for u in published[:2])
    assert small._locate(first_two) == (0, (1, 0))  # window 1 starts: its rows not asked for
    assert small._locate(first_two + 3) == (0, (1, 3))
    with pytest.raises(ShardError, match="not in"):  # a position past the captured shards
        small._locate(sum(s.rows for s in m.shards.values()) + 1)


def test_the_first_pipeline_reads_one_epoch_ahead_not_eight(captured):
    """Ray Data decodes a pipeline's shards as fast as its read tasks can, whether or not the
    student gets to them: the first pipeline spans one epoch, so a student that stops within it
    (a sweep trial of a fraction of an epoch) has not decoded eight on the CPUs it trains on."""
    import ray

    from orchestrator.train.board import ShardBoard

    fs, root = filesystem(str(capture_folder(captured["out"])))
    units = sorted(load_manifest(fs, root).shards)
    watcher = ShardWatcher(str(capture_folder(captured["out"])), wait=False)
    board = ray.remote(ShardBoard).options(num_cpus=0).remote(max_ahead=1)
    try:
        rows = iter(SampleStream(watcher, units=units, rank=0, world=1, seed=5,
                                 report_to=(board, "kd")))
        next(rows)

        def reads():
            return ray.get(board.snapshot.remote())["shard_reads"].get("kd", 0)

        # Ray Data reads ahead at the speed of its read tasks: on a loaded machine the first epoch
        # may take well over seconds. Wait for it, then give the pipeline time to read past it.
        deadline = time.monotonic() + 120
        while reads() < len(units) and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(5)
        assert reads() == len(units)  # the old eight-epoch pipeline read on to 8 × 11 = 88
        rows.close()
    finally:
        ray.kill(board)
