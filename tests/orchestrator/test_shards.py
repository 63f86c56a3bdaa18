import io

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from orchestrator.shards import format as shards
from orchestrator.errors import ShardError
from orchestrator.shards.manifest import Manifest, load_manifest, save_manifest
from orchestrator.kd.softlabels import SoftLabels


def fake_labels(rng, T, k, vocab=5000, label_start=0, n=None):
    n = T - label_start if n is None else n
    lps = np.sort(rng.normal(-6, 3, size=(n, k)).astype(np.float32), axis=1)[:, ::-1]
    lps = lps - np.log(np.exp(lps.astype(np.float64)).sum(axis=1, keepdims=True) / 0.9)  # Σp = 0.9
    ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(n)]).astype(np.int32)
    tlp = np.minimum(rng.normal(-4, 2, size=n), 0).astype(np.float32)
    tlp[-1] = np.nan
    tail = rng.uniform(0, 0.5, size=(n, 2)).astype(np.float32)
    return SoftLabels(rng.integers(0, vocab, T).astype(np.int32), label_start + 1 if label_start else 0,
                      label_start, ids, np.ascontiguousarray(lps), tlp, tail, (1.0, 2.0))


def test_logprob_quantisation_error_bound():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1, size=(1000, 200)) * rng.uniform(0.1, 8, size=(1000, 1))
    lp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    lps = np.sort(lp, axis=1)[:, ::-1][:, :64].astype(np.float32)   # real rows: Σ p < 1
    back = shards.dequantise_logprobs(shards.quantise_logprobs(lps))
    err = back - lps  # toward lower probability: never above the true value, < 1/51 nat below
    assert err.max() <= 1e-6 and err.min() >= -1.0 / shards.LOGPROB_SCALE - 1e-6
    # what a softmax over the top-k sees, the differences within a row, err by < 1/51 nat
    spread = err.max(axis=1) - err.min(axis=1)
    assert spread.max() < 1.0 / shards.LOGPROB_SCALE


def test_quantised_rows_never_sum_to_one_or_more():
    """Peaked rows whose tail is tiny: rounding to nearest would lift Σp to ≥ 1 (the old format's
    bug, which made the recomputed tail clamp to 1e-12); rounding toward lower probability never
    does — also for rows whose fp32 log-probs themselves sum to 1."""
    import torch

    rng = np.random.default_rng(5)
    logits = torch.from_numpy(rng.normal(0, 1, size=(2000, 300))).float()
    logits[:, 0] += torch.from_numpy(rng.uniform(0, 25, size=2000)).float()  # from flat to peaked
    lps = torch.log_softmax(logits, -1).topk(16, -1).values.numpy()
    lps[0] = np.log(np.full(16, 1 / 16, dtype=np.float32))   # the whole mass in the top-k
    lps[1, 0], lps[1, 1:] = 0.0, -104.0                       # p = 1 in fp32
    back = shards.dequantise_logprobs(shards.quantise_logprobs(lps)).astype(np.float64)
    sums = np.exp(back).sum(axis=1)
    assert sums.max() < 1.0
    nearest = -np.rint(-lps.astype(np.float64) * shards.LOGPROB_SCALE) / shards.LOGPROB_SCALE
    assert (np.exp(nearest).sum(axis=1) >= 1.0).sum() > 10  # the case is real


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
        assert np.abs(g["topk_logprobs"][s:s + n] - sl.topk_logprobs).max() <= 1 / 51
        assert (g["topk_ids"][:s] == -1).all() and np.isneginf(g["topk_logprobs"][:s]).all()
        np.testing.assert_allclose(g["target_logprobs"][s:s + n], sl.target_logprobs, atol=0.01)
        # tail masses come back exactly (fp32), one column per stored temperature
        np.testing.assert_array_equal(g["tail_mass"][s:s + n], sl.tail_mass)
        assert np.isnan(g["tail_mass"][:s]).all() and g["tail_mass"].shape == (T, 2)
        np.testing.assert_array_equal(g["tail_temperatures"], [1.0, 2.0])
    # the same file is plain Parquet with self-describing metadata
    table = pq.read_table(f"{root}/shards/{info.file}")
    meta = shards.shard_metadata(table)
    assert meta["k"] == 8 and meta["format_version"] == shards.FORMAT_VERSION == 4
    assert meta["tail_temperatures"] == [1.0, 2.0]
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
    with pytest.raises(ShardError, match="format 0 .* reads format 4.*--fresh"):
        shards.load_shard(buf.getvalue(), name="old.parquet")
