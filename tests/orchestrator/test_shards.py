import io

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from orchestrator import shards
from orchestrator.errors import ShardError
from orchestrator.manifest import Manifest, load_manifest, save_manifest
from orchestrator.softlabels import SoftLabels


def fake_labels(rng, T, k, vocab=5000, label_start=0, n=None):
    n = T - label_start if n is None else n
    lps = np.sort(rng.normal(-6, 3, size=(n, k)).astype(np.float32), axis=1)[:, ::-1]
    lps = np.minimum(lps, -1e-3)
    ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(n)]).astype(np.int32)
    tlp = np.minimum(rng.normal(-4, 2, size=n), 0).astype(np.float32)
    tlp[-1] = np.nan
    return SoftLabels(rng.integers(0, vocab, T).astype(np.int32), label_start + 1 if label_start else 0,
                      label_start, ids, np.ascontiguousarray(lps), tlp)


def test_logprob_quantisation_error_bound():
    rng = np.random.default_rng(0)
    lps = np.sort(rng.uniform(-40, 0, size=(1000, 64)), axis=1)[:, ::-1].astype(np.float32)
    back = shards.dequantise_logprobs(shards.quantise_logprobs(lps))
    assert np.abs(back - lps).max() <= 0.5 / shards.LOGPROB_SCALE + 1e-6 < 0.01


def write_capture(fs, root, rows, k):
    fs.create_dir(f"{root}/shards", recursive=True)
    info = shards.write_shard(fs, f"{root}/shards", 0, rows, {"k": k, "mode": "score"})
    m = Manifest(fingerprint="f", capture={}, total_units=1, total_records=len(rows))
    m.shards[0] = info
    save_manifest(fs, root, m)
    return info


def test_round_trip_and_plain_pyarrow(tmp_path):
    rng = np.random.default_rng(1)
    rows = [("a", fake_labels(rng, 20, 8)), ("b#s0", fake_labels(rng, 12, 8, label_start=4, n=7))]
    fs, root = pafs.LocalFileSystem(), str(tmp_path)
    info = write_capture(fs, root, rows, 8)
    assert (info.rows, info.tokens, info.labelled_tokens) == (2, 32, 27)
    got = list(shards.read_shards(root))
    assert [g["sample_id"] for g in got] == ["a", "b#s0"]
    for g, (_, sl) in zip(got, rows):
        T, s, n = len(sl.input_ids), sl.label_start, len(sl.topk_ids)
        assert g["topk_ids"].shape == (T, 8) and g["topk_logprobs"].shape == (T, 8)
        np.testing.assert_array_equal(g["input_ids"], sl.input_ids)
        np.testing.assert_array_equal(g["topk_ids"][s:s + n], sl.topk_ids)
        assert np.abs(g["topk_logprobs"][s:s + n] - sl.topk_logprobs).max() <= 0.01
        assert (g["topk_ids"][:s] == -1).all() and np.isneginf(g["topk_logprobs"][:s]).all()
        np.testing.assert_allclose(g["target_logprobs"][s:s + n], sl.target_logprobs, atol=0.01)
    # the same file is plain Parquet with self-describing metadata
    table = pq.read_table(f"{root}/shards/{info.file}")
    meta = shards.shard_metadata(table)
    assert meta["k"] == 8 and meta["format_version"] == shards.FORMAT_VERSION
    assert "temperature 1" in meta["logprob_semantics"]
    assert not list(tmp_path.glob("shards/*.tmp"))


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_shard_is_named_never_read(tmp_path, damage):
    rng = np.random.default_rng(2)
    fs, root = pafs.LocalFileSystem(), str(tmp_path)
    info = write_capture(fs, root, [("a", fake_labels(rng, 30, 4))], 4)
    path = tmp_path / "shards" / info.file
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=f"{info.file} does not match its checksum.*--repair"):
        list(shards.read_shards(root))


def test_not_a_capture(tmp_path):
    with pytest.raises(ShardError, match="no manifest.json"):
        list(shards.read_shards(str(tmp_path)))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ShardError, match="not a valid raydistill manifest"):
        load_manifest(pafs.LocalFileSystem(), str(tmp_path))


def test_s3_round_trip(s3_server):
    rng = np.random.default_rng(3)
    fs, root = shards.filesystem(s3_server)
    rows = [("x", fake_labels(rng, 16, 4))]
    write_capture(fs, root, rows, 4)
    got = list(shards.read_shards(s3_server))
    np.testing.assert_array_equal(got[0]["topk_ids"], rows[0][1].topk_ids)
    assert load_manifest(fs, root).shards[0].rows == 1


def test_failed_write_keeps_previous_shards(tmp_path, monkeypatch):
    """Disk full while writing: the error says so, earlier shards and the manifest stay intact."""
    import builtins

    rng = np.random.default_rng(4)
    fs, root = pafs.LocalFileSystem(), str(tmp_path)
    info = write_capture(fs, root, [("a", fake_labels(rng, 10, 4))], 4)
    before = (tmp_path / "shards" / info.file).read_bytes()
    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def write(self, data):
            self.f.write(data[:10])
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(builtins, "open", lambda p, m="r", *a, **k:
                        Full(real_open(p, m, *a, **k)) if str(p).endswith(".tmp") else real_open(p, m, *a, **k))
    with pytest.raises(ShardError, match=r"No space left on device.*intact"):
        shards.write_shard(fs, f"{root}/shards", 1, [("b", fake_labels(rng, 10, 4))], {"k": 4})
    with pytest.raises(ShardError, match="No space left"):
        save_manifest(fs, root, load_manifest(fs, root))
    monkeypatch.undo()
    assert (tmp_path / "shards" / info.file).read_bytes() == before
    assert not list(tmp_path.rglob("*.tmp"))
    assert [r["sample_id"] for r in shards.read_shards(root)] == ["a"]


def test_other_format_refused_clearly(tmp_path):
    import pyarrow as pa

    old = pa.table({"sample_id": ["a"], "topk_ids": [[1, 2]]}).replace_schema_metadata(
        {shards.META_KEY: b'{"format_version": 0, "k": 2}'})
    buf = io.BytesIO()
    pq.write_table(old, buf)
    with pytest.raises(ShardError, match="format 0 .* reads format 2.*--fresh"):
        shards.load_shard(buf.getvalue(), name="old.parquet")
