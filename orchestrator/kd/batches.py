"""Training batches from decoded shard samples (pure numpy/torch, no Ray).

A sample from `shards.read_shards` holds input_ids [T], topk_ids [T, k], topk_logprobs [T, k],
tail_mass [T, m] (the teacher's tail at each of the capture's tail_temperatures [m]) and
label_start/prompt_len. `collate` pads a list of them into tensors the KD loss takes directly:
position t of a row predicts token t + 1. `fold_vocab` then folds the teacher's top-k ids the
student has no embedding row for (a smaller table over the same tokenizer) into the tail.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

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
    temps = np.array(samples[0]["tail_temperatures"], dtype=np.float32)  # a copy: writable
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


def fold_vocab(batch: Batch, rows: int) -> tuple[Batch, float]:
    """`batch` with every teacher top-k id >= `rows` (the student's embedding rows) folded into
    the tail, and the probability mass (T = 1) folded, summed over the labelled positions.

    Teacher and student share the tokenizer, but the teacher's table may be padded past it
    (152,064 vs 151,936 rows): the student gives those ids probability 0, so their teacher mass
    joins the tail bucket. At T = 1 the stored log-probs are normalised over the whole vocabulary:
    the folded share is exp(lp). At another tail temperature T the partition comes from the
    stored tail r_T: Z_T = Σ_topk exp(lp / T) / (1 − r_T), the share exp(lp / T) / Z_T. A folded
    slot keeps a valid id (0) and log-prob −inf, moved behind the others (the order stays
    descending); the losses give the student −inf there too (`losses.topk_divergence`). A
    position whose whole top-k is folded has no label left (kd_mask False). No copy when nothing
    needs folding."""
    folded = (batch.topk_ids >= rows) & batch.kd_mask.unsqueeze(-1)  # [B, L, k]
    if not bool(folded.any()):
        return batch, 0.0
    lps = batch.topk_logprobs.double()
    temps = batch.tail_temperatures.double()                        # [m]
    tails = batch.tail_mass.double()                                # [B, L, m]
    tempered = torch.exp(lps.unsqueeze(-1) / temps)                 # [B, L, k, m]
    z = tempered.sum(-2) / (1.0 - tails).clamp(min=1e-12)           # [B, L, m]
    share = (tempered * folded.unsqueeze(-1)).sum(-2) / z
    at_one = (lps.exp() * folded).sum(-1)                           # [B, L]
    share = torch.where((temps - 1.0).abs() <= 1e-6, at_one.unsqueeze(-1), share)
    order = torch.sort(folded.to(torch.int8), dim=-1, stable=True).indices  # kept ids first
    ids = torch.where(folded, torch.zeros_like(batch.topk_ids), batch.topk_ids).gather(-1, order)
    top = torch.where(folded, torch.full_like(batch.topk_logprobs, -math.inf),
                      batch.topk_logprobs).gather(-1, order)
    return replace(batch, topk_ids=ids, topk_logprobs=top,
                   tail_mass=(tails + share).clamp(max=1.0).float(),
                   kd_mask=batch.kd_mask & ~folded.all(-1)), float(at_one.sum())
