"""The specs a run is made of, built from the config in one place (`orchestrator.driver.specs`,
`orchestrator.shards.plan`): every setting reaches the small spec that owns it, and the teacher
engine's settings stay apart from each capture's. Plans real captures (no Ray, no teacher run)."""

from __future__ import annotations

from dataclasses import fields

import pytest

from orchestrator.config import load_config


@pytest.fixture
def plans(tiny_teacher, texts, tmp_path):
    from orchestrator.shards.plan import CaptureKind, plan_captures
    from tests.conftest import write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts[:40]])
    sets = {"teacher.model": tiny_teacher, "data.path": data, "output_dir": tmp_path / "out",
            "teacher.k": 8, "data.max_length": 64, "data.long_text": "split",
            "data.eval_fraction": 0.2, "capture.samples_per_shard": 8, "train.baselines": "[]",
            "student.preset": "micro", "student.init_from_teacher": "true",
            "train.loss": "jsd", "train.temperature": 2.0, "train.alpha": 0.7,
            "train.beta": 0.3, "train.tail": "bucket", "train.lr": 5e-4,
            "train.warmup_steps": 3, "train.batch_size": 2, "train.grad_accum": 4,
            "train.max_steps": 30, "train.seed": 11, "train.eval_every": 10,
            "train.eval_samples": 5, "train.log_every": 5, "train.reader_cpus": 0.5,
            "teacher.tail_temperatures": "[2.0]", "train.packing": "true",
            "train.max_tokens_per_batch": 256, "train.precision": "bf16",
            "train.gradient_checkpointing": "true", "train.shuffle_shards": 3}
    cfg = load_config(None, [f"{k}={v}" for k, v in sets.items()])
    by_kind = {p.kind: p for p in plan_captures(cfg)}
    return cfg, by_kind[CaptureKind.MAIN], by_kind[CaptureKind.HELDOUT]


def test_a_student_runs_spec_takes_each_setting_from_the_config(plans, tiny_teacher):
    from orchestrator.driver.specs import train_spec
    from orchestrator.shapes import resolve_shape

    cfg, main, held = plans
    spec = train_spec(cfg, plan=main, held=held, alpha=0.7, board="board", streaming=True,
                      label="kd")
    assert (spec.student.teacher_model, spec.student.shape, spec.student.init_from_teacher) == \
        (tiny_teacher, resolve_shape(preset="micro"), True)
    assert (spec.data.shards_uri, spec.data.units, spec.data.streaming, spec.data.expect) == \
        (main.cfg.output_dir, list(range(main.manifest.total_units)), True, main.expect())
    assert spec.data.expect["long_text"] == "split" and spec.data.hard_labels_from_prompt is False
    assert (spec.loss.kind, spec.loss.temperature, spec.loss.alpha, spec.loss.beta,
            spec.loss.tail) == ("jsd", 2.0, 0.7, 0.3, "bucket")
    assert (spec.optim.lr, spec.optim.warmup_steps, spec.optim.batch_size, spec.optim.grad_accum,
            spec.optim.max_steps, spec.optim.seed) == (5e-4, 3, 2, 4, 30, 11)
    assert (spec.optim.packing, spec.optim.max_tokens_per_batch, spec.optim.precision,
            spec.run.gradient_checkpointing, spec.data.max_length) == (True, 256, "bf16", True, 64)
    assert spec.data.shuffle_shards == 3
    # the held-out capture truncates whatever data.long_text says: its own expectations
    assert (spec.eval.every, spec.eval.heldout_uri, spec.eval.samples) == \
        (10, held.cfg.output_dir, 5)
    assert spec.eval.heldout_expect == held.expect() and held.expect()["long_text"] == "truncate"
    assert (spec.run.label, spec.run.log_every, spec.run.board, spec.run.reader_cpus,
            spec.run.torch_threads, spec.run.local) == ("kd", 5, "board", 0.5, 0, False)
    # a baseline: the same run but its own KD weight and label; no held-out: no evaluation
    hard = train_spec(cfg, plan=main, held=None, alpha=0.0, board=None, streaming=False,
                      label="hard")
    assert hard.loss.alpha == 0.0 and hard.run.label == "hard" and not hard.data.streaming
    assert (hard.eval.heldout_uri, hard.eval.heldout_expect) == (None, None)
    assert (hard.student, hard.optim) == (spec.student, spec.optim)


def test_every_spec_field_has_a_docstring():
    """What a field means is written beside it (the STYLE's "a docstring per field")."""
    import ast
    import inspect

    from orchestrator.kd import losses
    from orchestrator.shards import specs as shard_specs
    from orchestrator.train import specs as train_specs

    for module, names in ((train_specs, ("StudentSpec", "DataSpec", "OptimSpec", "EvalSpec",
                                         "RunSpec")),
                          (losses, ("LossSpec",)),
                          (shard_specs, ("EngineSpec", "CaptureSpec"))):
        tree = ast.parse(inspect.getsource(module))
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.name in names:
                body = node.body
                documented = {a.target.id for a, nxt in zip(body, body[1:])
                              if isinstance(a, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                              and isinstance(nxt.value, ast.Constant)}
                declared = {a.target.id for a in body if isinstance(a, ast.AnnAssign)}
                assert declared - documented == set(), f"{module.__name__}.{node.name}"


def test_the_engine_is_apart_from_each_captures_settings(plans):
    """The main capture (split long texts) and the held-out one (truncated) differ in their
    capture settings only: one engine serves both, and neither inherits the other's policy.
    The two specs share only what both must agree on: the mode (the engine refuses a capture of
    the other) and the seed (the engine's own vs each prompt's)."""
    from orchestrator.shards.specs import CaptureSpec, EngineSpec

    _, main, held = plans
    assert main.engine_spec() == held.engine_spec()
    assert main.engine_spec().tail_temperatures == (2.0,)
    a, b = main.capture_spec(), held.capture_spec()
    assert (a.long_text, b.long_text) == ("split", "truncate")
    assert a.output_dir != b.output_dir and a.shard_meta != b.shard_meta
    shared = {f.name for f in fields(EngineSpec)} & {f.name for f in fields(CaptureSpec)}
    assert shared == {"mode", "seed"}


def test_packing_refuses_a_token_budget_below_the_capture_s_longest_sample(tiny_teacher, texts,
                                                                           tmp_path):
    """data.max_length set: refused by the config check; unset, the capture's length is the
    teacher's context (256 tokens), known once the teacher is inspected, before any output."""
    from orchestrator.errors import ConfigError
    from orchestrator.shards.plan import plan_captures
    from tests.conftest import write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts[:8]])
    base = [f"teacher.model={tiny_teacher}", f"data.path={data}", f"output_dir={tmp_path / 'out'}",
            "train.packing=true", "data.eval_fraction=0", "train.baselines=[]"]
    with pytest.raises(ConfigError, match=r"train.packing=true needs train.max_tokens_per_batch.*"
                                          r"e.g. train.max_tokens_per_batch=1024"):
        load_config(None, base + ["data.max_length=64", "train.batch_size=16"])
    with pytest.raises(ConfigError, match=r"train.max_tokens_per_batch \(32\) is smaller than the "
                                          r"capture's longest sample \(64 tokens"):
        load_config(None, base + ["data.max_length=64", "train.max_tokens_per_batch=32"])
    cfg = load_config(None, base + ["train.max_tokens_per_batch=200"])
    with pytest.raises(ConfigError, match=r"\(200\) is smaller than the capture's longest sample "
                                          r"\(256 tokens.*at least 256"):
        plan_captures(cfg)
    assert not (tmp_path / "out").exists()  # before any output
