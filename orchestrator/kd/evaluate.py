"""Held-out evaluation of a student against the teacher's labels (pure torch, no Ray).

On every held-out position that has a teacher label and a next token:
- student NLL of the actual next token (→ student perplexity),
- teacher NLL of the same token, from the capture's stored target log-prob (→ teacher perplexity),
- KL(teacher ‖ student) over the teacher's top-k plus one tail bucket (T = 1, the tail mass the
  capture stored): the divergence the stored labels can measure, a lower bound on the
  full-vocabulary KL,
- top-1 agreement: the student's argmax is the teacher's most likely token.

Teacher ids past the student's embedding rows are folded into the tail first
(`batches.fold_vocab`), as in training: top-1 then means the most likely token the student has.

`evaluate` returns sums, so data-parallel workers can add theirs before `finish` divides. It can
also record each held-out sequence's own sums (`per_sequence`): students evaluated on the same
sequences are then compared pairwise, sequence by sequence, which gives the difference of their
NLLs a standard error (`orchestrator.driver.verdict.paired_difference`).
"""

from __future__ import annotations

import math

import torch

from orchestrator.kd.batches import collate, fold_vocab
from orchestrator.kd.head import LMHead, current_head, final_hidden
from orchestrator.kd.losses import divergence, tail_at

SUM_KEYS = ("positions", "student_nll", "teacher_nll", "teacher_positions", "kl", "top1")
SEQUENCES_KEY = "heldout_sequences"
"""Where a student's history keeps its last evaluation's per-sequence sums: {sample_id:
[positions, student NLL sum]}. Not an `eval_*` metric: only scalars go to Ray Train and Tune."""


@torch.no_grad()
def evaluate(model, samples: list[dict], *, batch_size: int = 16, device: str = "cpu",
             pad_id: int = 0, per_sequence: dict | None = None, head: LMHead | None = None,
             chunk_rows: int = 1024) -> dict[str, float]:
    """Sums over `samples` (decoded shard rows); see SUM_KEYS. `per_sequence`, if given, is
    filled with each sample's own sums: {sample_id: [positions, student NLL sum]}. `head`: the
    model's LM head (`kd.head.lm_head`, as training uses it): the logits are then computed from the
    final hidden states `chunk_rows` scored positions at a time, never for the whole batch; None:
    the model's own full logits."""
    was_training = model.training
    model.eval()
    sums = dict.fromkeys(SUM_KEYS, 0.0)
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        batch = collate(chunk, pad_id=pad_id)
        inputs = {"input_ids": batch.input_ids.to(device),
                  "attention_mask": batch.attention_mask.to(device)}
        batch, _ = fold_vocab(batch, _vocab_rows(model))  # ids past the student's rows: tail
        flat = batch.flat()
        rows = (flat["kd_mask"] & (flat["targets"] >= 0)).nonzero().squeeze(1).to(device)
        if len(rows) == 0:
            continue
        if head is None:
            out = model(**inputs).logits
        else:
            out = final_hidden(model, **inputs)
            head = current_head(model, head)  # after the forward: a sharded model's whole head
        out = out.reshape(-1, out.shape[-1])
        targets = flat["targets"].to(device)[rows]
        ids = flat["topk_ids"].to(device)[rows].long()
        lps = flat["topk_logprobs"].to(device)[rows]
        tail = tail_at(flat["tail_mass"], flat["tail_temperatures"], 1.0).to(device)[rows]
        teacher_t = _teacher_target_lp(samples[i:i + batch_size], batch.input_ids.shape[1])
        teacher_t = teacher_t.to(device)[rows]
        known = ~torch.isnan(teacher_t)
        nll = torch.empty(len(rows), dtype=torch.float32, device=out.device)
        for a in range(0, len(rows), chunk_rows if head is not None else len(rows)):
            part = slice(a, a + (chunk_rows if head is not None else len(rows)))
            lg = out[rows[part]]
            lg = (lg if head is None else head.logits(lg)).float()
            nll[part] = torch.nn.functional.cross_entropy(lg, targets[part], reduction="none")
            sums["kl"] += divergence(lg, ids[part], lps[part], kind="fkl", temperature=1.0,
                                     tail="bucket", teacher_tail=tail[part]).sum().item()
            sums["top1"] += (lg.argmax(-1) == ids[part, 0]).sum().item()
        sums["positions"] += len(rows)
        sums["student_nll"] += nll.sum().item()
        if per_sequence is not None:
            _add_per_sequence(per_sequence, chunk, rows // batch.input_ids.shape[1], nll, start=i)
        sums["teacher_nll"] += (-teacher_t[known]).sum().item()
        sums["teacher_positions"] += known.sum().item()
    model.train(was_training)
    return sums


def _vocab_rows(model) -> int:
    """The rows of the model's output layer: the token ids it can predict (a sharded layer's
    whole shape)."""
    inner = getattr(model, "module", model)
    return int(inner.get_output_embeddings().weight.shape[0])


def _add_per_sequence(out: dict, chunk: list[dict], which: torch.Tensor, nll: torch.Tensor, *,
                      start: int) -> None:
    """Add each sample's positions and NLL sum to `out`; `which` [positions]: the row of `chunk`
    each position belongs to, `nll` [positions]: its NLL."""
    counts = torch.bincount(which, minlength=len(chunk)).tolist()
    sums = torch.zeros(len(chunk), dtype=torch.float64, device=nll.device)
    sums = sums.index_add_(0, which, nll.double()).tolist()
    for b, s in enumerate(chunk):
        if counts[b]:
            entry = out.setdefault(str(s.get("sample_id", start + b)), [0, 0.0])
            entry[0] += counts[b]
            entry[1] += sums[b]


def _teacher_target_lp(samples: list[dict], length: int) -> torch.Tensor:
    """[B·L] the teacher's log-prob of position t's next token (NaN where unknown or padded).

    A shard stores, at label position t, the teacher's log-prob of token t + 1 (target_logprobs)."""
    out = torch.full((len(samples), length), math.nan)
    for b, s in enumerate(samples):
        if "target_logprobs" in s:
            t = torch.as_tensor(s["target_logprobs"])
            out[b, :len(t)] = t
    return out.reshape(-1)


def finish(sums: dict[str, float]) -> dict[str, float]:
    """Means from (possibly all-reduced) sums: perplexities, KL per token, top-1 agreement."""
    n = max(sums["positions"], 1.0)
    student = sums["student_nll"] / n
    teacher = sums["teacher_nll"] / max(sums["teacher_positions"], 1.0)
    return {"eval_student_nll": student, "eval_student_ppl": math.exp(min(student, 50.0)),
            "eval_teacher_nll": teacher, "eval_teacher_ppl": math.exp(min(teacher, 50.0)),
            "eval_kl": sums["kl"] / n, "eval_top1": sums["top1"] / n,
            "eval_positions": int(sums["positions"])}


def gap_recovered(*, student_nll: float, scratch_nll: float, teacher_nll: float) -> float | None:
    """Share of the NLL gap between a from-scratch (hard-label) student and the teacher that the
    student closes: 1.0 = as good as the teacher, 0.0 = no better than the from-scratch student."""
    gap = scratch_nll - teacher_nll
    if gap <= 1e-9:
        return None
    return (scratch_nll - student_nll) / gap
