import numpy as np
import torch

from orchestrator.softlabels import topk_from_hidden


def test_chunked_topk_matches_dense_log_softmax():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g)
    weight = torch.randn(300, 16, generator=g) * 2
    targets = torch.randint(0, 300, (37,), generator=g)
    targets[-1] = -1
    dense = torch.log_softmax(hidden @ weight.T, -1)
    ref_vals, ref_ids = dense.topk(10, -1)
    for chunk in (1, 5, 64):
        ids, lps, tlp = topk_from_hidden(hidden, weight, k=10, targets=targets, chunk_rows=chunk)
        assert torch.equal(ids.long(), ref_ids)
        torch.testing.assert_close(lps, ref_vals, atol=1e-5, rtol=0)
        torch.testing.assert_close(tlp[:-1], dense[torch.arange(36), targets[:-1]], atol=1e-5, rtol=0)
        assert np.isnan(tlp[-1].item())
    # k = vocab: the top-k holds the whole distribution
    _, lps, _ = topk_from_hidden(hidden, weight, k=300, chunk_rows=8)
    torch.testing.assert_close(lps.exp().sum(-1), torch.ones(37), atol=1e-4, rtol=0)
