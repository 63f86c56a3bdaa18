"""Training batches from decoded shard samples (pure numpy/torch, no Ray).

A sample from `shards.read_shards` holds input_ids [T], topk_ids [T, k], topk_logprobs [T, k],
tail_mass [T, m] (the teacher's tail at each of the capture's tail_temperatures [m]) and
label_start/prompt_len. `collate` pads a list of them into tensors the KD loss takes directly:
position t of a row predicts token t + 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from orchestrator.errors import ShardError


@dataclass
class Batch:
    input_ids: torch.Tensor      # [B, L] int64, padded with pad_id
    attention_mask: torch.Tensor  # [B, L] int64
    targets: torch.Tensor        # [B, L] int64: next token, -100 where none or masked
    topk_ids: torch.Tensor       # [B, L, k] int64, 0 where no label
    topk_logprobs: torch.Tensor  # [B, L, k] float32
    kd_mask: torch.Tensor        # [B, L] bool: positions with teacher labels
    tail_mass: torch.Tensor      # [B, L, m] float32: the teacher's tail at each temperature, 0 where no label
    tail_temperatures: torch.Tensor  # [m] float32: the capture's tail temperatures (1.0 first)

    def flat(self) -> dict[str, torch.Tensor]:
        """The [B·L, ...] views `losses.distill_loss` takes."""
        k = self.topk_ids.shape[-1]
        return {"targets": self.targets.reshape(-1), "topk_ids": self.topk_ids.reshape(-1, k),
                "topk_logprobs": self.topk_logprobs.reshape(-1, k),
                "kd_mask": self.kd_mask.reshape(-1),
                "tail_mass": self.tail_mass.reshape(-1, self.tail_mass.shape[-1]),
                "tail_temperatures": self.tail_temperatures}


def collate(samples: list[dict], *, pad_id: int = 0, hard_labels_from_prompt: bool = False) -> Batch:
    """Pad samples to the longest. Hard labels: every next token in score mode; in sample mode only
    the sampled continuation (prompt positions are masked unless hard_labels_from_prompt). A
    sample's `loss_mask` [T] (the learned tokens, if it has one) keeps only the positions whose
    next token it marks, for the hard labels and the KD positions alike."""
    B = len(samples)
    L = max(len(s["input_ids"]) for s in samples)
    k = samples[0]["topk_ids"].shape[1]
    ids = np.full((B, L), pad_id, dtype=np.int64)
    mask = np.zeros((B, L), dtype=np.int64)
    targets = np.full((B, L), -100, dtype=np.int64)
    top_ids = np.zeros((B, L, k), dtype=np.int64)
    top_lps = np.zeros((B, L, k), dtype=np.float32)
    kd = np.zeros((B, L), dtype=bool)
    temps = np.asarray(samples[0]["tail_temperatures"], dtype=np.float32)
    tails = np.zeros((B, L, len(temps)), dtype=np.float32)
    for b, s in enumerate(samples):
        T = len(s["input_ids"])
        ids[b, :T] = s["input_ids"]
        mask[b, :T] = 1
        first = 0 if hard_labels_from_prompt else max(0, s["prompt_len"] - 1)
        targets[b, first:T - 1] = s["input_ids"][first + 1:T]
        labelled = s["topk_ids"][:, 0] >= 0
        top_ids[b, :T][labelled] = s["topk_ids"][labelled]
        top_lps[b, :T][labelled] = s["topk_logprobs"][labelled]
        kd[b, :T] = labelled
        learned = s.get("loss_mask")
        if learned is not None and not learned.all():  # position t learns token t + 1
            nxt = np.append(np.asarray(learned[1:], dtype=bool), False)
            targets[b, :T][~nxt] = -100
            kd[b, :T] &= nxt
        if not np.array_equal(np.asarray(s["tail_temperatures"], dtype=np.float32), temps):
            raise ShardError("one batch mixes samples of captures with different "
                             "teacher.tail_temperatures; train on one capture at a time")
        tails[b, :T][labelled] = s["tail_mass"][labelled]
    return Batch(*(torch.from_numpy(x) for x in (ids, mask, targets, top_ids, top_lps, kd, tails,
                                                  temps)))
