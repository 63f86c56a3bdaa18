import pytest

from orchestrator import data
from orchestrator.errors import DataError
from tests.conftest import write_jsonl

KW = dict(field="text", fallback_field="text", id_field="id", limit=None)


def test_records_ids_and_units(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "b", "id": 7}, "", {"text": "c"}])
    recs = list(data.iter_records(data.dataset_files(p), on_bad_line="stop", **KW))
    assert [r.sample_id for r in recs] == ["d.jsonl:1", "7", "d.jsonl:4"]
    assert [(u, [r.text for r in b]) for u, b in data.units(recs, 2)] == [(0, ["a", "b"]), (1, ["c"])]


def test_malformed_line_stops_with_file_and_line(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, '{"text": "b"', {"text": "c"}])
    with pytest.raises(DataError, match=r"d.jsonl:2: malformed JSON .*data.on_bad_line=skip"):
        data.scan(p, on_bad_line="stop", **KW)


def test_malformed_lines_skipped_and_counted(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, "[1, 2]", {"txt": "x"}, {"text": ""},
                                           "not json", {"text": "c"}])
    result = data.scan(p, on_bad_line="skip", **KW)
    assert result.records == 2
    assert [s.split(": ", 1)[1] for s in result.skipped] == [
        "expected a JSON object, got list", "missing string field 'text'", "empty 'text'",
        "malformed JSON (Expecting value at column 1)"]
    assert result.skipped[0].endswith("d.jsonl:2: expected a JSON object, got list")


def test_empty_and_missing_dataset(tmp_path):
    with pytest.raises(DataError, match="holds no usable records"):
        data.scan(write_jsonl(tmp_path / "e.jsonl", []), on_bad_line="stop", **KW)
    with pytest.raises(DataError, match="does not exist"):
        data.scan(str(tmp_path / "missing.jsonl"), on_bad_line="stop", **KW)
    (tmp_path / "dir").mkdir()
    with pytest.raises(DataError, match="without \\*.jsonl"):
        data.scan(str(tmp_path / "dir"), on_bad_line="stop", **KW)


def test_duplicate_ids_refused(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "id": 1}, {"text": "b", "id": 1}])
    with pytest.raises(DataError, match="id '1' was already used at .*d.jsonl:1"):
        data.scan(p, on_bad_line="stop", **KW)


def test_directory_and_glob(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}])
    write_jsonl(tmp_path / "b.jsonl", [{"text": "b"}])
    assert data.scan(str(tmp_path), on_bad_line="stop", **KW).records == 2
    assert data.scan(str(tmp_path / "*.jsonl"), on_bad_line="stop", **KW).records == 2


def test_long_text_split_and_truncate():
    from actors.teacher import split_tokens

    toks = list(range(10))
    assert split_tokens(toks, 4, "split") == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert split_tokens(toks, 4, "truncate") == [[0, 1, 2, 3]]
    assert split_tokens(list(range(9)), 4, "split") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert split_tokens(toks, 20, "split") == [toks]


def test_content_digest_follows_bytes_and_names_not_directories(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    rows = [{"text": "a"}, {"text": "b"}]
    first = data.content_digest([data.dataset_files(write_jsonl(tmp_path / "a" / "d.jsonl", rows))[0]])
    copy = data.content_digest([data.dataset_files(write_jsonl(tmp_path / "b" / "d.jsonl", rows))[0]])
    assert first == copy and first["files"] == [{"name": "d.jsonl", "bytes": 28}]
    edited = write_jsonl(tmp_path / "b" / "d.jsonl", [{"text": "a"}, {"text": "c"}])  # same size
    assert data.content_digest(data.dataset_files(edited))["sha256"] != first["sha256"]
    renamed = write_jsonl(tmp_path / "b" / "e.jsonl", rows)  # ids default to <file name>:<line>
    assert data.content_digest(data.dataset_files(renamed))["sha256"] != first["sha256"]


def test_missing_eval_file_is_named_as_data_eval_path(tmp_path):
    with pytest.raises(DataError, match=r"^data.eval_path .*e.jsonl does not exist"):
        data.dataset_files(str(tmp_path / "e.jsonl"), key="data.eval_path")
