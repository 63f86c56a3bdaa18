import pytest
import torch

from orchestrator.errors import ConfigError
from orchestrator.student import PRESETS, build_student, resolve_shape


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
