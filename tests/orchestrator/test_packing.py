"""Packed batches on real tiny students: the same samples give the same KD and CE losses and the
same gradients packed into one row as padded (attention never crosses a sample boundary, also
through sliding windows); a family whose forward ignores packed position ids is refused; bf16
autocast tracks fp32; gradient checkpointing changes no gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from orchestrator.driver import tiny
from orchestrator.kd.batches import check_packing, collate, pack
from orchestrator.kd.losses import distill_loss

VOCAB, K = 300, 8
# gemma3_text slides a 32-token window (tiny.SLIDING_WINDOW): samples longer than it exercise it
LENGTHS = [45, 12, 70, 3, 33]


def _samples(seed: int = 0) -> list[dict]:
    """Samples with real-looking labels: a random teacher's top-k, its tail mass; the second is a
    sample-mode sample (prompt of 6 tokens, labels on the continuation only)."""
    rng = np.random.default_rng(seed)
    out = []
    for i, T in enumerate(LENGTHS):
        logits = rng.normal(size=(T, VOCAB)) * 3
        lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        top = np.argsort(-lp, -1)[:, :K]
        top_lp = np.take_along_axis(lp, top, -1)
        prompt = 6 if i == 1 else 0
        start = max(0, prompt - 1)
        ids = np.full((T, K), -1, dtype=np.int32)
        lps = np.full((T, K), -np.inf, dtype=np.float32)
        ids[start:], lps[start:] = top[start:], top_lp[start:]
        # the tail mass outside the top-k at T = 1 and T = 2, as the capture stores it
        tail = np.stack([1 - np.exp(top_lp / t - np.log(np.exp(lp / t).sum(-1, keepdims=True))
                                    ).sum(-1) for t in (1.0, 2.0)], -1).astype(np.float32)
        out.append({"input_ids": rng.integers(4, VOCAB, T).astype(np.int32), "prompt_len": prompt,
                    "topk_ids": ids, "topk_logprobs": lps, "tail_mass": tail,
                    "tail_temperatures": np.asarray([1.0, 2.0], dtype=np.float32)})
    return out


def _model(family: str, *, seed: int = 0):
    cfg = tiny.family_config(family, VOCAB, layers=2, max_positions=256)
    return tiny.build_model(cfg, seed=seed)


def _loss_and_grads(model, batch, **loss):
    model.zero_grad(set_to_none=True)
    logits = model(**batch.model_inputs(), use_cache=False).logits
    parts = distill_loss(logits.reshape(-1, logits.shape[-1]), **batch.flat(), **loss)
    parts.total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return parts, grads


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text"])
@pytest.mark.parametrize("loss, row_tokens", [
    (dict(kind="fkl", temperature=1.0, alpha=0.5), None),  # one row of 163 tokens
    (dict(kind="jsd", temperature=2.0, alpha=0.7, tail="bucket"), 80)])  # rows (45, 12, 3), 70, 33
def test_packed_and_padded_batches_give_the_same_losses_and_gradients(family, loss, row_tokens):
    model = _model(family)
    check_packing(model)  # the family honours packed position ids
    samples = _samples()
    padded, pg = _loss_and_grads(model, collate(samples), **loss)
    batch = pack(samples, row_tokens=row_tokens)
    assert batch.input_ids.shape == ((1, 163) if row_tokens is None else (3, 70))
    packed, kg = _loss_and_grads(model, batch, **loss)
    for part in ("total", "kd", "ce"):
        assert getattr(packed, part).item() == pytest.approx(getattr(padded, part).item(),
                                                             rel=1e-5, abs=1e-6), part
    assert pg.keys() == kg.keys()
    for name in pg:
        torch.testing.assert_close(kg[name], pg[name], rtol=1e-4, atol=1e-6, msg=name)
    # without the restarting position ids the samples would see each other
    with torch.no_grad():
        crossed = model(input_ids=batch.input_ids, use_cache=False).logits
        kept = model(**batch.model_inputs(), use_cache=False).logits
    assert (crossed - kept).abs().max() > 1e-2


def test_a_family_whose_attention_crosses_packed_samples_is_refused():
    """OPT's forward in transformers does not read packed position ids."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from orchestrator.errors import ConfigError

    cfg = AutoConfig.for_model("opt", hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                               ffn_dim=128, vocab_size=VOCAB, word_embed_proj_dim=64)
    torch.manual_seed(0)
    with pytest.raises(ConfigError, match="train.packing=true: the opt student's attention "
                                          "crosses sample boundaries.*Set train.packing=false"):
        check_packing(AutoModelForCausalLM.from_config(cfg), family="opt")


def _train(model, batches, *, precision: str, steps: int) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(steps):
        batch = batches[step % len(batches)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(**batch.model_inputs(), use_cache=False).logits
            parts = distill_loss(logits.reshape(-1, logits.shape[-1]), **batch.flat())
        parts.total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(parts.total.item())
    return losses


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_bf16_autocast_tracks_fp32_and_keeps_fp32_master_weights(family):
    samples = _samples()
    batches = [pack(samples[:3]), collate(samples[3:])]
    fp32 = _train(_model(family), batches, precision="fp32", steps=6)
    model = _model(family)
    bf16 = _train(model, batches, precision="bf16", steps=6)
    assert fp32[-1] < fp32[0]  # it learns
    np.testing.assert_allclose(bf16, fp32, rtol=2e-2)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # and bf16 really ran: the logits under autocast are bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(**batches[0].model_inputs(), use_cache=False).logits.dtype == torch.bfloat16


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_gradient_checkpointing_gives_the_same_gradients(family):
    batch = pack(_samples())
    plain = _model(family).train()
    _, want = _loss_and_grads(plain, batch)
    ckpt = _model(family).train()
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert ckpt.is_gradient_checkpointing
    _, got = _loss_and_grads(ckpt, batch)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)
