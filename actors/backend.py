"""The interface every teacher backend implements, so the actor never knows which engine it holds."""

from __future__ import annotations

from typing import Protocol

from orchestrator.kd.softlabels import SoftLabels


class TeacherBackend(Protocol):
    """A loaded teacher that turns token ids into top-k soft labels."""

    vocab_size: int
    """Rows of the LM head (the id space of the top-k)."""
    max_length: int
    """Longest sequence (prompt + continuation) the engine accepts."""
    max_k: int
    """Largest k the engine can return."""

    def score(self, sequences: list[list[int]], *, k: int) -> list[SoftLabels]:
        """Top-k at every position of each sequence (label_start = 0, n = T)."""
        ...

    def sample(self, prompts: list[list[int]], *, k: int, n: int, temperature: float, top_p: float,
               max_new_tokens: int, seeds: list[int], eos_id: int | list[int] | None
               ) -> list[list[SoftLabels]]:
        """`n` continuations per prompt, seeded per prompt; top-k at every sampled position. A
        continuation ends at `eos_id` (one token, or several: EOS and a chat's end-of-turn)."""
        ...

    def close(self) -> None:
        """Release the engine (processes, memory)."""
        ...


def stop_list(eos_id: int | list[int] | None) -> list[int]:
    """The stop tokens of `TeacherBackend.sample` as a list, whether given as one id, several or
    None."""
    if eos_id is None:
        return []
    return [int(eos_id)] if isinstance(eos_id, int) else [int(i) for i in eos_id]
