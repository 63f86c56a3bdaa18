"""The fused head + KD/CE loss (kd/chunked.py) against `distill_loss` on the dense logits: values
and gradients (hidden, weight, bias) for every divergence, tail mode, temperature and blend, with
unlabelled rows and -100 targets, chunks that do and do not divide N, fp32 and bf16; and no
[N, V] tensor ever allocated (every aten op's output recorded by a dispatch mode)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from orchestrator.kd.chunked import chunked_distill_loss
from orchestrator.kd.losses import LOSS_KINDS, TAIL_MODES, distill_loss

N, H, V, K = 40, 16, 96, 6


def _labels(n=N, v=V, k=K, seed=0):
    """Teacher top-k at T = 1, exact tails at T = 1 and 2, targets with -100s, a KD mask with
    unlabelled rows (whose stored labels are garbage: the loss must not read them)."""
    g = torch.Generator().manual_seed(seed)
    t_logits = torch.randn(n, v, generator=g) * 2.5
    lp, ids = torch.log_softmax(t_logits, -1).topk(k, -1)
    tails = torch.stack([1 - torch.softmax(t_logits.double() / T, -1).gather(1, ids).sum(-1)
                         for T in (1.0, 2.0)], 1).float()
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::7] = -100
    mask = torch.rand(n, generator=g) > 0.3
    ids = torch.where(mask.unsqueeze(1), ids, torch.full_like(ids, 10 * v))  # out of range
    return dict(topk_ids=ids, topk_logprobs=lp, targets=targets, kd_mask=mask, tail_mass=tails,
                tail_temperatures=torch.tensor([1.0, 2.0]))


def _head(dtype=torch.float32, seed=1, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H ** 0.5 * 3
    b = torch.randn(V, generator=g) * 0.3 if bias else None
    return [None if t is None else t.to(dtype).requires_grad_() for t in (hidden, weight, b)]


def _dense_logits(hidden, weight, bias, softcap=None, logit_scale=1.0):
    z = F.linear(hidden, weight, bias)
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    return z * logit_scale


def _both(labels, *, dtype=torch.float32, bias=True, softcap=None, logit_scale=1.0,
          chunk_rows=None, **kw):
    """(dense parts, dense grads, chunked parts, chunked grads) on identical fresh leaves."""
    ref_leaves, got_leaves = _head(dtype, bias=bias), _head(dtype, bias=bias)
    ref = distill_loss(_dense_logits(*ref_leaves, softcap, logit_scale), **labels, **kw)
    ref.total.backward()
    hidden, weight, b = got_leaves
    got = chunked_distill_loss(hidden, weight=weight, bias=b, softcap=softcap,
                               logit_scale=logit_scale, chunk_rows=chunk_rows, **labels, **kw)
    got.total.backward()
    grads = lambda leaves: [None if t is None else t.grad for t in leaves]  # noqa: E731
    return ref, grads(ref_leaves), got, grads(got_leaves)


def _close(ref, ref_grads, got, got_grads, *, atol, rtol):
    for name in ("total", "kd", "ce"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name).float(), atol=atol,
                                   rtol=rtol, msg=name)
    for name, a, b in zip(("hidden", "weight", "bias"), got_grads, ref_grads):
        if b is None:
            assert a is None
            continue
        assert a.dtype == b.dtype
        scale = b.float().abs().max().clamp(min=1e-3)  # gradients: relative to their size
        torch.testing.assert_close(a.float() / scale, b.float() / scale, atol=atol, rtol=rtol,
                                   msg=name)


@pytest.mark.parametrize("chunk_rows", [8, 7], ids=["divides", "ragged"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("tail", TAIL_MODES)
@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_equals_dense_loss_values_and_gradients(kind, tail, T, alpha, chunk_rows):
    out = _both(_labels(), kind=kind, tail=tail, temperature=T, alpha=alpha, beta=0.3,
                chunk_rows=chunk_rows)
    _close(*out, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("T", [0.5, 1.5, 2.0, 3.0])
@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_every_temperature_path_equals_dense(kind, T):
    """T = 2 and T = 0.5 take one exponential and a square, other temperatures two exponentials."""
    out = _both(_labels(), kind=kind, tail="renormalize", temperature=T, alpha=0.5, beta=0.3,
                chunk_rows=7)
    _close(*out, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("softcap, logit_scale, bias", [(None, 0.25, True), (5.0, 1.0, False),
                                                        (5.0, 1.5, True)])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_heads_with_soft_cap_and_logit_scale(softcap, logit_scale, bias, T):
    """Gemma 2's soft cap, Granite's / Cohere's scale, and both at once, with and without bias."""
    out = _both(_labels(), bias=bias, softcap=softcap, logit_scale=logit_scale, kind="jsd",
                tail="bucket", temperature=T, alpha=0.5, chunk_rows=9)
    _close(*out, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("kind, tail", list(zip(LOSS_KINDS, TAIL_MODES * 2)))
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_bf16_inputs_agree_loosely(kind, tail, T):
    """bf16 hidden, weight and bias: both paths round the logits once to bf16 and run the loss in
    fp32; the gradients' matmuls run in bf16 (the dense path's too), so they agree to bf16."""
    out = _both(_labels(), dtype=torch.bfloat16, kind=kind, tail=tail, temperature=T, alpha=0.5,
                chunk_rows=16)
    _close(*out, atol=2e-2, rtol=2e-2)


def test_autocast_runs_the_matmuls_in_bf16_and_returns_fp32_gradients():
    labels = _labels()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, ref_grads, got, got_grads = _both(labels, kind="fkl", temperature=2.0, alpha=0.5,
                                               chunk_rows=8)
    assert all(g.dtype == torch.float32 for g in got_grads)
    _close(ref, ref_grads, got, got_grads, atol=2e-2, rtol=2e-2)


def test_recompute_in_backward_gives_the_same_gradients():
    labels = _labels()
    grads = []
    for recompute in (False, True):
        hidden, weight, b = _head()
        parts = chunked_distill_loss(hidden, weight=weight, bias=b, kind="rkl", tail="bucket",
                                     temperature=2.0, chunk_rows=6, recompute=recompute, **labels)
        parts.total.backward()
        grads.append((parts.total.detach(), hidden.grad, weight.grad, b.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_only_total_is_differentiable_and_grad_output_scales():
    """kd and ce are reported values; backward scales the forward's gradients by grad_output and
    accumulates like any autograd op (gradient accumulation over micro-batches)."""
    labels = _labels()
    hidden, weight, b = _head()
    parts = chunked_distill_loss(hidden, weight=weight, bias=b, temperature=2.0, **labels)
    assert parts.total.requires_grad and not parts.kd.requires_grad and not parts.ce.requires_grad
    (parts.total / 4).backward()
    quarter = weight.grad.clone()
    chunked_distill_loss(hidden, weight=weight, bias=b, temperature=2.0, **labels).total.backward()
    torch.testing.assert_close(weight.grad, 5 * quarter)
    with torch.no_grad():  # evaluation: no gradient work, same value
        again = chunked_distill_loss(hidden, weight=weight, bias=b, temperature=2.0, **labels)
    torch.testing.assert_close(again.total, parts.total.detach())


def test_no_labels_and_no_targets_normalise_like_distill_loss():
    labels = _labels()
    labels["kd_mask"] = torch.zeros(N, dtype=torch.bool)
    labels["targets"] = torch.full((N,), -100)
    _close(*_both(labels, temperature=2.0, alpha=0.5, chunk_rows=8), atol=1e-7, rtol=1e-6)


def test_bad_arguments_name_the_allowed_values():
    hidden, weight, _ = _head()
    with pytest.raises(ValueError, match="fkl, rkl, jsd, tvd"):
        chunked_distill_loss(hidden, weight=weight, kind="kl2", **_labels())
    with pytest.raises(ValueError, match=r"beta must be in \(0, 1\)"):
        chunked_distill_loss(hidden, weight=weight, kind="jsd", beta=0.0, **_labels())
    with pytest.raises(ValueError, match="chunk_rows must be at least 1, got 0"):
        chunked_distill_loss(hidden, weight=weight, chunk_rows=0, **_labels())


class _LargestTensor(TorchDispatchMode):
    """Records the largest storage (bytes) any aten op returns, forward and backward."""

    def __init__(self):
        super().__init__()
        self.largest, self.shape = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() > self.largest:
                self.largest, self.shape = t.untyped_storage().nbytes(), tuple(t.shape)
        return out


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_no_tokens_by_vocabulary_tensor_is_ever_allocated(T):
    """512 × 8192 logits (16 MiB fp32) in chunks of 64 rows: no tensor of a quarter of that
    exists, forward or backward, at either temperature; the dense path does allocate one (so the
    probe would see a regression)."""
    n, v, h = 512, 8192, 32
    labels = _labels(n, v, 8)
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 0.2).requires_grad_()
    limit = n * v * 4 // 4
    with _LargestTensor() as seen:
        chunked_distill_loss(hidden, weight=weight, kind="jsd", tail="bucket", temperature=T,
                             chunk_rows=64, **labels).total.backward()
    assert seen.largest < limit, (seen.largest, seen.shape)
    with _LargestTensor() as dense:
        distill_loss(hidden @ weight.T, kind="jsd", tail="bucket", temperature=T,
                     **labels).total.backward()
    assert dense.largest >= n * v * 4, (dense.largest, dense.shape)


def test_default_chunk_is_bounded_by_chunk_bytes():
    from orchestrator.kd import chunked

    labels = _labels(300, 4096, 4)
    hidden = torch.randn(300, 8, requires_grad=True)
    weight = torch.randn(4096, 8, requires_grad=True)
    old = chunked.CHUNK_BYTES
    chunked.CHUNK_BYTES = 64 * 4096 * 4  # 64 rows
    try:
        with _LargestTensor() as seen:
            chunked_distill_loss(hidden, weight=weight, temperature=2.0, **labels).total.backward()
    finally:
        chunked.CHUNK_BYTES = old
    assert seen.largest <= 64 * 4096 * 4, seen.shape


def test_matches_across_many_random_settings():
    """A sweep over random shapes and label densities (k up to V, where every kind is exact)."""
    for seed, (n, v, k) in enumerate(itertools.product([5, 33], [20, 64], [1, 20])):
        labels = _labels(n, v, k, seed=seed)
        g = torch.Generator().manual_seed(seed)
        leaves = [torch.randn(n, 8, generator=g), torch.randn(v, 8, generator=g)]
        a = [t.clone().requires_grad_() for t in leaves]
        b = [t.clone().requires_grad_() for t in leaves]
        ref = distill_loss(a[0] @ a[1].T, kind="fkl", tail="bucket", temperature=2.0, **labels)
        got = chunked_distill_loss(b[0], weight=b[1], kind="fkl", tail="bucket", temperature=2.0,
                                   chunk_rows=4, **labels)
        ref.total.backward()
        got.total.backward()
        torch.testing.assert_close(got.total, ref.total, atol=1e-5, rtol=1e-5)
        for x, y in zip(a, b):
            torch.testing.assert_close(y.grad, x.grad, atol=1e-5, rtol=1e-4)


def test_a_second_backward_is_refused_not_silently_rescaled():
    """backward scales the stored gradients in place (no second [V, H] copy at the peak), so a
    second backward through the same loss (retain_graph) must fail loudly."""
    hidden, weight, b = _head()
    total = chunked_distill_loss(hidden, weight=weight, bias=b, **_labels()).total
    total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="compute the loss again"):
        total.backward()
