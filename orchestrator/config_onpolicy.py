"""The run config's `on_policy` section (`orchestrator.config_sections` holds the others, and
`orchestrator.config` re-exports every class): how the student's own samples are made when
train.on_policy > 0."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class OnPolicyConfig:
    """How the student's own samples are made when train.on_policy > 0: student rollout actors
    (a vLLM engine of the student, refreshed with the trainers' weights) sample continuations,
    teacher actors score them, and the trainers minimise `loss` on the generated tokens."""

    loss: Literal["fkl", "rkl", "jsd", "tvd"] = "rkl"
    """Divergence on the student's samples (T = 1, no hard labels): reverse KL (mode-seeking,
    the on-policy distillation default), forward KL, JSD(beta), total variation."""
    beta: float = 0.5
    """JSD mixing weight (loss jsd), in (0, 1)."""
    max_new_tokens: int = 64
    """Tokens the student writes per prompt (a continuation also ends at EOS / end of turn)."""
    temperature: float = 1.0
    """The rollouts' sampling temperature (0: greedy)."""
    prompt_tokens: int = 32
    """Prefix prompts: the first tokens of a text the student continues."""
    start_step: int = 0
    """Optimizer steps the student trains on the offline shards alone before its own samples
    join (a random student's samples are noise to the teacher; a warmed-up one's are not)."""
    sync_every: int = 1
    """Optimizer steps between weight refreshes of the rollout actors."""
    max_staleness: int = 1
    """Most optimizer steps the rollout weights may lag the step that trains on their samples.
    With sync_every ≤ max_staleness the samples of step n + 1 are generated (and scored) while
    step n trains; at max_staleness 0 every step waits for fresh samples."""
    backend: Literal["vllm", "hf"] = "vllm"
    """Rollout engine: vLLM (the student's weights loaded in place), or transformers' generate."""
    rollout_actors: int = 1
    """Student rollout actors."""
    rollout_cpus: float = 0.5
    """Logical CPUs each rollout actor reserves."""
    rollout_gpus: float = 0.0
    """GPUs each rollout actor reserves (a fraction shares one)."""
    kv_cache_gib: float = 0.5
    """KV cache of each vLLM rollout engine (GiB; of RAM on a CPU)."""
    teacher_actors: int = 1
    """Teacher actors that score the rollouts (teacher.backend, num_gpus), started for the
    on-policy student and stopped after it."""
    teacher_cpus: float = 0.5
    """Logical CPUs each of those teacher actors reserves."""
