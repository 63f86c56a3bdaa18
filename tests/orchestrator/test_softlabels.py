import numpy as np
import pytest
import torch

from orchestrator.kd.softlabels import head_transform, topk_from_hidden


def test_chunked_topk_matches_dense_log_softmax():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g)
    weight = torch.randn(300, 16, generator=g) * 2
    targets = torch.randint(0, 300, (37,), generator=g)
    targets[-1] = -1
    dense = torch.log_softmax(hidden @ weight.T, -1)
    ref_vals, ref_ids = dense.topk(10, -1)
    for chunk in (1, 5, 64):
        ids, lps, tlp, _ = topk_from_hidden(hidden, weight, k=10, targets=targets, chunk_rows=chunk)
        assert torch.equal(ids.long(), ref_ids)
        torch.testing.assert_close(lps, ref_vals, atol=1e-5, rtol=0)
        torch.testing.assert_close(tlp[:-1], dense[torch.arange(36), targets[:-1]], atol=1e-5, rtol=0)
        assert np.isnan(tlp[-1].item())
    # k = vocab: the top-k holds the whole distribution
    _, lps, _, _ = topk_from_hidden(hidden, weight, k=300, chunk_rows=8)
    torch.testing.assert_close(lps.exp().sum(-1), torch.ones(37), atol=1e-4, rtol=0)


def _dense_tail(logits, ids, T):
    """Σ_tail p^(1/T) / Σ_all p^(1/T) from full fp64 logits: the reference tail mass."""
    p_T = torch.softmax(logits.double() / T, -1)
    return 1.0 - p_T.gather(1, ids.long()).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tail_mass_is_exact_at_every_temperature(dtype):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(40, 16, generator=g)
    weight = torch.randn(500, 16, generator=g) * 3
    out = topk_from_hidden(hidden.to(dtype), weight.to(dtype), k=12, chunk_rows=16,
                           tail_temperatures=(2.0, 0.5))
    logits = (hidden.to(dtype) @ weight.to(dtype).T).float()  # the same head, dense
    assert out.tail_mass.shape == (40, 3) and out.tail_mass.dtype == torch.float32
    # bf16: exponentials in bf16 (as the log-sum-exp takes them), ~0.4% relative
    atol = 1e-6 if dtype == torch.float32 else 3e-3
    for j, T in enumerate((1.0, 2.0, 0.5)):
        torch.testing.assert_close(out.tail_mass[:, j].double(), _dense_tail(logits, out.ids, T),
                                   atol=atol, rtol=0)
    # the tempered tail is not the uniform guess (V − k)·(r/(V − k))^(1/T) renormalised
    assert (out.tail_mass[:, 1] - out.tail_mass[:, 0]).abs().max() > 0.01


def test_tiny_tails_keep_their_size():
    """A peaked row whose tail is far below fp32's resolution of 1 keeps a tail of the right
    order (1 − Σ top-k in fp32 would give 0 or noise)."""
    logits = torch.zeros(2, 1000)
    logits[:, :4] = 30.0                    # tail ≈ 996 · e^−30 / 4 ≈ 2.3e-11
    out = topk_from_hidden(torch.eye(1000)[:2] * 0 + logits, torch.eye(1000), k=4)
    ref = _dense_tail(logits, out.ids, 1.0)
    torch.testing.assert_close(out.tail_mass[:, 0].double(), ref, rtol=1e-3, atol=0)


@pytest.mark.parametrize("kind,kwargs,apply", [
    ("bias", {}, lambda x, b: x + b),
    ("softcap", {"softcap": 5.0}, lambda x, b: torch.tanh(x / 5.0) * 5.0),
    ("scale", {"logit_scale": 0.25}, lambda x, b: x * 0.25),
])
def test_head_bias_softcap_and_scale_are_applied(kind, kwargs, apply):
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(9, 16, generator=g)
    weight = torch.randn(200, 16, generator=g) * 3
    bias = torch.randn(200, generator=g) * 2 if kind == "bias" else None
    out = topk_from_hidden(hidden, weight, k=7, bias=bias, chunk_rows=4, **kwargs)
    dense = torch.log_softmax(apply(hidden @ weight.T, bias), -1)
    vals, ids = dense.topk(7, -1)
    assert torch.equal(out.ids.long(), ids)
    torch.testing.assert_close(out.logprobs, vals, atol=1e-5, rtol=0)


def test_head_transform_reads_configs_and_refuses_unknown_head_keys():
    assert head_transform({"final_logit_softcapping": 30.0}, fix="x") == {
        "logit_scale": 1.0, "softcap": 30.0}
    assert head_transform({"logits_scaling": 8.0}, fix="x")["logit_scale"] == 0.125
    assert head_transform({"logit_scale": 0.0625}, fix="x")["logit_scale"] == 0.0625
    assert head_transform({"text_config": {"final_logit_softcapping": 15.0}},
                          fix="x")["softcap"] == 15.0
    # harmless or neutral keys pass
    head_transform({"attn_logit_softcapping": 50.0, "output_router_logits": False,
                    "lm_head_multiplier": 1.0}, fix="x")
    with pytest.raises(NotImplementedError, match="lm_head_multiplier=0.5.*set teacher.scoring"):
        head_transform({"lm_head_multiplier": 0.5}, fix="set teacher.scoring=prompt_logprobs")
