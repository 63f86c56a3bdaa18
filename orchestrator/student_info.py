"""What the driver checks of a pretrained student (`student.model`) before any work: that it
exists and loads (nothing is downloaded), that its tokenizer is the teacher's on every id and
special token (cross-tokenizer distillation is not supported), that its embedding table has a
row for every token, and its real parameter count. Cheap: weights are never loaded (the count
comes from a model built on PyTorch's meta device)."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.errors import ConfigError
from orchestrator.shapes import StudentShape
from orchestrator.teacher_info import load_tokenizer, model_config, tokenizer_fingerprint


@dataclass(frozen=True)
class PretrainedInfo:
    shape: StudentShape
    """The model's own layers, hidden size, heads and MLP width."""
    rows: int
    """Rows of its embedding table (config vocab_size); may be fewer than the teacher's."""
    parameters: int
    """Its real parameter count (tied weights counted once)."""
    model_type: str


def inspect_student(model: str, *, revision: str | None, teacher: str,
                    teacher_revision: str | None = None,
                    key: str = "student.model") -> PretrainedInfo:
    """Raise a ConfigError naming `key`, the model and the fix when the pretrained student cannot
    be distilled into from `teacher`; else what the driver shows and checks of it."""
    from orchestrator.shapes import pretrained_shape

    config = model_config(model, revision=revision, key=key)
    tokenizer = load_tokenizer(model, revision=revision, what=key)
    check_same_tokenizer(load_tokenizer(teacher, revision=teacher_revision), tokenizer,
                         name=model, key=key)
    rows = int(getattr(config, "vocab_size", 0) or 0)
    if rows < len(tokenizer):
        raise ConfigError(f"{key} {model} has {rows} embedding rows but its tokenizer (the "
                          f"teacher's) has {len(tokenizer)} tokens: the student could not read or "
                          "predict the last ones; use a model whose table covers the tokenizer")
    return PretrainedInfo(shape=pretrained_shape(config), rows=rows,
                          parameters=real_parameters(config), model_type=config.model_type)


def check_same_tokenizer(teacher, student, *, name: str, key: str = "student.model") -> None:
    """The student's tokenizer must map every id to the teacher's token string and mark the same
    tokens special; a ConfigError names the first id that differs and both tokens. (Which token
    is eos or pad may differ: an instruct teacher ends turns with another token than its base
    model.)"""
    if tokenizer_fingerprint(teacher) == tokenizer_fingerprint(student):
        return
    t_tokens = {i: tok for tok, i in teacher.get_vocab().items()}
    s_tokens = {i: tok for tok, i in student.get_vocab().items()}
    for i in range(max(len(t_tokens), len(s_tokens), max(t_tokens, default=0) + 1,
                       max(s_tokens, default=0) + 1)):
        if t_tokens.get(i) != s_tokens.get(i):
            raise ConfigError(
                f"{key} {name}: its tokenizer differs from the teacher's at id {i} "
                f"(teacher {_shown(t_tokens.get(i))}, student {_shown(s_tokens.get(i))}); "
                "cross-tokenizer distillation is not supported: pick a student of the "
                "teacher's family that shares its tokenizer")
    t_special, s_special = set(teacher.all_special_ids), set(student.all_special_ids)
    for i in sorted(t_special ^ s_special):
        which = "teacher" if i in t_special else "student"
        raise ConfigError(
            f"{key} {name}: token id {i} ({_shown(t_tokens.get(i))}) is special only in "
            f"the {which}'s tokenizer; cross-tokenizer distillation is not supported: the two "
            "tokenizers must agree on every id and special token")


def real_parameters(config) -> int:
    """Parameters of a model of `config` (tied weights once), built on the meta device: no
    memory, no weights read."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def _shown(token) -> str:
    return "no token" if token is None else repr(token)
