"""Teacher ids past the student's embedding rows (a teacher table padded past the shared
tokenizer) folded into the tail: the loss equals the divergence computed by hand over the ids the
student has plus one tail, no probability mass is lost, and training and evaluation index
nothing out of range (`orchestrator.kd.batches.fold_vocab`)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from orchestrator.kd.batches import collate, fold_vocab
from orchestrator.kd.losses import LOSS_KINDS, distill_loss

TEACHER_ROWS, STUDENT_ROWS, K, T_LEN = 12, 10, 5, 6
TEMPS = (1.0, 2.0)


def _teacher(seed: int = 0) -> torch.Tensor:
    """[T_LEN, TEACHER_ROWS] teacher logits whose top-k holds the padded ids 10 and 11 at
    several positions (the rows the student lacks)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T_LEN, TEACHER_ROWS, generator=g, dtype=torch.float64) * 2
    logits[::2, 10] += 4.0   # the teacher's best token at even positions
    logits[1::3, 11] += 2.0  # somewhere in the top-k at others
    return logits


def _sample(logits: torch.Tensor) -> dict:
    """A decoded shard row as a capture stores it: top-k at T = 1 and the exact tails."""
    lp = torch.log_softmax(logits, -1)
    vals, ids = lp.topk(K, -1)
    tails = [1 - torch.softmax(logits / T, -1).gather(1, ids).sum(-1) for T in TEMPS]
    return {"input_ids": np.arange(1, T_LEN + 1) % STUDENT_ROWS, "prompt_len": 0,
            "topk_ids": ids.numpy().astype(np.int32),
            "topk_logprobs": vals.float().numpy(),
            "tail_mass": torch.stack(tails, 1).float().numpy(),
            "tail_temperatures": np.asarray(TEMPS, dtype=np.float32)}


def _by_hand(kind: str, t_logits: torch.Tensor, s_logits: torch.Tensor, ids: torch.Tensor,
             T: float) -> torch.Tensor:
    """The divergence × T² over the outcomes {the teacher's top-k ids the student has} + one
    tail, from the full teacher (12 rows) and student (10 rows) distributions at T."""
    p = torch.softmax(t_logits / T, -1)
    q = torch.softmax(s_logits.double() / T, -1)
    out = []
    for r in range(ids.shape[0]):
        kept = [i for i in ids[r].tolist() if i < STUDENT_ROWS]
        pk, qk = p[r, kept], q[r, kept]
        pp = torch.cat([pk, (1 - pk.sum()).reshape(1)])
        qq = torch.cat([qk, (1 - qk.sum()).reshape(1)])
        if kind == "fkl":
            d = (pp * (pp.log() - qq.log())).sum()
        elif kind == "rkl":
            d = (qq * (qq.log() - pp.log())).sum()
        elif kind == "tvd":
            d = 0.5 * (pp - qq).abs().sum()
        else:
            m = 0.5 * pp + 0.5 * qq
            d = 0.5 * (pp * (pp / m).log()).sum() + 0.5 * (qq * (qq / m).log()).sum()
        out.append(d * T * T)
    return torch.stack(out)


@pytest.mark.parametrize("T", TEMPS)
@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_folded_loss_equals_the_divergence_by_hand(kind, T):
    t_logits = _teacher()
    batch = collate([_sample(t_logits)])
    assert (batch.topk_ids >= STUDENT_ROWS).any(), "the test needs padded ids in the top-k"
    folded, _ = fold_vocab(batch, STUDENT_ROWS)
    s_logits = torch.randn(T_LEN, STUDENT_ROWS, generator=torch.Generator().manual_seed(1))
    flat = folded.flat()
    got = distill_loss(s_logits, kind=kind, temperature=T, alpha=1.0, tail="bucket", **flat)
    want = _by_hand(kind, t_logits, s_logits, batch.topk_ids[0, :], T)  # every position
    torch.testing.assert_close(got.kd.double(), want.mean(), atol=2e-5, rtol=1e-5)


def test_folding_loses_no_mass_and_keeps_the_order():
    t_logits = _teacher()
    batch = collate([_sample(t_logits)])
    folded, mass = fold_vocab(batch, STUDENT_ROWS)
    p = torch.softmax(t_logits, -1)
    out = batch.topk_ids[0] >= STUDENT_ROWS
    assert mass == pytest.approx(float((p.gather(1, batch.topk_ids[0]) * out).sum()), rel=1e-5)
    assert mass > 0.1
    before = batch.topk_logprobs[0].double().exp().sum(-1) + batch.tail_mass[0, :, 0]
    kept = folded.topk_logprobs[0].double().exp().sum(-1)  # exp(-inf) = 0: folded slots
    torch.testing.assert_close(kept + folded.tail_mass[0, :, 0].double(), before.double(),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(before, torch.ones(T_LEN, dtype=torch.float64), atol=1e-6, rtol=0)
    # the tempered tail is the exact one over the ids the student has
    ids = batch.topk_ids[0]
    for j, T in enumerate(TEMPS):
        pt = torch.softmax(t_logits / T, -1)
        exact = torch.tensor([1 - pt[r, [i for i in ids[r].tolist() if i < STUDENT_ROWS]].sum()
                              for r in range(T_LEN)])
        torch.testing.assert_close(folded.tail_mass[0, :, j].double(), exact, atol=1e-6, rtol=0)
    assert (folded.topk_ids < STUDENT_ROWS).all()
    lps = folded.topk_logprobs[0]
    assert (lps[:, :-1] >= lps[:, 1:]).all()  # still descending, folded (-inf) slots last
    assert torch.isneginf(lps).sum() == out.sum()


def test_nothing_to_fold_is_the_same_batch():
    batch = collate([_sample(_teacher())])
    same, mass = fold_vocab(batch, TEACHER_ROWS)
    assert same is batch and mass == 0.0


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_a_padded_id_trains_without_index_errors(kind, tail):
    """Unfolded, the student's gather indexes past its rows; folded, the loss and its gradients
    are finite for every divergence, tail mode and temperature."""
    batch = collate([_sample(_teacher(seed=3))])
    logits = torch.randn(T_LEN, STUDENT_ROWS, requires_grad=True)
    with pytest.raises((IndexError, RuntimeError)):
        distill_loss(logits, kind=kind, temperature=2.0, alpha=0.5, tail=tail, **batch.flat())
    folded, _ = fold_vocab(batch, STUDENT_ROWS)
    for T in TEMPS:
        parts = distill_loss(logits, kind=kind, temperature=T, alpha=0.5, tail=tail,
                             **folded.flat())
        parts.total.backward()
        assert math.isfinite(parts.total.item())
        assert torch.isfinite(logits.grad).all()
        logits.grad = None


def test_a_position_whose_whole_top_k_is_folded_has_no_label():
    sample = _sample(_teacher())
    sample["topk_ids"][2, :] = [10, 11, 12, 13, 14]
    folded, _ = fold_vocab(collate([sample]), STUDENT_ROWS)
    assert not folded.kd_mask[0, 2] and folded.kd_mask[0, [0, 1, 3]].all()


def test_evaluation_folds_for_a_student_with_fewer_rows():
    """The held-out evaluation of a real (tiny) model with 10 rows on labels of a 12-row teacher:
    no index error, and its KL is the divergence by hand."""
    from orchestrator.driver import tiny
    from orchestrator.kd.evaluate import evaluate

    model = tiny.build_model(tiny.llama_config(STUDENT_ROWS, layers=1, hidden=64, heads=1),
                             seed=0)
    t_logits = _teacher()
    sample = _sample(t_logits) | {"sample_id": "a"}
    sums = evaluate(model, [sample])
    with torch.no_grad():
        s_logits = model(input_ids=torch.as_tensor(sample["input_ids"])[None]).logits[0]
    rows = slice(0, T_LEN - 1)  # the last position has no next token
    want = _by_hand("fkl", t_logits[rows], s_logits[rows], collate([sample]).topk_ids[0, rows],
                    1.0)
    assert sums["positions"] == T_LEN - 1
    assert sums["kl"] == pytest.approx(float(want.sum()), rel=1e-4)
