"""Pretrained students (`student.model`): the config's rules (a file names a model or a shape,
`--set` of one replaces the other), the tokenizer check, trials varying the model, and real
`raydistill train` runs of a few steps on two families — a Llama student that must start from
its saved weights, and a Qwen2 student whose embedding table is smaller than the teacher's
padded one (the teacher's padded ids are folded into the tail, and reported).

    PYTHONPATH=$PWD python -m pytest -q tests/test_pretrained.py      # ~3 min on 2 CPUs
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from orchestrator.driver import tiny
from orchestrator.errors import ConfigError
from tests.conftest import run_cli, train_config, write_jsonl

QWEN_PADDED_ROWS = 40  # as tests/test_families.py: the teacher's table padded past its tokenizer


def _student(out: Path, tokenizer_dir: str, config, *, texts: list[str] | None = None,
             steps: int = 0) -> str:
    """A tiny "pretrained" student: `config`'s model (random init, seed 7), trained `steps` next-
    token steps on `texts` when given, saved with `tokenizer_dir`'s tokenizer files."""
    from orchestrator.teacher_info import load_tokenizer

    out.mkdir(parents=True)
    for f in Path(tokenizer_dir).glob("tok*"):
        shutil.copy(f, out)
    for f in Path(tokenizer_dir).glob("special_tokens_map.json"):
        shutil.copy(f, out)
    model = tiny.build_model(config, seed=7)
    if steps:
        tok = load_tokenizer(tokenizer_dir)
        ids = [t for text in texts for t in tok(text)["input_ids"]]
        tiny.train_lm(model, ids, max_steps=steps, batch=4, seq=64, lr=3e-3)
    model.save_pretrained(str(out), safe_serialization=True)
    return str(out)


def _weights(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and the CLI's output, whitespace folded to single spaces."""
    code, text = run_cli(argv, capsys)
    return code, " ".join(text.split())


def _report(out: Path) -> dict:
    (path,) = (out / "experiments").glob("*/report.json")
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def llama(tmp_path_factory, captured, texts):
    """The session's Llama teacher and capture (copied), and a 1-layer Llama student of it
    trained 20 steps on other texts, saved with the teacher's tokenizer."""
    root = tmp_path_factory.mktemp("pretrained-llama")
    out = root / "out"
    shutil.copytree(captured["out"], out, ignore=shutil.ignore_patterns("experiments"))
    teacher = captured["model"]
    from orchestrator.teacher_info import load_tokenizer

    cfg = tiny.llama_config(len(load_tokenizer(teacher)), layers=1, hidden=128, heads=2,
                            max_positions=256)
    student = _student(root / "student", teacher, cfg, texts=texts[40:80], steps=20)
    return {"root": root, "out": out, "teacher": teacher, "data": captured["data"],
            "student": student}


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory, texts, ray_session):
    """A Qwen2 teacher whose table is padded 40 rows past its 512-token tokenizer, its capture
    (main + held-out), and a 1-layer Qwen2 student with one row per token (smaller than the
    teacher's table), saved at its random init."""
    from orchestrator.driver.pipeline import capture

    root = tmp_path_factory.mktemp("pretrained-qwen2")
    teacher = root / "teacher"
    tok = tiny.train_tokenizer(list(tiny.chunks_of_text(tiny.stdlib_sources()[7:27])), teacher,
                               vocab_size=512)
    model = tiny.build_model(tiny.family_config("qwen2", len(tok) + QWEN_PADDED_ROWS, layers=2,
                                                max_positions=256), seed=0)
    tiny.sharpen(model, scale=6.0)
    model.save_pretrained(str(teacher), safe_serialization=True)
    data = write_jsonl(root / "data.jsonl", [{"id": i, "text": t} for i, t in enumerate(texts[:40])])
    cfg = train_config(root / "out", str(teacher), data, **{"train.baselines": "[]"})
    capture(cfg)
    student = _student(root / "student", str(teacher),
                       tiny.family_config("qwen2", len(tok), layers=1, max_positions=256))
    return {"root": root, "out": root / "out", "teacher": str(teacher), "data": data,
            "student": student, "tokens": len(tok)}


def _config_file(path: Path, out: Path, teacher: str, data: str, *, student: dict | None = None,
                 **sets) -> Path:
    """A full config file (every section) of a short local-mode KD run without baselines; its
    student section replaced by `student` when given."""
    cfg = dataclasses.asdict(train_config(out, teacher, data, **{
        "train.baselines": "[]", "train.num_workers": 0, "train.max_steps": 4,
        "train.eval_every": 4, "train.log_every": 1, **sets}))
    if student is not None:
        cfg["student"] = student
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# --------------------------------------------------------------------------- config rules

def _load(tmp_path, student: dict, overrides=()):
    from orchestrator.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"teacher": {"model": "/t"}, "data": {"path": "/d.jsonl"},
                                    "output_dir": "/o", "student": student}))
    return load_config(path, list(overrides))


def test_a_file_naming_a_model_and_a_shape_is_refused(tmp_path):
    for shape in ({"preset": "micro"}, {"layers": 2}, {"init_from_teacher": True}):
        with pytest.raises(ConfigError) as e:
            _load(tmp_path, {"model": "/s", **shape})
        (key, value), = shape.items()
        assert f"sets both student.model (/s) and student.{key} ({value})" in str(e.value)


def test_set_model_replaces_the_files_preset_and_says_so(tmp_path, capsys):
    cfg = _load(tmp_path, {"preset": "micro", "layers": 2}, ["student.model=/s"])
    assert (cfg.student.model, cfg.student.preset, cfg.student.layers) == ("/s", None, None)
    said = " ".join(capsys.readouterr().err.split())
    assert ("student.model /s (--set) replaces the config file's student.preset=micro, "
            "student.layers=2: the pretrained model's own shape is used") in said
    cfg = _load(tmp_path, {"model": "/s"}, ["student.preset=mini"])  # and the other way round
    assert (cfg.student.model, cfg.student.preset) == ("", "mini")
    assert "replaces the config file's student.model /s" in capsys.readouterr().err
    cfg = _load(tmp_path, {"model": "/s"})  # a model alone: the default preset does not apply
    assert (cfg.student.model, cfg.student.preset) == ("/s", None)
    with pytest.raises(ConfigError, match="name both a pretrained student and a shape"):
        _load(tmp_path, {}, ["student.model=/s", "student.preset=nano"])


# --------------------------------------------------------------------------- tokenizer check

def test_a_student_with_another_tokenizer_is_refused_naming_the_first_differing_id(
        llama, tmp_path):
    from orchestrator.student_info import inspect_student
    from orchestrator.teacher_info import load_tokenizer

    other = tmp_path / "other"
    tok = tiny.train_tokenizer(list(tiny.chunks_of_text(tiny.stdlib_sources()[200:215])), other,
                               vocab_size=1024)
    tiny.build_model(tiny.llama_config(len(tok), layers=1), other, seed=0)
    teacher_tok = load_tokenizer(llama["teacher"])
    first = next(i for i in range(1024) if teacher_tok.convert_ids_to_tokens(i)
                 != tok.convert_ids_to_tokens(i))
    with pytest.raises(ConfigError) as e:
        inspect_student(str(other), revision=None, teacher=llama["teacher"])
    assert (f"student.model {other}: its tokenizer differs from the teacher's at id {first} "
            f"(teacher {teacher_tok.convert_ids_to_tokens(first)!r}, student "
            f"{tok.convert_ids_to_tokens(first)!r}); cross-tokenizer distillation is not "
            "supported") in str(e.value)
    info = inspect_student(llama["student"], revision=None, teacher=llama["teacher"])
    assert (info.shape.layers, info.shape.hidden, info.rows) == (1, 128, 1024)
    assert info.parameters == sum(t.numel() for t in _weights(llama["student"]).values())


def test_a_pretrained_student_not_smaller_than_the_teacher_is_warned_by_its_real_size(
        llama, capsys):
    """The size check counts the pretrained model's real parameters against the teacher's: the
    teacher itself as a "student" is warned about, the 1-layer student is not."""
    from orchestrator.driver.preflight import warn_if_not_smaller
    from orchestrator.student_info import inspect_student

    for model, warned in ((llama["teacher"], True), (llama["student"], False)):
        info = inspect_student(model, revision=None, teacher=llama["teacher"])
        warn_if_not_smaller(llama["teacher"], info.shape, parameters=info.parameters)
        said = " ".join(capsys.readouterr().err.split())
        assert ("is about 1.0× the teacher's size" in said and "pick a smaller student.model"
                in said) == warned, said


# --------------------------------------------------------------------------- sweeps

def test_a_trial_may_vary_the_pretrained_model(llama, qwen2):
    """spec_for: a trial naming a model trains it (its own shape, the base's dropped); a trial
    naming a shape over a pretrained base builds that shape."""
    from dataclasses import replace

    from orchestrator.shapes import resolve_shape
    from tests.test_tune import _base_spec
    from tune_spaces.sweep import spec_for

    base = _base_spec(llama["teacher"])
    shape_base = {"preset": "nano", "layers": None, "hidden": None, "heads": None,
                  "intermediate": None, "init_from_teacher": False, "model": "", "revision": None}
    spec = spec_for(base, student=shape_base, params={"student.model": llama["student"]})
    assert spec.student.model == llama["student"]
    assert (spec.student.shape.layers, spec.student.shape.hidden) == (1, 128)
    pretrained = shape_base | {"preset": None, "model": llama["student"]}
    spec = spec_for(replace(base, student=replace(base.student, model=llama["student"])),
                    student=pretrained, params={"student": {"preset": "micro"}})
    assert (spec.student.model, spec.student.shape) == ("", resolve_shape(preset="micro"))


def test_a_space_varies_the_model_only_categorically(tmp_path, monkeypatch):
    from tune_spaces import load_space

    with pytest.raises(ConfigError, match="student.model is categorical"):
        load_space({"student.model": {"uniform": [0, 1]}})
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "m").mkdir()
    (axis,) = load_space({"student": {"grid": [{"model": "~/m"}]}}).axes
    assert axis.values == ({"model": str(tmp_path / "m")},)


def test_a_space_of_models_is_checked_before_any_trial(llama, qwen2, tmp_path):
    """Every model a sweep may draw goes through the tokenizer check first: a Qwen2 student
    (another tokenizer) in a Llama teacher's space is named."""
    from orchestrator.driver.sweeps import check_space
    from tune_spaces import load_space

    cfg = train_config(tmp_path / "o", llama["teacher"], llama["data"])
    space = load_space({"student.model": {"grid": [llama["student"], qwen2["student"]]}})
    with pytest.raises(ConfigError) as e:
        check_space(cfg, space)
    assert f"student.model={qwen2['student']}: student.model {qwen2['student']}: its tokenizer " \
        "differs from the teacher's" in str(e.value)
    check_space(cfg, load_space({"student.model": {"grid": [llama["student"]]}}))


# --------------------------------------------------------------------------- end to end

def test_llama_student_starts_from_its_weights(llama, capsys):
    """`raydistill train` over a config file that names a preset, with --set student.model: the
    model replaces the preset (said), and the run starts from the model's weights — at a tiny
    learning rate, its held-out evaluation is the loaded model's, not a fresh student's."""
    from orchestrator.driver.tiny import build_model
    from orchestrator.kd.evaluate import evaluate, finish
    from orchestrator.shards.format import read_shards
    from transformers import AutoModelForCausalLM

    path = _config_file(llama["root"] / "c.yaml", llama["out"], llama["teacher"], llama["data"],
                        **{"train.lr": 1e-9, "train.warmup_steps": 0})
    code, text = _cli(["train", str(path), "--set", f"student.model={llama['student']}"], capsys)
    assert code == 0, text
    assert (f"student.model {llama['student']} (--set) replaces the config file's "
            "student.preset=nano") in text
    assert f"training the KD student (fkl, T=1.0, alpha=0.5): pretrained {llama['student']} " \
        "(1×128" in text
    report = _report(llama["out"])
    kd = report["students"]["kd"]
    held = list(read_shards(str(llama["out"]), capture="heldout"))
    loaded = AutoModelForCausalLM.from_pretrained(llama["student"], dtype=torch.float32)
    want = finish(evaluate(loaded, held))
    assert kd["positions"] == want["eval_positions"]
    assert kd["student_nll"] == pytest.approx(want["eval_student_nll"], abs=1e-4)
    assert kd["kl"] == pytest.approx(want["eval_kl"], abs=1e-4)
    fresh = build_model(loaded.config, seed=0)  # what a student built at this shape would be
    assert abs(finish(evaluate(fresh, held))["eval_student_nll"] - kd["student_nll"]) > 0.1
    exported = AutoModelForCausalLM.from_pretrained(kd["model_dir"], dtype=torch.float32)
    assert exported.config.num_hidden_layers == 1
    assert all(h["folded_mass"] == 0.0 for h in report["history"]["kd"])  # same table: no fold
    (md,) = (llama["out"] / "experiments").glob("*/report.md")
    assert f"student pretrained `{llama['student']}`" in md.read_text()


def test_qwen2_student_with_a_smaller_table_trains_folding_the_padded_ids(qwen2, capsys):
    """A config file naming only student.model: a Qwen2 student with 512 rows learns from a
    teacher with 552 (40 padded, random, so they carry mass): no index error, the folded mass is
    reported, the run starts from the saved weights (each weight moved at most a few Adam steps
    from it, a fresh init is far), and the exported directory loads with the tokenizer and
    serves."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from orchestrator.teacher_info import load_tokenizer

    path = _config_file(qwen2["root"] / "c.yaml", qwen2["out"], qwen2["teacher"], qwen2["data"],
                        student={"model": qwen2["student"]},
                        **{"train.lr": 3e-4, "train.warmup_steps": 0})
    code, text = _cli(["train", str(path)], capsys)
    assert code == 0, text
    assert "folded into the tail" in text and "no embedding row for" in text
    report = _report(qwen2["out"])
    kd = report["students"]["kd"]
    assert any(h["folded_mass"] > 0 for h in report["history"]["kd"])
    assert kd["steps"] == 4 and kd["student_nll"] == kd["student_nll"]  # finite, evaluated
    model_dir = kd["model_dir"]
    exported = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert exported.get_output_embeddings().weight.shape[0] == qwen2["tokens"]
    assert len(load_tokenizer(model_dir)) == qwen2["tokens"]
    start, end = _weights(qwen2["student"]), load_file(f"{model_dir}/model.safetensors")
    fresh = tiny.build_model(exported.config, seed=0).state_dict()
    for name in ("model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"):
        moved = (end[name] - start[name]).abs().max().item()
        assert 0 < moved <= 4 * 3 * 3e-4, (name, moved)   # 4 Adam steps of at most ~3·lr each
        assert (fresh[name] - start[name]).abs().mean().item() > 5 * moved
    _serves(model_dir)


def _serves(model_dir: str) -> None:
    """The exported student answers a completion through Ray Serve over real HTTP."""
    from openai import OpenAI

    from orchestrator.winners import ServedModel
    from serve import app
    from tests.conftest import serve_settings

    url = app.start([ServedModel(id="pretrained", path=model_dir)], serve_settings())
    try:
        client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        out = client.completions.create(model="pretrained", prompt="def f(", max_tokens=4,
                                        temperature=0)
        assert out.usage.completion_tokens >= 1, out
    finally:
        app.stop()
