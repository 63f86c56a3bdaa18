"""The training step's loss (kd/step.py) and the held-out evaluation on the fused head, on real
collated batches of several families: the fused path gives the dense path's loss and the same
gradient of every parameter, at T = 1 and T = 2, with the tail bucket; a head it cannot fuse, or
`fused_head: false`, takes the dense path and says why; evaluation through the head, chunk by
chunk, equals evaluation on the full logits (per sequence too)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from orchestrator.driver import tiny
from orchestrator.kd.batches import collate
from orchestrator.kd.evaluate import evaluate
from orchestrator.kd.head import lm_head
from orchestrator.kd.losses import LossSpec
from orchestrator.kd.step import StudentLoss

VOCAB, K = 300, 8


def _model(family: str, seed: int = 0):
    model = tiny.build_model(tiny.family_config(family, VOCAB, layers=2, max_positions=64),
                             seed=seed)
    tiny.sharpen(model, scale=4.0)
    return model


def _samples(n=5, seed=0, *, prompt_len=0):
    """Decoded-shard-like samples of different lengths (padding in every batch), the teacher's
    exact top-k and tails at T = 1 and 2 from a random 'teacher', the last position unlabelled."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        T = int(rng.integers(12, 30))
        logits = torch.from_numpy(rng.normal(size=(T, VOCAB)) * 3)
        lp, ids = torch.log_softmax(logits, -1).topk(K, -1)
        tails = np.stack([1 - torch.softmax(logits / t, -1).gather(1, ids).sum(-1).numpy()
                          for t in (1.0, 2.0)], 1).astype(np.float32)
        ids, lp = ids.numpy().astype(np.int64), lp.numpy().astype(np.float32)
        ids[-1], lp[-1] = -1, 0.0
        out.append({"sample_id": f"s{i}", "input_ids": rng.integers(4, VOCAB, T),
                    "prompt_len": prompt_len, "label_start": 0, "topk_ids": ids,
                    "topk_logprobs": lp, "tail_mass": tails, "tail_temperatures": [1.0, 2.0]})
    return out


def _loss_and_grads(model, spec, batch, *, fused: bool):
    model.zero_grad(set_to_none=True)
    step = StudentLoss(model, spec, fused=fused, probe_ids=batch.input_ids[:1, :16], chunk_rows=7)
    assert (step.head is not None) == fused
    parts = step(model, batch, device="cpu")
    parts.total.backward()
    return parts, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
@pytest.mark.parametrize("temperature,tail", [(1.0, "renormalize"), (2.0, "bucket")])
def test_fused_step_equals_dense_step(family, temperature, tail):
    model = _model(family)
    spec = LossSpec(kind="fkl", temperature=temperature, alpha=0.5, beta=0.5, tail=tail)
    batch = collate(_samples())
    dense, g_dense = _loss_and_grads(model, spec, batch, fused=False)
    fused, g_fused = _loss_and_grads(model, spec, batch, fused=True)
    for a, b in ((dense.total, fused.total), (dense.kd, fused.kd), (dense.ce, fused.ce)):
        assert a.item() == pytest.approx(b.item(), rel=1e-5, abs=1e-6)
    assert g_dense.keys() == g_fused.keys()
    for name, g in g_dense.items():
        scale = g.abs().max().item()
        assert (g - g_fused[name]).abs().max().item() <= 1e-4 * max(scale, 1e-3), name


def test_a_head_it_cannot_fuse_takes_the_dense_path_and_says_why():
    model = _model("llama")
    spec = LossSpec(kind="rkl", temperature=1.0, alpha=0.7, beta=0.5, tail="renormalize")
    model.lm_head = torch.nn.Sequential(model.lm_head)  # not a Linear: its transform is unknown
    step = StudentLoss(model, spec, probe_ids=torch.tensor([[5, 6, 7]]))
    assert step.head is None
    assert step.describe().startswith("loss: dense logits (") and "Sequential" in step.describe()
    parts = step(model, collate(_samples(3)), device="cpu")
    assert torch.isfinite(parts.total)
    off = StudentLoss(_model("llama"), spec, fused=False)
    assert off.head is None and "train.fused_head is false" in off.describe()


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_evaluation_through_the_head_equals_the_full_logits(family):
    model = _model(family, seed=1)
    samples = _samples(7, seed=3, prompt_len=4)
    dense_seq, fused_seq = {}, {}
    dense = evaluate(model, samples, batch_size=3, per_sequence=dense_seq)
    fused = evaluate(model, samples, batch_size=3, per_sequence=fused_seq, head=lm_head(model),
                     chunk_rows=5)
    assert dense["positions"] == fused["positions"] > 50
    for key in dense:
        assert fused[key] == pytest.approx(dense[key], rel=1e-5, abs=1e-5), key
    assert dense_seq.keys() == fused_seq.keys()
    for sid, (n, nll) in dense_seq.items():
        assert fused_seq[sid][0] == n and fused_seq[sid][1] == pytest.approx(nll, rel=1e-5)
