"""Student builder: a real Hugging Face causal LM that shares the teacher's tokenizer (pure
torch/transformers, no Ray). Sized by a named preset or explicit layers/hidden/heads/intermediate;
optionally initialised from the teacher (embeddings, every n-th layer, final norm, LM head) when
the shapes allow.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

from orchestrator.errors import ConfigError

PRESETS: dict[str, dict[str, int]] = {
    # head_dim 64 throughout: vLLM's CPU attention kernels reject smaller heads
    "nano": {"layers": 1, "hidden": 128, "heads": 2, "intermediate": 512},
    "micro": {"layers": 2, "hidden": 128, "heads": 2, "intermediate": 512},
    "mini": {"layers": 2, "hidden": 256, "heads": 4, "intermediate": 1024},
    "small": {"layers": 4, "hidden": 512, "heads": 8, "intermediate": 2048},
    "base": {"layers": 8, "hidden": 1024, "heads": 16, "intermediate": 4096},
}


@dataclass(frozen=True)
class StudentShape:
    layers: int
    hidden: int
    heads: int
    intermediate: int


@dataclass(frozen=True)
class StudentInfo:
    parameters: int
    bytes_bf16: int
    initialised_layers: list[int]
    """Teacher layer index copied into each student layer (empty: random init)."""

    def describe(self) -> str:
        init = (f", layers {self.initialised_layers} of the teacher copied"
                if self.initialised_layers else "")
        return f"{self.parameters / 1e6:.2f}M parameters, {self.bytes_bf16 / 2**20:.1f} MiB in bf16{init}"


def resolve_shape(*, preset: str | None = None, layers: int | None = None,
                  hidden: int | None = None, heads: int | None = None,
                  intermediate: int | None = None) -> StudentShape:
    """A preset, with any explicit field overriding it; raises ConfigError on impossible sizes."""
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"student.preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    base = dict(PRESETS[preset]) if preset else {}
    for name, value in (("layers", layers), ("hidden", hidden), ("heads", heads),
                        ("intermediate", intermediate)):
        if value is not None:
            base[name] = value
    missing = [n for n in ("layers", "hidden", "heads") if n not in base]
    if missing:
        raise ConfigError(f"student needs a preset ({', '.join(PRESETS)}) or student.{missing[0]}")
    base.setdefault("intermediate", 4 * base["hidden"])
    for name, value in base.items():
        if value < 1:
            raise ConfigError(f"student.{name} must be at least 1, got {value}")
    if base["hidden"] % base["heads"]:
        raise ConfigError(f"student.heads ({base['heads']}) must divide student.hidden "
                          f"({base['hidden']}); e.g. heads={base['hidden'] // 64 or 1} for head_dim 64")
    return StudentShape(**base)


def build_student(teacher_config, shape: StudentShape, *, init_from_teacher=None, seed: int = 0):
    """Build the student model (fp32) from the teacher's config with the student's shape.

    teacher_config: the teacher's transformers config (vocab, rope, norms are shared);
    init_from_teacher: the loaded teacher model to copy weights from, or None.
    Returns (model, StudentInfo). Warns when the student is not smaller than the teacher.
    """
    import torch
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(teacher_config)
    cfg.num_hidden_layers = shape.layers
    cfg.hidden_size = shape.hidden
    cfg.num_attention_heads = shape.heads
    cfg.num_key_value_heads = shape.heads
    cfg.intermediate_size = shape.intermediate
    if hasattr(cfg, "head_dim"):
        cfg.head_dim = shape.hidden // shape.heads
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    copied: list[int] = []
    if init_from_teacher is not None:
        copied = _copy_from_teacher(model, init_from_teacher)
    params = sum(p.numel() for p in model.parameters())
    t_params = _param_estimate(teacher_config)
    if params >= t_params:
        warnings.warn(f"the student ({params / 1e6:.1f}M parameters) is not smaller than the "
                      f"teacher (~{t_params / 1e6:.1f}M); distillation normally shrinks the model",
                      stacklevel=2)
    return model, StudentInfo(params, 2 * params, copied)


def _copy_from_teacher(student, teacher) -> list[int]:
    """Copy what fits: embeddings, LM head, final norm (same hidden size), and teacher layer
    round(i · L_t / L_s) into student layer i when the layer shapes match. Returns the copied
    teacher layer indices."""
    import torch

    s_sd, t_sd = student.state_dict(), teacher.state_dict()
    s_layers = student.config.num_hidden_layers
    t_layers = teacher.config.num_hidden_layers
    mapping = {i: min(t_layers - 1, round(i * t_layers / s_layers)) for i in range(s_layers)}
    copied = set()
    with torch.no_grad():
        for name, tensor in s_sd.items():
            source = name
            if ".layers." in name:
                head, rest = name.split(".layers.", 1)
                idx, tail = rest.split(".", 1)
                source = f"{head}.layers.{mapping[int(idx)]}.{tail}"
            if source in t_sd and t_sd[source].shape == tensor.shape:
                tensor.copy_(t_sd[source])
                if ".layers." in name:
                    copied.add(mapping[int(name.split(".layers.", 1)[1].split(".", 1)[0])])
    return sorted(copied)


def size_ratio(teacher_config, shape: StudentShape) -> float:
    """Estimated student parameters / teacher parameters (checked before training starts)."""
    cfg = copy.deepcopy(teacher_config)
    cfg.num_hidden_layers, cfg.hidden_size = shape.layers, shape.hidden
    cfg.intermediate_size = shape.intermediate
    return _param_estimate(cfg) / max(1, _param_estimate(teacher_config))


def _param_estimate(config) -> int:
    h, layers = config.hidden_size, config.num_hidden_layers
    inter = getattr(config, "intermediate_size", 4 * h)
    vocab = config.vocab_size
    tied = getattr(config, "tie_word_embeddings", False)
    return layers * (4 * h * h + 3 * h * inter) + vocab * h * (1 if tied else 2)
