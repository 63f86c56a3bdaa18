"""Knowledge-distillation losses on sparse teacher targets (top-k ids + log-probs), pure torch.

The teacher is known only on its top-k tokens. Every divergence is computed over k + 1 outcomes:
the k tokens, and one "tail" bucket holding everything else. The student's tail mass is exact
(1 − its mass on the k tokens); the teacher's tail depends on `tail`:

- `renormalize`: the teacher is its top-k renormalised, tail 0. fKL, JSD and TVD are then the exact
  divergences between that distribution and the student's full softmax (tail tokens all have the
  same ratio, so one bucket loses nothing). Reverse KL would be infinite on a zero tail, so rKL
  compares both distributions restricted to the top-k and renormalised.
- `bucket`: the teacher keeps its tail mass at temperature T, r_T = Σ_tail p^(1/T) / Σ_all p^(1/T),
  which the capture stored exactly (fp32, before quantisation; T = 1 always, other T when listed in
  `teacher.tail_temperatures`). The top-k get softmax(lp / T over the k) · (1 − r_T), so the
  teacher's k + 1 probabilities sum to exactly 1 whatever the log-prob quantisation.

Temperature T divides the stored (T = 1) teacher log-probs and the student logits; the divergence is
multiplied by T² so its gradients keep their scale (Hinton et al.). With k = V every kind equals
the dense divergence between the full distributions. No [tokens × vocab] teacher tensor is built.

`distill_loss` takes the student's logits [N, V] (one, and at T ≠ 1 a second, [N, V] log-softmax);
`chunked.chunked_distill_loss` computes the same loss from the final hidden states and the LM head in
row chunks, never holding [N, V]. Both use `topk_divergence`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from orchestrator.errors import ShardError

LossKind = Literal["fkl", "rkl", "jsd", "tvd"]
TailMode = Literal["renormalize", "bucket"]
LOSS_KINDS: tuple[str, ...] = ("fkl", "rkl", "jsd", "tvd")
TAIL_MODES: tuple[str, ...] = ("renormalize", "bucket")
_MIN_TAIL = 1e-12


@dataclass(frozen=True)
class LossSpec:
    """How a student run blends the KD divergence with hard-label cross-entropy: the settings of
    `distill_loss` (from the config's train.loss, temperature, alpha, beta, tail), owned here
    beside the loss that reads them."""

    kind: LossKind
    """The divergence: forward KL, reverse KL, generalised JSD(beta), total variation
    (train.loss)."""
    temperature: float
    """Divides the teacher log-probs and the student logits; the KD term is scaled by T²."""
    alpha: float
    """Weight of the KD term; 1 − alpha weighs the hard-label cross-entropy (0: hard labels
    only — the baselines)."""
    beta: float
    """JSD mixing weight, in (0, 1)."""
    tail: TailMode
    """The teacher's mass outside its top-k: renormalised away, or kept as one tail bucket."""

    def kwargs(self) -> dict:
        """The loss settings as `distill_loss` / `chunked_distill_loss` keyword arguments."""
        return {"kind": self.kind, "temperature": self.temperature, "alpha": self.alpha,
                "beta": self.beta, "tail": self.tail}


@dataclass
class LossParts:
    total: torch.Tensor
    """alpha · kd + (1 − alpha) · ce, the value to back-propagate."""
    kd: torch.Tensor
    """Mean divergence per labelled position (× T²)."""
    ce: torch.Tensor
    """Mean hard-label cross-entropy (T = 1) per target position."""


def distill_loss(
    student_logits: torch.Tensor,
    *,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    targets: torch.Tensor,
    kd_mask: torch.Tensor,
    kind: LossKind = "fkl",
    temperature: float = 1.0,
    alpha: float = 0.5,
    beta: float = 0.5,
    tail: TailMode = "renormalize",
    tail_mass: torch.Tensor | None = None,
    tail_temperatures: torch.Tensor | None = None,
) -> LossParts:
    """Blend a KD divergence with hard-label cross-entropy.

    student_logits: [N, V]; topk_ids, topk_logprobs: [N, k] (teacher, T = 1, full-vocab
    normalised); targets: [N] next-token ids, -100 where there is none; kd_mask: [N] bool, the
    positions that have teacher labels (prompt positions are False in sample mode);
    tail_mass: [N, m] the stored tail masses at tail_temperatures [m] (needed by tail=bucket).
    """
    logits = student_logits.float()
    lp = torch.log_softmax(logits, dim=-1)     # [N, V]: the only full-vocab tensor of the step
    has_target = targets >= 0
    nll = -lp.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)
    ce = _masked_mean(nll, has_target)
    if alpha == 0.0:
        return LossParts(total=ce, kd=ce.new_zeros(()), ce=ce)
    # at T = 1 the KD term reuses the CE log-softmax; only [N, k] gathers are added. Rows without
    # teacher labels are computed too (cheaply, on zeroed labels) and masked out: indexing the
    # labelled rows would copy an [n, V] tensor.
    s_lp = lp if temperature == 1.0 else torch.log_softmax(logits / temperature, dim=-1)
    labelled = kd_mask.unsqueeze(1)
    ids = torch.where(labelled, topk_ids, torch.zeros_like(topk_ids)).long()
    t_lp = torch.where(labelled, topk_logprobs.float(), torch.zeros_like(topk_logprobs, dtype=torch.float32))
    r = None
    if tail == "bucket":
        r = tail_at(tail_mass, tail_temperatures, temperature)
        r = torch.where(kd_mask, r.float(), torch.zeros_like(r, dtype=torch.float32))
    d = divergence(logits, ids, t_lp, kind=kind, temperature=temperature, beta=beta, tail=tail,
                   teacher_tail=r, student_logprobs=s_lp)
    kd = _masked_mean(d, kd_mask)
    return LossParts(total=alpha * kd + (1.0 - alpha) * ce, kd=kd, ce=ce)


def divergence(logits: torch.Tensor, ids: torch.Tensor, teacher_lp: torch.Tensor, *,
               kind: LossKind, temperature: float, beta: float = 0.5,
               tail: TailMode = "renormalize", teacher_tail: torch.Tensor | None = None,
               student_logprobs: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row divergence × T² between teacher (top-k) and student (full logits [n, V]).
    teacher_tail: [n] the teacher's stored tail mass r_T at this temperature (tail=bucket);
    `student_logprobs` = log_softmax(logits / T) when the caller already has it."""
    s_lp_all = student_logprobs if student_logprobs is not None else \
        torch.log_softmax(logits / temperature, dim=-1)
    return topk_divergence(s_lp_all.gather(-1, ids), teacher_lp, kind=kind,
                           temperature=temperature, vocab=logits.shape[-1], beta=beta, tail=tail,
                           teacher_tail=teacher_tail)


def topk_divergence(student_top: torch.Tensor, teacher_lp: torch.Tensor, *, kind: LossKind,
                    temperature: float, vocab: int, beta: float = 0.5,
                    tail: TailMode = "renormalize",
                    teacher_tail: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row divergence × T² over the k + 1 outcomes (the teacher's top-k, one tail bucket).

    student_top: [n, k] the student's log-probs at temperature T (normalised over its whole
    vocabulary of `vocab` tokens) on the teacher's top-k ids; teacher_lp: [n, k] the stored (T = 1)
    teacher log-probs (−inf: a slot folded into the tail); teacher_tail: [n] r_T (tail=bucket). The one implementation of the
    divergences: `divergence` (dense logits) and `chunked.chunked_distill_loss` (one row chunk of
    the LM head at a time, which differentiates this on [n, k] only) both call it."""
    if kind not in LOSS_KINDS:
        raise ValueError(f"loss kind must be one of {', '.join(LOSS_KINDS)}, got {kind!r}")
    if tail not in TAIL_MODES:
        raise ValueError(f"tail must be one of {', '.join(TAIL_MODES)}, got {tail!r}")
    T, k = temperature, student_top.shape[-1]
    # a slot the teacher gives -inf holds no token for the student either: an id folded into the
    # tail because the student has no row for it (`batches.fold_vocab`)
    s_top = torch.where(torch.isneginf(teacher_lp), -math.inf, student_top)
    s_tail = _log1mexp(torch.logsumexp(s_top, -1, keepdim=True))     # [n, 1]
    t_top, t_tail = _teacher(teacher_lp, T=T, vocab=vocab, k=k, tail=tail, r=teacher_tail)
    if (kind == "rkl" and tail == "renormalize") or k >= vocab:
        s_top = s_top - torch.logsumexp(s_top, -1, keepdim=True)
        s_tail = torch.full_like(s_tail, -math.inf)
    logp = torch.cat([t_top, t_tail], -1)
    logq = torch.cat([s_top, s_tail], -1)
    p, q = logp.exp(), logq.exp()
    if kind == "fkl":
        d = _xlogy_diff(p, logp, logq)
    elif kind == "rkl":
        d = _xlogy_diff(q, logq, logp)
    elif kind == "tvd":
        d = 0.5 * (p - q).abs().sum(-1)
    else:
        if not 0.0 < beta < 1.0:
            raise ValueError(f"jsd beta must be in (0, 1), got {beta}")
        logm = torch.logaddexp(logp + math.log(beta), logq + math.log(1.0 - beta))
        d = beta * _xlogy_diff(p, logp, logm) + (1.0 - beta) * _xlogy_diff(q, logq, logm)
    return d * T * T


def _teacher(lp: torch.Tensor, *, T: float, vocab: int, k: int, tail: TailMode,
             r: torch.Tensor | None):
    """Teacher log-probs at temperature T over (top-k, tail): [n, k], [n, 1]."""
    a = lp / T
    top = a - torch.logsumexp(a, -1, keepdim=True)
    if tail == "renormalize" or k >= vocab:
        return top, torch.full_like(top[:, :1], -math.inf)
    if r is None:
        raise ValueError("tail='bucket' needs the teacher's stored tail mass (teacher_tail)")
    # kept in [1e-12, 1 - 1e-12]: a zero tail would make reverse KL infinite (and its gradient NaN)
    r = r.float().reshape(-1, 1).clamp(_MIN_TAIL, 1.0 - _MIN_TAIL)
    return top + torch.log1p(-r), torch.log(r)


def tail_at(tail_mass: torch.Tensor | None, tail_temperatures: torch.Tensor | None,
            temperature: float) -> torch.Tensor:
    """The [N] column of the stored tail masses [N, m] that was captured at `temperature`."""
    if tail_mass is None or tail_temperatures is None:
        raise ValueError("tail='bucket' needs the shards' tail_mass and tail_temperatures")
    temps = [float(t) for t in tail_temperatures.reshape(-1).tolist()]
    match = [j for j, t in enumerate(temps) if abs(t - temperature) <= 1e-6 * max(1.0, t)]
    if not match:
        raise ShardError(
            f"train.tail=bucket at train.temperature={temperature:g} needs the teacher's tail mass "
            f"at that temperature, but the capture stored it only at {temps}: add "
            f"{temperature:g} to teacher.tail_temperatures and recapture, or use "
            "train.tail=renormalize")
    return tail_mass[..., match[0]]


def _xlogy_diff(x: torch.Tensor, logx: torch.Tensor, logy: torch.Tensor) -> torch.Tensor:
    """Σ x (log x − log y) over the last dim, with 0 · anything = 0 (and no NaN gradients)."""
    pos = x > 0
    zero = torch.zeros_like(x)
    return (x * (torch.where(pos, logx, zero) - torch.where(pos, logy, zero))).sum(-1)


def _log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(a)) for a ≤ 0, stable. `a` is kept ≤ −1e-12, so a mass of ~1 leaves a tail of
    ~1e-12 (log ≈ −27.6) rather than −inf, whose gradient would be NaN."""
    a = a.clamp(max=-1e-12)
    return torch.where(a > -math.log(2.0), torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)
