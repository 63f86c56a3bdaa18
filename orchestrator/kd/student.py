"""Student builder: a real Hugging Face causal LM that shares the teacher's tokenizer (pure
torch/transformers, no Ray). Sized by a named preset or explicit layers/hidden/heads/intermediate;
optionally initialised from the teacher (embeddings, every n-th layer, final norm, LM head) when
the shapes allow. Or a pretrained student, loaded as it is (`load_pretrained`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from orchestrator.errors import ConfigError
from orchestrator.shapes import StudentShape, size_ratio

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


def build_student(teacher_config, shape: StudentShape, *, init_from_teacher=None, seed: int = 0):
    """Build the student model (fp32) from the teacher's config with the student's shape.

    teacher_config: the teacher's transformers config (vocab, rope, norms are shared);
    init_from_teacher: the loaded teacher model to copy weights from, or None.
    Returns (model, StudentInfo). Warns when the student is not smaller than the teacher.
    """
    import torch
    from transformers import AutoModelForCausalLM

    cfg = student_config(teacher_config, shape)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    copied: list[int] = []
    if init_from_teacher is not None:
        copied = _copy_from_teacher(model, init_from_teacher)
    params = sum(p.numel() for p in model.parameters())
    ratio = size_ratio(teacher_config, shape)  # the driver's preflight check decides alike
    if ratio >= 1.0:
        warnings.warn(f"the student ({params / 1e6:.1f}M parameters) is not smaller than the "
                      f"teacher (about {ratio:.1f}× its size); distillation normally shrinks the "
                      "model", stacklevel=2)
    return model, StudentInfo(params, 2 * params, copied)


def load_pretrained(model: str, *, revision: str | None = None):
    """A pretrained student (`student.model`): a local directory or a hub id already in the local
    HF cache (never downloaded), loaded with fp32 master weights. Returns (model, StudentInfo).
    The driver's preflight checked its tokenizer and size first."""
    import torch
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(model, revision=revision, local_files_only=True,
                                                  dtype=torch.float32)
    params = sum(p.numel() for p in loaded.parameters())
    return loaded, StudentInfo(params, 2 * params, [])


def layer_mapping(teacher_layers: int, student_layers: int) -> list[int]:
    """The teacher layer behind each student layer: round(i · L_t / L_s) (weights and per-layer
    config fields use the same mapping)."""
    return [min(teacher_layers - 1, round(i * teacher_layers / student_layers))
            for i in range(student_layers)]


# top-level list fields that are not per layer even when their length happens to equal the depth
_NOT_PER_LAYER = {"architectures"}


def student_config(teacher_config, shape: StudentShape):
    """The teacher's config at the student's shape, every per-layer field made consistent.

    Generic, not per family: each top-level field that is a list of length L_t (layer_types,
    per-layer sliding windows or rope/attention settings) is remapped with `layer_mapping`;
    an int field named `*_layers` (Qwen2's max_window_layers) is clamped to L_s; kv heads keep the
    teacher's query grouping when the student's heads allow it (else kv = heads); head_dim is the
    student's hidden // heads. Raises ConfigError when transformers' own validation still refuses
    the result (a family this builder does not know how to shrink).
    """
    t_layers = int(teacher_config.num_hidden_layers)
    mapping = layer_mapping(t_layers, shape.layers)
    values = teacher_config.to_dict()
    for key, value in values.items():
        if key in _NOT_PER_LAYER or key.endswith(("token_id", "token_ids")):
            continue
        if isinstance(value, (list, tuple)) and len(value) == t_layers:
            values[key] = [value[j] for j in mapping]
        elif (key.endswith("_layers") and isinstance(value, int) and not isinstance(value, bool)
              and key != "num_hidden_layers"):
            values[key] = min(value, shape.layers)
    t_heads = int(teacher_config.num_attention_heads)
    t_kv = int(getattr(teacher_config, "num_key_value_heads", None) or t_heads)
    group = t_heads // t_kv if t_heads % t_kv == 0 else 1
    head_dim = shape.hidden // shape.heads
    values.update(num_hidden_layers=shape.layers, hidden_size=shape.hidden,
                  num_attention_heads=shape.heads, intermediate_size=shape.intermediate,
                  num_key_value_heads=shape.heads // group if shape.heads % group == 0
                  else shape.heads)
    if "head_dim" in values:
        t_head_dim = values["head_dim"]
        values["head_dim"] = head_dim
        if values.get("query_pre_attn_scalar") == t_head_dim:  # Gemma scales q by head_dim
            values["query_pre_attn_scalar"] = head_dim
    cfg = type(teacher_config).from_dict(values)
    try:
        cfg.validate()
    except Exception as e:  # noqa: BLE001 — transformers' validation error types vary by version
        raise ConfigError(f"the student config derived from the teacher's "
                          f"({teacher_config.model_type}) is invalid: {e}; this family's per-layer "
                          "fields are not handled by the student builder — report it, with the "
                          "teacher's config.json") from None
    return cfg


def _copy_from_teacher(student, teacher) -> list[int]:
    """Copy what fits: embeddings, LM head, final norm (same hidden size), and teacher layer
    round(i · L_t / L_s) into student layer i when the layer shapes match. Returns the copied
    teacher layer indices."""
    import torch

    s_sd, t_sd = student.state_dict(), teacher.state_dict()
    mapping = layer_mapping(teacher.config.num_hidden_layers, student.config.num_hidden_layers)
    copied = set()
    with torch.no_grad():
        for name, tensor in s_sd.items():
            source, layer = name, None
            if ".layers." in name:
                head, rest = name.split(".layers.", 1)
                idx, tail = rest.split(".", 1)
                layer = mapping[int(idx)]
                source = f"{head}.layers.{layer}.{tail}"
            if source in t_sd and t_sd[source].shape == tensor.shape:
                tensor.copy_(t_sd[source])
                if layer is not None:
                    copied.add(layer)
    return sorted(copied)
