"""Model sizes, without torch: the student presets and shapes (validated with the config, before any
compute) and the one parameter estimator every "is the student smaller than its teacher" check
uses."""

from __future__ import annotations

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


def pretrained_shape(config) -> StudentShape:
    """A pretrained student's own shape, read from its transformers config (what messages, trial
    names and the report show of it)."""
    hidden = int(config.hidden_size)
    return StudentShape(layers=int(config.num_hidden_layers), hidden=hidden,
                        heads=int(config.num_attention_heads),
                        intermediate=int(getattr(config, "intermediate_size", None) or 4 * hidden))


def size_ratio(teacher_config, shape: StudentShape) -> float:
    """Estimated student parameters / teacher parameters, both by `param_estimate`: the one size
    estimator of every "student not smaller than the teacher" check (the driver's preflight, the
    student builder), so two checks never disagree."""
    student = param_estimate(teacher_config, layers=shape.layers, hidden=shape.hidden,
                              intermediate=shape.intermediate)
    return student / max(1, param_estimate(teacher_config))


def param_estimate(config, *, layers: int | None = None, hidden: int | None = None,
                    intermediate: int | None = None) -> int:
    """Rough parameter count (attention 4·h², MLP 3·h·inter, embeddings) of `config`, or of its
    family at another depth/width; reads the config only (no copy, no validation)."""
    h = hidden or config.hidden_size
    layers = layers or config.num_hidden_layers
    inter = intermediate or getattr(config, "intermediate_size", None) or 4 * h
    tied = getattr(config, "tie_word_embeddings", False)
    return layers * (4 * h * h + 3 * h * inter) + config.vocab_size * h * (1 if tied else 2)
