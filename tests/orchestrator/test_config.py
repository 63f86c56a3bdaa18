import pytest

from orchestrator.config import load_config
from orchestrator.errors import ConfigError

BASE = ["teacher.model=/m", "data.path=/d.jsonl", "output_dir=/o"]


def test_quickstart_example_loads():
    from orchestrator.driver.demo import QUICKSTART

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
    ("train.shuffle_shards=0", "train.shuffle_shards must be at least 1"),
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


# --------------------------------------------------------------------------- path fields

def test_paths_expand_home_and_environment_variables_once_at_load(tmp_path, monkeypatch):
    """Every path field: `~` and $VAR / ${VAR} expanded when the config is loaded, local paths
    made absolute; a space name and a hub id stay names; a URI keeps its scheme."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RD_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("RD_BUCKET", "bucket")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["teacher.model=~/teacher", "data.path=$RD_DATA/d.jsonl",
                             "data.eval_path=~/held/e.jsonl", "output_dir=${RD_DATA}/../runs/x",
                             "tune.space=~/spaces/s.yaml"])
    assert cfg.teacher.model == str(tmp_path / "home" / "teacher")
    assert cfg.data.path == str(tmp_path / "data" / "d.jsonl")
    assert cfg.data.eval_path == str(tmp_path / "home" / "held" / "e.jsonl")
    assert cfg.output_dir == str(tmp_path / "runs" / "x")
    assert cfg.tune.space == str(tmp_path / "home" / "spaces" / "s.yaml")
    named = load_config(None, BASE + ["tune.space=sizes", "teacher.model=org/model",
                                      "output_dir=s3://$RD_BUCKET/run?region=x"])
    assert (named.tune.space, named.teacher.model) == ("sizes", "org/model")
    assert named.output_dir == "s3://bucket/run?region=x"


@pytest.mark.parametrize("key", ["teacher.model", "data.path", "data.eval_path", "output_dir",
                                 "tune.space"])
def test_an_unset_variable_in_a_path_names_the_key_and_the_variable(key, monkeypatch):
    monkeypatch.delenv("RD_NOT_SET", raising=False)
    with pytest.raises(ConfigError) as e:
        load_config(None, BASE + [f"{key}=${{RD_NOT_SET}}/x.yaml"])
    assert str(e.value).startswith(f"{key} ${{RD_NOT_SET}}/x.yaml uses the environment variable "
                                   "RD_NOT_SET, which is not set; export RD_NOT_SET=")


def test_fingerprint_follows_the_teacher_not_the_spelling_of_its_path(tmp_path, monkeypatch):
    """`~/t`, `/home/…/t/`, `x/../t` and a symlink to t are one teacher; another directory is
    another teacher."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "t").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "t")

    def fingerprint(model: str) -> str:
        return load_config(None, [f"teacher.model={model}", "data.path=/d.jsonl",
                                  "output_dir=/o"]).capture_fingerprint(data_sha256="x")

    spellings = ["~/t", str(tmp_path / "t") + "/", f"{tmp_path}/other/../t", str(tmp_path / "link")]
    assert {fingerprint(s) for s in spellings} == {fingerprint(str(tmp_path / "t"))}
    assert fingerprint(str(tmp_path / "other")) != fingerprint(str(tmp_path / "t"))


def _plan_fingerprints(cfg) -> dict[str, str]:
    """capture kind → fingerprint of the main and held-out captures (reads only)."""
    from orchestrator.shards.plan import scan_captures
    from orchestrator.teacher_info import inspect_teacher

    info = inspect_teacher(cfg.teacher.model)
    return {s.kind.value: s.fingerprint for s in scan_captures(cfg, info)}


def test_the_heldout_file_is_in_the_heldout_capture_s_fingerprint_only(tiny_teacher, texts,
                                                                        tmp_path, monkeypatch):
    """Another held-out file leaves the main capture's fingerprint as it is; the held-out
    capture follows the file's content, whatever its path or spelling."""
    from tests.conftest import write_jsonl

    monkeypatch.setenv("HOME", str(tmp_path))
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts[:20]])
    write_jsonl(tmp_path / "e1.jsonl", [{"text": t} for t in texts[20:30]])
    write_jsonl(tmp_path / "e2.jsonl", [{"text": t} for t in texts[30:40]])
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "e1.jsonl").write_bytes((tmp_path / "e1.jsonl").read_bytes())

    def plan(eval_path: str) -> dict[str, str]:
        return _plan_fingerprints(load_config(None, [
            f"teacher.model={tiny_teacher}", f"data.path={data}", f"data.eval_path={eval_path}",
            "output_dir=/o", "data.max_length=64", "teacher.k=8"]))

    first, other = plan(str(tmp_path / "e1.jsonl")), plan("~/e2.jsonl")
    assert first["main"] == other["main"] and first["heldout"] != other["heldout"]
    assert plan("~/copy/e1.jsonl") == first  # the same bytes elsewhere, spelled with ~


def test_errors_about_the_heldout_file_name_data_eval_path(tiny_teacher, texts, tmp_path):
    """The held-out capture reads the file data.eval_path names; its errors say so (gone
    between planning and capturing, here)."""
    from orchestrator.shards.plan import CaptureKind, plan_captures
    from orchestrator.errors import DataError
    from tests.conftest import write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts[:8]])
    held = tmp_path / "e.jsonl"
    write_jsonl(held, [{"text": t} for t in texts[8:12]])
    cfg = load_config(None, [f"teacher.model={tiny_teacher}", f"data.path={data}",
                             f"data.eval_path={held}", f"output_dir={tmp_path / 'out'}",
                             "data.max_length=64", "teacher.k=8", "train.baselines=[]"])
    (plan,) = [p for p in plan_captures(cfg) if p.kind is CaptureKind.HELDOUT]
    held.unlink()
    with pytest.raises(DataError) as e:
        list(plan.units())
    assert str(e.value).startswith(f"data.eval_path {held} does not exist")


def test_the_demo_and_the_quickstart_plan_the_same_captures(tiny_teacher, texts, tmp_path,
                                                            monkeypatch):
    """README: after `raydistill demo`, `raydistill run|train|tune examples/quickstart.yaml` work
    on the same output_dir. The demo passes absolute paths (--set teacher.model=/home/…), the
    file spells them `~/.cache/raydistill/…`: every capture plans with the same fingerprint, so
    the plain config resumes the demo's captures instead of refusing them as another capture.
    The demo runs for real up to its `run`, which here only plans (no Ray, no teacher)."""
    import dataclasses
    import json
    import shutil

    from orchestrator.driver import pipeline
    from orchestrator.shards.plan import CaptureKind, plan_captures
    from orchestrator.driver.demo import QUICKSTART, run_demo
    from tests.conftest import write_jsonl

    home = tmp_path / "home"
    cache = home / ".cache" / "raydistill"
    shutil.copytree(tiny_teacher, cache / "demo-teacher")
    (cache / "demo-teacher" / "demo.json").write_text(json.dumps(  # as a built demo teacher has
        {"heldout_nats": 3.0, "unigram_nats": 5.0, "train_minutes": 0.1, "steps": 1000}))
    (cache / "demo-data").mkdir()
    write_jsonl(cache / "demo-data" / "transfer.jsonl",
                [{"id": f"m:{i}", "text": t} for i, t in enumerate(texts[:24])])
    write_jsonl(cache / "demo-data" / "heldout.jsonl",
                [{"id": f"h:{i}", "text": t} for i, t in enumerate(texts[24:32])])
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("RAYDISTILL_HOME", raising=False)
    monkeypatch.chdir(tmp_path)  # the quickstart's output_dir runs/quickstart lands here
    demo = {}

    class Planned(Exception):
        pass

    def plan_only(cfg, *, fresh=False):
        demo["cfg"], demo["plans"] = cfg, plan_captures(cfg, fresh=fresh, command="run")
        raise Planned

    monkeypatch.setattr(pipeline, "run", plan_only)
    with pytest.raises(Planned):
        run_demo(overrides=[], teacher_minutes=0, home=None, rebuild=False)
    plain = load_config(QUICKSTART)
    assert plain.output_dir == demo["cfg"].output_dir == str(tmp_path / "runs" / "quickstart")
    assert "~" not in plain.data.eval_path
    made = {p.kind: p.manifest.fingerprint for p in demo["plans"]}
    assert set(made) == {CaptureKind.MAIN, CaptureKind.HELDOUT, CaptureKind.BC}
    kd_only = dataclasses.replace(plain, train=dataclasses.replace(plain.train, baselines=[]))
    for command, cfg in (("run", plain), ("train", plain), ("tune", kd_only)):
        plans = plan_captures(cfg, command=command)  # the demo's own capture folders
        assert {p.kind: p.manifest.fingerprint for p in plans} == \
            {p.kind: made[p.kind] for p in plans}
