"""Both teacher backends on the same tiny model: each against a dense reference, and each other."""

import numpy as np
import pytest
import torch

from actors.hf_backend import HFBackend
from tests.conftest import agree

K = 8


@pytest.fixture(scope="module")
def hf(tiny_teacher):
    return HFBackend(tiny_teacher, chunk_rows=16, batch_tokens=256)


@pytest.fixture(scope="module")
def seqs(tiny_teacher, texts):
    from orchestrator.teacher_info import load_tokenizer

    tok = load_tokenizer(tiny_teacher)
    return [tok(t)["input_ids"][:100] for t in texts[:6]]


def test_hf_score_matches_dense_forward(hf, seqs):
    out = hf.score(seqs, k=K)
    for seq, sl in zip(seqs, out):
        with torch.no_grad():
            dense = torch.log_softmax(hf.model(torch.tensor([seq])).logits[0].float(), -1)
        vals, ids = dense.topk(K, -1)
        assert sl.topk_ids.shape == (len(seq), K) and sl.label_start == 0
        np.testing.assert_allclose(sl.topk_logprobs, vals.numpy(), atol=1e-4)
        agree = (sl.topk_ids == ids.numpy()).mean()
        assert agree > 0.99
        np.testing.assert_allclose(sl.target_logprobs[:-1],
                                   dense[torch.arange(len(seq) - 1), seq[1:]].numpy(), atol=1e-4)


def test_hf_sample_seeded_and_consistent_with_scoring(hf, seqs):
    kw = dict(k=K, n=3, temperature=0.8, top_p=0.95, max_new_tokens=12, eos_id=None)
    a = hf.sample([seqs[0][:20], seqs[1][:10]], seeds=[1, 2], **kw)
    b = hf.sample([seqs[0][:20], seqs[1][:10]], seeds=[1, 2], **kw)
    c = hf.sample([seqs[0][:20]], seeds=[3], **kw)
    assert all(np.array_equal(x.input_ids, y.input_ids) for x, y in zip(a[0] + a[1], b[0] + b[1]))
    assert not all(np.array_equal(x.input_ids, y.input_ids) for x, y in zip(a[0], c[0]))
    s = a[0][0]
    assert (s.prompt_len, s.label_start, s.topk_ids.shape) == (20, 19, (12, K))
    # top-k recorded while sampling = the raw (T=1) distribution the scorer sees for that sequence
    scored = hf.score([list(s.input_ids)], k=K)[0]
    np.testing.assert_allclose(scored.topk_logprobs[19:31], s.topk_logprobs, atol=1e-4)
    np.testing.assert_allclose(scored.target_logprobs[19:31], s.target_logprobs, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("scoring", ["hidden", "prompt_logprobs"])
def test_vllm_score_agrees_with_hf(tiny_teacher, hf, seqs, scoring):
    from actors.vllm_backend import VLLMBackend

    v = VLLMBackend(tiny_teacher, mode="score", k=K, dtype="float32", scoring=scoring,
                    max_model_len=256, kv_cache_gib=0.25)
    try:
        assert v.vocab_size == hf.vocab_size
        got, ref = v.score(seqs, k=K), hf.score(seqs, k=K)
        for a, b in zip(got, ref):
            agree(a, b, atol=2e-3)
            np.testing.assert_allclose(a.target_logprobs, b.target_logprobs, atol=2e-3)
            # the stored tail: from the full distribution (hidden) or 1 − Σ top-k in float64
            np.testing.assert_allclose(a.tail_mass, b.tail_mass, atol=2e-3)
    finally:
        v.close()


@pytest.mark.slow
def test_vllm_sample_seeded_and_agrees_with_hf_scoring(tiny_teacher, hf, seqs):
    from actors.vllm_backend import VLLMBackend

    v = VLLMBackend(tiny_teacher, mode="sample", k=K, dtype="float32", max_model_len=256,
                    kv_cache_gib=0.25, seed=0)
    try:
        kw = dict(k=K, n=2, temperature=1.0, top_p=1.0, max_new_tokens=10, eos_id=None)
        a = v.sample([seqs[0][:20]], seeds=[5], **kw)[0]
        b = v.sample([seqs[0][:20]], seeds=[5], **kw)[0]
        assert [list(x.input_ids) for x in a] == [list(x.input_ids) for x in b]
        s = a[0]
        assert (s.prompt_len, s.label_start, s.topk_ids.shape) == (20, 19, (10, K))
        scored = hf.score([list(s.input_ids)], k=K)[0]
        ref = type(s)(s.input_ids, 20, 19, scored.topk_ids[19:29], scored.topk_logprobs[19:29],
                      scored.target_logprobs[19:29], scored.tail_mass[19:29])
        agree(s, ref, atol=2e-3)
        np.testing.assert_allclose(s.target_logprobs, ref.target_logprobs, atol=2e-3)
        np.testing.assert_allclose(s.tail_mass, ref.tail_mass, atol=2e-3)
    finally:
        v.close()


def test_hf_scores_a_softcapped_head_as_the_model_does(tmp_path):
    """Gemma 2 caps its logits (cap · tanh(logits / cap)): the hf backend scores through the
    model's own head, so its top-k equals the dense forward's (it refused such teachers before)."""
    from orchestrator.driver import tiny

    cfg = tiny.family_config("gemma2", 256, layers=2)
    cfg.final_logit_softcapping = 2.0  # small enough to change every log-prob visibly
    model = tiny.build_model(cfg, tmp_path, seed=0)
    tiny.sharpen(model, scale=6.0)
    model.save_pretrained(tmp_path)
    seq = torch.randint(4, 256, (50,)).tolist()
    got = HFBackend(str(tmp_path), dtype="float32", chunk_rows=16).score([seq], k=K)[0]
    with torch.no_grad():
        capped = torch.log_softmax(model(torch.tensor([seq])).logits[0], -1)
        raw = torch.log_softmax(model.model(torch.tensor([seq])).last_hidden_state[0]
                                @ model.lm_head.weight.T, -1)
    assert (capped.topk(K, -1).values - raw.topk(K, -1).values).abs().max() > 0.1
    np.testing.assert_allclose(got.topk_logprobs, capped.topk(K, -1).values.numpy(), atol=1e-4)
    np.testing.assert_allclose(got.target_logprobs[:-1],
                               capped[torch.arange(49), seq[1:]].numpy(), atol=1e-4)
