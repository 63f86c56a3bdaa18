"""The student's LM head fused with the KD + CE loss, one row chunk at a time (pure torch).

`distill_loss` takes the student's full logits [N, V]: at 128k vocabularies they are the largest
tensors of a step, and at T ≠ 1 it builds a second [N, V] log-softmax. `chunked_distill_loss` takes
the final hidden states [N, H] and the head's weight [V, H] instead, and for each chunk of
`chunk_rows` rows:

1. computes the chunk's logits once (`F.linear`, then the head's soft cap and scale);
2. takes the row max, then the normaliser at T = 1 (the CE) and, at T ≠ 1, the one at T (the KD)
   from the same shifted logits, and gathers the target's and the teacher's top-k logits;
3. evaluates the CE and `losses.topk_divergence` (the same k + 1-outcome divergence as the dense
   path) on [c, k], and differentiates the divergence there, on [c, k] only;
4. turns that into the chunk's logit gradient in place, in the buffer of the T = 1 exponentials:
   dL/dl = w_ce · (softmax(l) − onehot(target)) + w_kd / T · (scatter(g) − Σg · softmax(l / T)),
   g = ∂d/∂(student top-k log-probs at T), then multiplies through the head (soft cap, scale) and
   adds the chunk's share to the gradients of the hidden states, weight and bias.

So the gradients are complete when the forward ends (Liger-Kernel's fused linear cross-entropy
does the same): backward only scales them by grad_output. Recomputing the logits in the backward
instead (`recompute=True`) costs one more [N, V, H] matmul per step for no lower peak: the weight's
gradient [V, H] exists at the peak either way (BENCHMARKS.md times both). No tensor larger than
[chunk_rows, V] exists at any temperature; the means are normalised by the labelled / target
positions of the whole batch, exactly as `distill_loss`.

Only `total` is differentiable (kd and ce are reported values). Differences from Liger's chunked
distillation losses: they run the teacher's head per chunk ([c, V] teacher logits, so the teacher
must be loaded beside the student), divide every loss by the CE's count of non-ignored targets, and
take the gradient of a [c, V] autograd graph (torch.func); here the teacher is its stored top-k and
tail, the KD mean has its own mask, and the gradient is written in closed form so autograd only
ever sees [c, k].
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from orchestrator.kd.losses import (LOSS_KINDS, TAIL_MODES, LossKind, LossParts, TailMode,
                                    tail_at, topk_divergence)

CHUNK_BYTES = 64 * 2**20
"""Default chunk: as many rows as fit one fp32 [rows, V] buffer of this size (at least 16)."""


@dataclasses.dataclass(frozen=True)
class _Spec:
    kind: str
    temperature: float
    alpha: float
    beta: float
    tail: str
    logit_scale: float
    softcap: float | None
    chunk_rows: int
    recompute: bool


def chunked_distill_loss(
    hidden: torch.Tensor,
    *,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
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
    logit_scale: float = 1.0,
    softcap: float | None = None,
    chunk_rows: int | None = None,
    recompute: bool = False,
) -> LossParts:
    """`distill_loss(head(hidden), ...)` without ever holding head(hidden).

    hidden: [N, H] final (post-norm) hidden states; weight: [V, H] and bias: [V] the LM head;
    the head's logits are softcap · tanh((W·h + b) / softcap) · logit_scale (kd/head.py `LMHead`
    reads them off a model). The label arguments are distill_loss's. chunk_rows: rows per chunk
    (default: `CHUNK_BYTES` of fp32 logits). The matmuls run in the autocast dtype when autocast is
    on, else in the weight's dtype; everything after them in fp32.
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"loss kind must be one of {', '.join(LOSS_KINDS)}, got {kind!r}")
    if tail not in TAIL_MODES:
        raise ValueError(f"tail must be one of {', '.join(TAIL_MODES)}, got {tail!r}")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"jsd beta must be in (0, 1), got {beta}")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    n, vocab = hidden.shape[0], weight.shape[0]
    rows = chunk_rows or max(16, CHUNK_BYTES // (4 * vocab))
    labelled = kd_mask.reshape(-1).bool()
    r = None
    if alpha != 0.0 and tail == "bucket":
        r = tail_at(tail_mass, tail_temperatures, temperature).reshape(-1).float()
    labels = (topk_ids.reshape(n, -1).long(), topk_logprobs.reshape(n, -1).float(),
              targets.reshape(-1).long(), labelled, r)
    spec = _Spec(kind, float(temperature), float(alpha), float(beta), tail, float(logit_scale),
                 None if softcap is None else float(softcap), min(rows, max(n, 1)), recompute)
    total, kd, ce = _FusedHeadLoss.apply(hidden, weight, bias, labels, spec)
    return LossParts(total=total, kd=kd, ce=ce)


class _FusedHeadLoss(torch.autograd.Function):
    """(hidden, weight, bias) → (total, kd, ce); only total is differentiable."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, spec: _Spec):
        want = ctx.needs_input_grad[:3]
        grads = any(want) and not spec.recompute
        total, kd, ce, gh, gw, gb = _run(hidden, weight, bias, labels, spec,
                                         want=want if grads else (False, False, False))
        ctx.mark_non_differentiable(kd, ce)
        ctx.spec, ctx.labels = spec, labels
        if spec.recompute:
            ctx.save_for_backward(hidden, weight, bias)
        else:
            ctx.save_for_backward(gh, gw, gb)
        return total, kd, ce

    @staticmethod
    def backward(ctx, grad_total, _grad_kd, _grad_ce):
        if ctx.spec.recompute:
            hidden, weight, bias = ctx.saved_tensors
            *_, gh, gw, gb = _run(hidden, weight, bias, ctx.labels, ctx.spec,
                                  want=ctx.needs_input_grad[:3])
        else:
            # scaled in place: a copy would hold a second [V, H] weight gradient at the peak
            if getattr(ctx, "spent", False):
                raise RuntimeError("chunked_distill_loss's gradients were already used by a "
                                   "backward; compute the loss again for another one")
            ctx.spent = True
            gh, gw, gb = ctx.saved_tensors
        for g in (gh, gw, gb):
            if g is not None:
                g.mul_(grad_total.to(g.dtype))
        return gh, gw, gb, None, None


def _run(hidden, weight, bias, labels, spec: _Spec, *, want):
    """The loss over all chunks; with `want` (hidden, weight, bias) also its gradients."""
    ids, t_lp, targets, labelled, r = labels
    dev = hidden.device
    dtype = (torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type)
             else weight.dtype)
    h_all = hidden.detach().to(dtype)
    w = weight.detach().to(dtype)
    b = None if bias is None else bias.detach().to(dtype)
    has_target = targets >= 0
    # the weights of each row in the batch means, as distill_loss normalises them
    w_ce = (1.0 - spec.alpha) * has_target.float() / has_target.sum().clamp(min=1)
    w_kd = spec.alpha * labelled.float() / labelled.sum().clamp(min=1)
    nll_sum = torch.zeros((), dtype=torch.float32, device=dev)
    kd_sum = torch.zeros((), dtype=torch.float32, device=dev)
    gh = torch.empty(hidden.shape, dtype=hidden.dtype, device=dev) if want[0] else None
    gw = torch.zeros(weight.shape, dtype=torch.float32, device=dev) if want[1] else None
    gb = torch.zeros(bias.shape, dtype=torch.float32, device=dev) if want[2] else None
    with torch.autocast(dev.type, enabled=False):
        for start in range(0, hidden.shape[0], spec.chunk_rows):
            part = slice(start, min(hidden.shape[0], start + spec.chunk_rows))
            h = h_all[part]
            out = _chunk(F.linear(h, w, b), ids[part], t_lp[part], targets[part], has_target[part],
                         labelled[part], None if r is None else r[part], w_ce[part], w_kd[part],
                         spec, vocab=w.shape[0], grads=any(want))
            nll_sum += out[0]
            kd_sum += out[1]
            if out[2] is None:
                continue
            if gb is not None:
                gb += out[2].sum(0)
            dz = out[2].to(dtype)
            if gh is not None:
                if gh.dtype == dtype:
                    torch.mm(dz, w, out=gh[part])
                else:
                    gh[part] = dz @ w
            if gw is not None:
                if dtype == torch.float32:
                    gw.addmm_(dz.T, h)
                else:  # fp32 accumulation across chunks of the low-precision products
                    gw += dz.T @ h
    ce = nll_sum / has_target.sum().clamp(min=1)
    kd = kd_sum / labelled.sum().clamp(min=1)
    total = spec.alpha * kd + (1.0 - spec.alpha) * ce if spec.alpha != 0.0 else ce.clone()
    if gw is not None:
        gw = gw.to(weight.dtype)
    if gb is not None:
        gb = gb.to(bias.dtype)
    return total, kd, ce, gh, gw, gb


def _chunk(z, ids, t_lp, targets, has_target, labelled, r, w_ce, w_kd, spec: _Spec, *, vocab,
           grads):
    """One chunk: z [c, V] the head's matmul output. Returns (Σ nll over target rows, Σ divergence
    over labelled rows, dL/dz [c, V] fp32 or None)."""
    T, kd_on = spec.temperature, spec.alpha != 0.0
    logits = z.float()  # a copy for bf16 / fp16 z; z itself for fp32 (modified in place below)
    cap_t = None
    if spec.softcap is not None:
        cap_t = logits.div_(spec.softcap).tanh_()            # kept for the cap's derivative
        logits = cap_t * (spec.softcap * spec.logit_scale)
    elif spec.logit_scale != 1.0:
        logits.mul_(spec.logit_scale)
    top = logits.amax(-1, keepdim=True)
    tgt = targets.clamp(min=0).unsqueeze(1)
    l_tgt = logits.gather(1, tgt) - top                       # [c, 1]
    ids = torch.where(labelled.unsqueeze(1), ids, torch.zeros_like(ids))
    l_top = logits.gather(1, ids) - top if kd_on else None    # [c, k]
    shifted = logits.sub_(top)
    e_t = None
    if kd_on and T == 2.0:  # exp(l) = exp(l / 2)²: a multiply instead of a second exponential
        e_t = shifted.mul(0.5).exp_()
        e_1 = torch.mul(e_t, e_t, out=shifted)
    elif kd_on and T == 0.5:  # exp(2l) = exp(l)²
        e_1 = shifted.exp_()
        e_t = e_1.square()
    else:
        e_t = shifted.mul(1.0 / T).exp_() if kd_on and T != 1.0 else None
        e_1 = shifted.exp_()                                  # the T = 1 exponentials, in place
    s_1 = e_1.sum(-1, keepdim=True)
    log_s1 = s_1.log()
    nll = (log_s1 - l_tgt).squeeze(1)
    nll_sum = (nll * has_target).sum()
    kd_sum = nll_sum.new_zeros(())
    g = None
    if kd_on:
        s_t = s_1 if e_t is None else e_t.sum(-1, keepdim=True)
        s_top = l_top / T - s_t.log()                         # student log-probs at T on the top-k
        rows = labelled.nonzero().squeeze(1)
        if rows.numel():
            with torch.enable_grad():
                leaf = s_top[rows].detach().requires_grad_(grads)
                d = topk_divergence(leaf, t_lp[rows], kind=spec.kind, temperature=T, vocab=vocab,
                                    beta=spec.beta, tail=spec.tail,
                                    teacher_tail=None if r is None else r[rows])
                kd_sum = d.sum().detach()
                if grads:
                    (g_rows,) = torch.autograd.grad((d * w_kd[rows]).sum(), leaf)
                    g = torch.zeros_like(s_top).index_copy_(0, rows, g_rows)
    if not grads:
        return nll_sum, kd_sum, None
    # dL/dl = w_ce (e_1 / s_1 − onehot) + (scatter(g) − Σg · e_t / s_t) / T, built in e_1's buffer
    scale = spec.logit_scale if cap_t is None else 1.0
    coef_1, coef_t = w_ce.unsqueeze(1) / s_1, None
    if g is not None:
        coef_t = -g.sum(-1, keepdim=True) / (T * s_t)
        if e_t is None:
            coef_1, coef_t = coef_1 + coef_t, None
    dl = e_1.mul_(coef_1 * scale)
    if coef_t is not None:
        dl.addcmul_(e_t, coef_t * scale)
    if g is not None:
        dl.scatter_add_(1, ids, g * (scale / T))
    dl.scatter_add_(1, tgt, (-w_ce * scale).unsqueeze(1))
    if cap_t is not None:  # d(cap · tanh(z / cap) · scale)/dz = (1 − tanh²) · scale
        dl.mul_(cap_t.square_().neg_().add_(1.0).mul_(spec.logit_scale))
    return nll_sum, kd_sum, dl
