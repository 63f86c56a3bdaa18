"""KD losses on sparse targets against dense references computed from full distributions."""

import math

import pytest
import torch

from orchestrator.kd.losses import LOSS_KINDS, TAIL_MODES, distill_loss, divergence

V = 50


def dense(kind, p_logits, q_logits, T, beta=0.5):
    """Reference divergences between the full softmax(p/T) and softmax(q/T), × T²."""
    logp, logq = torch.log_softmax(p_logits / T, -1), torch.log_softmax(q_logits / T, -1)
    p, q = logp.exp(), logq.exp()
    if kind == "fkl":
        d = (p * (logp - logq)).sum(-1)
    elif kind == "rkl":
        d = (q * (logq - logp)).sum(-1)
    elif kind == "tvd":
        d = 0.5 * (p - q).abs().sum(-1)
    else:
        m = beta * p + (1 - beta) * q
        d = beta * (p * (logp - m.log())).sum(-1) + (1 - beta) * (q * (logq - m.log())).sum(-1)
    return d * T * T


def teacher_topk(t_logits, k):
    lp = torch.log_softmax(t_logits, -1)  # stored at T = 1
    vals, ids = lp.topk(k, -1)
    return ids, vals


def tail_of(t_logits, ids, T=1.0):
    """The teacher's tail mass at T, as a capture stores it."""
    return 1 - torch.softmax(t_logits.double() / T, -1).gather(1, ids).sum(-1).float()


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, V, generator=g) * 2, torch.randn(6, V, generator=g) * 2


@pytest.mark.parametrize("kind", LOSS_KINDS)
@pytest.mark.parametrize("tail", TAIL_MODES)
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_equals_dense_reference_when_k_is_vocab(kind, tail, T, logits):
    t_logits, s_logits = logits
    ids, lps = teacher_topk(t_logits, V)
    s = s_logits.clone().requires_grad_(True)
    got = divergence(s, ids, lps, kind=kind, temperature=T, beta=0.3, tail=tail)
    s_ref = s_logits.clone().requires_grad_(True)
    ref = dense(kind, t_logits, s_ref, T, beta=0.3)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    got.sum().backward()
    ref.sum().backward()
    assert torch.isfinite(s.grad).all()
    torch.testing.assert_close(s.grad, s_ref.grad, atol=2e-5, rtol=1e-3)


@pytest.mark.parametrize("kind", LOSS_KINDS)
@pytest.mark.parametrize("tail", TAIL_MODES)
def test_sparse_targets_are_sensible(kind, tail, logits):
    t_logits, s_logits = logits
    ids, lps = teacher_topk(t_logits, 8)
    r1, r2 = tail_of(t_logits, ids), tail_of(t_logits, ids, 2.0)
    d = divergence(s_logits, ids, lps, kind=kind, temperature=2.0, tail=tail, teacher_tail=r2)
    assert (d >= -1e-6).all() and torch.isfinite(d).all()
    # a student equal to the teacher scores (near) zero in bucket mode, at T = 1 and T = 2
    for T, r in ((1.0, r1), (2.0, r2)):
        same = divergence(t_logits, ids, lps, kind=kind, temperature=T, tail="bucket", teacher_tail=r)
        assert same.abs().max() < 1e-5
    # and strictly better than a different student
    assert (divergence(t_logits, ids, lps, kind=kind, temperature=1.0, tail=tail, teacher_tail=r1)
            <= divergence(s_logits, ids, lps, kind=kind, temperature=1.0, tail=tail,
                          teacher_tail=r1) + 1e-6).all()


def test_sparse_fkl_bucket_close_to_dense_when_tail_small():
    g = torch.Generator().manual_seed(1)
    t_logits = torch.randn(4, V, generator=g) * 6  # peaked teacher: top-16 holds nearly all mass
    s_logits = torch.randn(4, V, generator=g)
    ids, lps = teacher_topk(t_logits, 16)
    assert (lps.exp().sum(-1) > 0.98).all()
    got = divergence(s_logits, ids, lps, kind="fkl", temperature=1.0, tail="bucket",
                     teacher_tail=tail_of(t_logits, ids))
    torch.testing.assert_close(got, dense("fkl", t_logits, s_logits, 1.0), atol=0.05, rtol=0.02)


def test_gradients_flow_and_t_squared_scaling(logits):
    t_logits, s_logits = logits
    ids, lps = teacher_topk(t_logits, 8)
    s = s_logits.clone().requires_grad_(True)
    divergence(s, ids, lps, kind="fkl", temperature=4.0, tail="renormalize").sum().backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    # gradient of T²·KL(softmax(a/T) || softmax(z/T)) wrt z is T·(q − p): same order of magnitude
    # for T = 1 and T = 4 thanks to the T² factor
    s1 = s_logits.clone().requires_grad_(True)
    divergence(s1, ids, lps, kind="fkl", temperature=1.0, tail="renormalize").sum().backward()
    ratio = s.grad.abs().sum() / s1.grad.abs().sum()
    assert 0.2 < ratio < 5


def test_blend_with_hard_labels_and_masks(logits):
    t_logits, s_logits = logits
    ids, lps = teacher_topk(t_logits, 8)
    targets = torch.tensor([3, 4, -100, 7, 1, 2])
    kd_mask = torch.tensor([False, True, True, True, False, True])
    parts = distill_loss(s_logits, topk_ids=ids, topk_logprobs=lps, targets=targets,
                         kd_mask=kd_mask, kind="fkl", temperature=2.0, alpha=0.25)
    ce = torch.nn.functional.cross_entropy(s_logits, targets, ignore_index=-100)
    kd = divergence(s_logits[kd_mask], ids[kd_mask], lps[kd_mask], kind="fkl", temperature=2.0).mean()
    torch.testing.assert_close(parts.ce, ce)
    torch.testing.assert_close(parts.kd, kd)
    torch.testing.assert_close(parts.total, 0.25 * kd + 0.75 * ce)
    only_ce = distill_loss(s_logits, topk_ids=ids, topk_logprobs=lps, targets=targets,
                           kd_mask=kd_mask, alpha=0.0)
    torch.testing.assert_close(only_ce.total, ce)


def test_bad_kind_lists_valid_ones(logits):
    t_logits, s_logits = logits
    ids, lps = teacher_topk(t_logits, 4)
    with pytest.raises(ValueError, match="fkl, rkl, jsd, tvd"):
        divergence(s_logits, ids, lps, kind="kl2", temperature=1.0)
    with pytest.raises(ValueError, match=r"beta must be in \(0, 1\)"):
        divergence(s_logits, ids, lps, kind="jsd", temperature=1.0, beta=1.0)
    assert math.isfinite(float(divergence(s_logits, ids, lps, kind="jsd", temperature=1.0).sum()))
