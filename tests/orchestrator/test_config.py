import pytest

from orchestrator.config import load_config
from orchestrator.errors import ConfigError

BASE = ["teacher.model=/m", "data.path=/d.jsonl", "output_dir=/o"]


def test_quickstart_example_loads():
    from orchestrator.demo import QUICKSTART

    cfg = load_config(QUICKSTART)
    assert cfg.teacher.backend == "vllm" and cfg.teacher.k == 64 and cfg.teacher.mode == "score"
    assert "~" not in cfg.teacher.model  # expanded


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("teacher: {model: /m, k: 16, mode: sample, temperature: 0.7}\n"
                 "data: {path: /d.jsonl}\noutput_dir: s3://bucket/run\n")
    cfg = load_config(p, ["teacher.k=32", "teacher.num_actors=3"])
    assert (cfg.teacher.k, cfg.teacher.num_actors, cfg.teacher.temperature) == (32, 3, 0.7)
    assert cfg.output_dir == "s3://bucket/run"


def test_fingerprint_tracks_content_settings_only():
    a = load_config(None, BASE)
    assert a.capture_fingerprint() == load_config(None, BASE + ["teacher.num_actors=4"]).capture_fingerprint()
    assert a.capture_fingerprint() != load_config(None, BASE + ["teacher.k=32"]).capture_fingerprint()
    # sampling settings matter to sample-mode captures only
    assert a.capture_fingerprint() == \
        load_config(None, BASE + ["teacher.max_new_tokens=7"]).capture_fingerprint()
    s = load_config(None, BASE + ["teacher.mode=sample"])
    assert s.capture_fingerprint() != \
        load_config(None, BASE + ["teacher.mode=sample", "teacher.max_new_tokens=7"]).capture_fingerprint()


@pytest.mark.parametrize("override, message", [
    ("teacher.k=abc", "teacher.k must be an integer, got 'abc'"),
    ("teacher.k=0", "teacher.k must be at least 1, got 0"),
    ("teacher.mode=distil", "teacher.mode must be one of score | sample, got 'distil'"),
    ("teacher.backend=tgi", "teacher.backend must be one of vllm | hf"),
    ("teacher.kk=1", "unknown config key teacher.kk; valid keys in teacher:"),
    ("teacher.temperature=0", "teacher.temperature must be > 0"),
    ("teacher.memory_fraction=1.5", "teacher.memory_fraction must be in (0, 1)"),
    ("data.on_bad_line=ignore", "data.on_bad_line must be one of stop | skip"),
    ("students=1", "unknown config key 'students'"),
    ("student=1", "student must be a mapping of fields, got 1"),
    ("noequals", "must look like key=value"),
])
def test_bad_fields_name_field_value_and_fix(override, message):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(None, BASE + [override])
    assert message in str(e.value)


def test_missing_required_fields():
    with pytest.raises(ConfigError, match="teacher.model is empty"):
        load_config(None, ["data.path=/d", "output_dir=/o"])


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: {model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listy)


def test_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text("{}\n")
    cfg = load_config(None, ["teacher.model=org/model", "data.path=d.jsonl", "output_dir=runs/x"])
    assert cfg.output_dir == str(tmp_path / "runs" / "x")
    assert cfg.data.path == str(tmp_path / "d.jsonl")
    assert cfg.teacher.model == "org/model"  # a hub id stays as it is
    assert load_config(None, BASE[:2] + ["output_dir=s3://b/p"]).output_dir == "s3://b/p"


@pytest.mark.parametrize("override, message", [
    ("train.loss=kl2", "train.loss must be one of fkl | rkl | jsd | tvd, got 'kl2'"),
    ("train.tail=drop", "train.tail must be one of renormalize | bucket"),
    ("train.alpha=1.5", "train.alpha must be in [0, 1]"),
    ("train.beta=0", "train.beta must be in (0, 1)"),
    ("student.heads=3", "student.heads (3) must divide student.hidden (128)"),
    ("student.preset=giant", "student.preset must be one of nano, micro"),
    ("train.grad_accum=0", "train.grad_accum must be at least 1"),
])
def test_training_sections_validated_before_work(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, BASE + [override])
    assert message in str(e.value)


def test_training_sections_do_not_change_the_capture_fingerprint():
    a = load_config(None, BASE)
    b = load_config(None, BASE + ["train.loss=jsd", "student.preset=mini", "train.temperature=2"])
    assert a.capture_fingerprint() == b.capture_fingerprint()
    assert b.train.loss == "jsd" and b.student.preset == "mini"


def test_fingerprint_covers_the_data_by_content_not_by_path():
    a = load_config(None, BASE)
    moved = load_config(None, ["teacher.model=/m", "data.path=/elsewhere/d.jsonl", "output_dir=/o"])
    assert a.capture_fingerprint(data_sha256="x") == moved.capture_fingerprint(data_sha256="x")
    assert a.capture_fingerprint(data_sha256="x") != a.capture_fingerprint(data_sha256="y")
    # the held-out fraction counts through the records a capture keeps
    assert a.capture_fingerprint(selection="train:0.05") != \
        a.capture_fingerprint(selection="train:0.1")
    assert a.capture_keys(data_sha256="x")["data"]["content_sha256"] == "x"
    assert "path" not in a.capture_keys()["data"]
