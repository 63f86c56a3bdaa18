"""The loss of one training micro-batch for a student model: the LM head fused with the KD + CE loss
in row chunks when the model's head allows it (`chunked.chunked_distill_loss`), the dense
`model(...).logits` + `losses.distill_loss` path otherwise (pure torch, no Ray).

    loss = StudentLoss(model, spec, probe_ids=first_batch.input_ids[:1, :16])
    parts = loss(model, batch, device=device)     # LossParts; parts.total.backward()

The choice is made once per run and said once (`StudentLoss.describe`): the fused head needs a
`torch.nn.Linear` output layer, a forward that takes `logits_to_keep`, a head whose transform
(bias, soft cap, scale) `head.py` knows, and logits it reproduces on the probe. Both paths give the
same loss and gradients (tests/orchestrator/test_student_loss.py); the fused one never holds a
[tokens × vocab] tensor beyond one chunk, at any temperature (BENCHMARKS.md).
"""

from __future__ import annotations

import copy

import torch

from orchestrator.kd.batches import Batch
from orchestrator.kd.chunked import chunked_distill_loss
from orchestrator.kd.head import HeadNotFused, LMHead, current_head, final_hidden, lm_head
from orchestrator.kd.losses import LossParts, LossSpec, distill_loss


class StudentLoss:
    """The loss of `spec` for one model, fused with its head when possible."""

    def __init__(self, model, spec: LossSpec, *, fused: bool = True,
                 probe_ids: torch.Tensor | None = None, chunk_rows: int | None = None):
        self.spec, self.chunk_rows = spec, chunk_rows
        self.head: LMHead | None = None
        self.reason = "train.fused_head is false" if not fused else ""
        if fused:
            try:
                self.head = lm_head(model, probe_ids=probe_ids)
            except HeadNotFused as e:
                self.reason = str(e)

    def with_spec(self, spec: LossSpec) -> StudentLoss:
        """The same path (the head checked once) for another loss: an on-policy part's."""
        other = copy.copy(self)
        other.spec = spec
        return other

    def describe(self) -> str:
        """One line for the run's log: which path the loss takes, and why the dense one."""
        if self.head is not None:
            return "loss: LM head fused with the KD + CE loss in row chunks"
        return f"loss: dense logits ({self.reason})"

    def __call__(self, model, batch: Batch, *, device) -> LossParts:
        flat = {k: v.to(device) for k, v in batch.flat().items()}
        inputs = batch.model_inputs(device)  # padded: ids + mask; packed: ids + position ids
        if self.head is None:
            logits = model(**inputs, use_cache=False).logits
            return distill_loss(logits.reshape(-1, logits.shape[-1]), **self.spec.kwargs(), **flat)
        hidden = final_hidden(model, **inputs)
        return chunked_distill_loss(hidden.reshape(-1, hidden.shape[-1]),
                                    **current_head(model, self.head).kwargs(),
                                    **self.spec.kwargs(), **flat, chunk_rows=self.chunk_rows)

