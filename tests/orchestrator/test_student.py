import pytest
import torch

from orchestrator.errors import ConfigError
from orchestrator.shapes import PRESETS, resolve_shape
from orchestrator.kd.student import build_student


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_teacher, local_files_only=True)


def test_presets_and_overrides():
    assert resolve_shape(preset="micro").layers == PRESETS["micro"]["layers"]
    s = resolve_shape(preset="micro", layers=3)
    assert (s.layers, s.hidden) == (3, 128)
    assert resolve_shape(layers=1, hidden=128, heads=2).intermediate == 512


@pytest.mark.parametrize("kwargs, message", [
    (dict(layers=1, hidden=130, heads=4), "must divide student.hidden"),
    (dict(preset="huge"), "student.preset must be one of nano, micro"),
    (dict(hidden=128, heads=2), "student.layers"),
    (dict(layers=0, hidden=128, heads=2), "student.layers must be at least 1"),
])
def test_impossible_sizes(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        resolve_shape(**kwargs)


def test_student_from_teacher_config_and_init(teacher, tmp_path):
    shape = resolve_shape(layers=1, hidden=128, heads=2, intermediate=256)
    student, info = build_student(teacher.config, shape, init_from_teacher=teacher)
    assert student.config.vocab_size == teacher.config.vocab_size
    assert info.parameters == sum(p.numel() for p in student.parameters())
    assert info.initialised_layers == [0]
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(student.model.layers[0].self_attn.q_proj.weight,
                       teacher.model.layers[0].self_attn.q_proj.weight)
    # it is a real HF model: save and load back
    student.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    x = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(back(x).logits, student(x).logits)
    _, info2 = build_student(teacher.config, resolve_shape(preset="nano"))
    assert info2.initialised_layers == [] and "parameters" in info2.describe()


def test_larger_student_warns(teacher):
    with pytest.warns(UserWarning, match="not smaller than the teacher"):
        build_student(teacher.config, resolve_shape(layers=3, hidden=256, heads=4))


@pytest.fixture(scope="module", params=["qwen2", "qwen3", "mistral", "gemma2", "gemma3_text",
                                        "phi3", "olmo2"])
def family_teacher(request):
    """A random 3-layer teacher of each family (no tokenizer needed: config + weights only)."""
    from orchestrator.driver import tiny

    return tiny.build_model(tiny.family_config(request.param, 256, layers=3), seed=1)


@pytest.mark.parametrize("init", [False, True], ids=["scratch", "init"])
@pytest.mark.parametrize("layers, hidden, heads", [(1, 128, 2), (2, 192, 3)])
def test_every_family_student_round_trips(family_teacher, init, layers, hidden, heads, tmp_path):
    """Per-layer config fields follow the student's depth (layer_types, max_window_layers …), kv
    heads keep the teacher's grouping where they can, and the student saves and loads back —
    config and model — giving the same logits (Qwen2's config refused to save before)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from orchestrator.kd.student import layer_mapping

    t_cfg = family_teacher.config
    shape = resolve_shape(layers=layers, hidden=hidden, heads=heads)
    student, info = build_student(t_cfg, shape,
                                  init_from_teacher=family_teacher if init else None)
    cfg = student.config
    mapping = layer_mapping(3, layers)
    if hasattr(t_cfg, "layer_types"):
        assert cfg.layer_types == [t_cfg.layer_types[j] for j in mapping]
    if hasattr(t_cfg, "max_window_layers"):
        assert cfg.max_window_layers <= layers
    group = t_cfg.num_attention_heads // t_cfg.num_key_value_heads
    assert cfg.num_key_value_heads == (heads // group if heads % group == 0 else heads)
    assert cfg.hidden_size // cfg.num_attention_heads == 64 and getattr(cfg, "head_dim", 64) == 64
    cfg.save_pretrained(tmp_path / "cfg")
    loaded = AutoConfig.from_pretrained(tmp_path / "cfg").to_dict()
    assert {**loaded, "_name_or_path": ""} == {**cfg.to_dict(), "_name_or_path": ""}
    student.save_pretrained(tmp_path / "model")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    x = torch.randint(4, 256, (2, 70))  # longer than the sliding window (32)
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, student(x).logits)
    if init and hidden == t_cfg.hidden_size:
        assert info.initialised_layers == mapping
        s_sd, t_sd = student.state_dict(), family_teacher.state_dict()
        for name, tensor in s_sd.items():  # fused qkv / gate_up (Phi-3) included
            src = name.replace(".layers.0.", f".layers.{mapping[0]}.")
            assert torch.equal(tensor, t_sd[src]), name
    elif not init:
        assert info.initialised_layers == []


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "phi3"])
def test_size_ratio_on_family_configs(family):
    from orchestrator.driver import tiny
    from orchestrator.shapes import size_ratio

    cfg = tiny.family_config(family, 256, layers=4)
    assert 0 < size_ratio(cfg, resolve_shape(layers=1, hidden=128, heads=2)) < 0.5
    assert cfg.num_hidden_layers == 4  # the teacher's config is not touched


def test_size_checks_agree_on_a_gqa_teacher_shaped_student(recwarn):
    """A student of the teacher's own shape is not smaller: the builder warns as the driver's
    preflight does (both use shapes.size_ratio) — the builder's count of real parameters alone
    said "smaller" for a grouped-query teacher, whose estimate counts full attention."""
    from orchestrator.driver import tiny
    from orchestrator.shapes import size_ratio

    cfg = tiny.family_config("qwen2", 256, layers=2)
    same = resolve_shape(layers=cfg.num_hidden_layers, hidden=cfg.hidden_size,
                         heads=cfg.num_attention_heads, intermediate=cfg.intermediate_size)
    assert size_ratio(cfg, same) == 1.0
    build_student(cfg, same)
    assert any("not smaller than the teacher" in str(w.message) for w in recwarn)
    smaller = resolve_shape(layers=1, hidden=cfg.hidden_size // 2, heads=1)
    recwarn.clear()
    build_student(cfg, smaller)
    assert size_ratio(cfg, smaller) < 1.0
    assert not any("not smaller" in str(w.message) for w in recwarn)
