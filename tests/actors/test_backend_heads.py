"""The teacher's head is the model's head: tiny random Phi (LM-head bias), Gemma 2 (final logit
soft cap) and Granite (logits_scaling) teachers, built here with transformers (head_dim 64, their
own tokenizer). The hf backend's labels equal a dense reference from transformers' own logits; the
vLLM hidden path's labels equal both; its start-up self-check passes, and refuses a head with the
bias, soft cap or scaling left out."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.hf_backend import HFBackend

K = 8


def build_teacher(family: str, out: str) -> str:
    import transformers as tf

    from orchestrator.driver import tiny

    texts = list(tiny.chunks_of_text(tiny.stdlib_sources()[:20]))
    tok = tiny.train_tokenizer(texts, out, vocab_size=512)
    common = dict(vocab_size=len(tok), hidden_size=128, num_attention_heads=2,
                  num_hidden_layers=2, intermediate_size=256, max_position_embeddings=256)
    if family == "phi":          # lm_head has a bias
        cfg = tf.PhiConfig(**common, num_key_value_heads=2)
    elif family == "gemma2":     # tanh soft cap of the logits (and of attention, as Gemma 2 has)
        cfg = tf.Gemma2Config(**common, num_key_value_heads=1, head_dim=64,
                              final_logit_softcapping=10.0, attn_logit_softcapping=50.0,
                              sliding_window=64)
    else:                        # logits divided by logits_scaling
        cfg = tf.GraniteConfig(**common, num_key_value_heads=2, logits_scaling=4.0,
                               tie_word_embeddings=False)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # a peaked head (few ties), a bias that matters
        head = model.get_output_embeddings()
        head.weight.mul_(8.0)
        if getattr(head, "bias", None) is not None:
            head.bias.copy_(torch.randn_like(head.bias) * 2)
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module", params=["phi", "gemma2", "granite"])
def family(request, tmp_path_factory):
    path = build_teacher(request.param, str(tmp_path_factory.mktemp(request.param)))
    seqs = [list(range(3 + i, 3 + i + 40)) for i in range(3)]
    return request.param, path, seqs


def dense_reference(path, seqs):
    """Top-K of transformers' own log-softmax(logits) (its forward applies the whole head)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    out = []
    for seq in seqs:
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), -1)
        vals, ids = lp.topk(K, -1)
        out.append((ids.numpy(), vals.numpy(), 1 - vals.double().exp().sum(-1).numpy()))
    return out


def test_hf_backend_applies_the_whole_head(family):
    name, path, seqs = family
    hf = HFBackend(path, chunk_rows=16)
    for sl, (ids, vals, tail) in zip(hf.score(seqs, k=K), dense_reference(path, seqs)):
        np.testing.assert_allclose(sl.topk_logprobs, vals, atol=1e-4)
        assert (sl.topk_ids == ids).mean() > 0.99
        np.testing.assert_allclose(sl.tail_mass[:, 0], tail, atol=1e-4)


@pytest.mark.slow
def test_vllm_hidden_path_is_the_model_head_and_self_checks(family):
    from actors.vllm_backend import SELF_CHECK_TOLERANCE, HeadCheckError, VLLMBackend

    name, path, seqs = family
    v = VLLMBackend(path, mode="score", k=K, dtype="float32", max_model_len=256,
                    kv_cache_gib=0.25)  # the self-check ran in there
    try:
        check = v.self_check()
        assert check["max_nats"] <= SELF_CHECK_TOLERANCE
        hf = HFBackend(path, chunk_rows=16).score(seqs, k=K)
        for a, b, (ids, vals, tail) in zip(v.score(seqs, k=K), hf, dense_reference(path, seqs)):
            np.testing.assert_allclose(a.topk_logprobs, vals, atol=2e-3)
            np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=2e-3)
            assert (a.topk_ids == ids).mean() > 0.95
            np.testing.assert_allclose(a.tail_mass[:, 0], tail, atol=2e-3)
        # the same head with its family's extra left out is refused, naming both numbers + fix
        if name == "phi":
            v.bias = None
        else:
            v.head_args = {"logit_scale": 1.0, "softcap": None}
        with pytest.raises(HeadCheckError, match=r"max \d+\.\d+ nat, mean .*"
                                                 r"teacher.scoring=prompt_logprobs"):
            v.self_check()
    finally:
        v.close()
