"""kd/head.py on every family of the matrix (tiny random models built here): the chunked loss on
`final_hidden` through `lm_head` equals `distill_loss` on `model(x).logits`, in value and in the
gradient of every parameter (Gemma's soft cap and tied embeddings included); heads the split does
not know are refused with HeadNotFused, the signal to use the dense path."""

from __future__ import annotations

import re

import pytest
import torch

from orchestrator.driver import tiny
from orchestrator.kd.chunked import chunked_distill_loss
from orchestrator.kd.head import HeadNotFused, final_hidden, lm_head
from orchestrator.kd.losses import distill_loss

VOCAB, B, T, K = 320, 2, 40, 8


def _model(family: str):
    cfg = tiny.family_config(family, VOCAB, layers=2, max_positions=64)
    model = tiny.build_model(cfg, seed=0)
    tiny.sharpen(model, scale=4.0)
    return model


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, -7:] = 0  # a padded row
    targets = torch.cat([ids[:, 1:], torch.full((B, 1), -100)], 1)
    targets[mask == 0] = -100
    lp, top = torch.log_softmax(torch.randn(B * T, VOCAB, generator=g) * 3, -1).topk(K, -1)
    return ids, mask, dict(topk_ids=top, topk_logprobs=lp, targets=targets.reshape(-1),
                           kd_mask=(targets >= 0).reshape(-1))


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_chunked_loss_through_the_split_head_equals_the_dense_loss(family):
    model = _model(family)
    ids, mask, labels = _batch()
    head = lm_head(model, probe_ids=ids[:1, :12])
    assert (head.softcap is not None) == (family == "gemma2")
    if model.config.tie_word_embeddings:
        assert head.weight is model.get_input_embeddings().weight
    kw = dict(kind="fkl", temperature=2.0, alpha=0.5, **labels)

    logits = model(input_ids=ids, attention_mask=mask).logits
    ref = distill_loss(logits.reshape(-1, VOCAB), **kw)
    ref.total.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    hidden = final_hidden(model, input_ids=ids, attention_mask=mask)
    got = chunked_distill_loss(hidden.reshape(-1, hidden.shape[-1]), **head.kwargs(),
                               chunk_rows=24, **kw)
    got.total.backward()
    for name in ("total", "kd", "ce"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():
        scale = ref_grads[n].abs().max().clamp(min=1e-6)
        torch.testing.assert_close(p.grad / scale, ref_grads[n] / scale, atol=1e-5, rtol=1e-4,
                                   msg=n)


def test_a_head_that_is_not_a_linear_map_is_refused():
    model = _model("llama")
    model.set_output_embeddings(torch.nn.Sequential(model.get_output_embeddings()))
    with pytest.raises(HeadNotFused, match="Sequential, not a torch.nn.Linear"):
        lm_head(model)


def test_an_unknown_head_setting_in_the_config_is_refused():
    model = _model("qwen2")
    model.config.logit_multiplier = 3.0
    with pytest.raises(HeadNotFused, match="logit_multiplier=3.0"):
        lm_head(model)


def test_the_probe_catches_logits_changed_outside_the_output_layer():
    """A forward that changes the logits in a way the config does not say (a forward hook that
    rescales them, as adapters do) is caught by the probe, not trusted."""
    model = _model("mistral")
    ids, _, _ = _batch()
    lm_head(model, probe_ids=ids[:1, :12])  # fine before
    model.get_output_embeddings().register_forward_hook(lambda mod, args, out: out * 2.0)
    with pytest.raises(HeadNotFused, match=re.escape("max |difference|")):
        lm_head(model, probe_ids=ids[:1, :12])
    assert model.training is True  # the probe ran in eval mode and restored the mode
