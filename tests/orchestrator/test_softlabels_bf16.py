import torch

from orchestrator.kd.softlabels import topk_from_hidden


def test_bf16_head_close_to_fp32_reference():
    """bf16 logits: log-sum-exp from bf16 exponentials summed in fp32 stays within 5e-3 nat of the
    fp32 log-softmax of the same bf16 logits."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(64, 32, generator=g).bfloat16()
    weight = (torch.randn(4000, 32, generator=g) * 0.8).bfloat16()
    targets = torch.randint(0, 4000, (64,), generator=g)
    ids, lps, tlp, _ = topk_from_hidden(hidden, weight, k=16, targets=targets, chunk_rows=16)
    dense = torch.log_softmax((hidden @ weight.T).float(), -1)
    ref_vals, _ = dense.topk(16, -1)
    assert (lps - ref_vals).abs().max() < 5e-3
    assert (torch.gather(dense, 1, ids.long()) - lps).abs().max() < 5e-3
    assert (tlp - dense[torch.arange(64), targets]).abs().max() < 5e-3
