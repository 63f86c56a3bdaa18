import numpy as np
import pytest
import torch

from orchestrator.kd.batches import collate
from orchestrator.kd.losses import distill_loss


def sample(T, k, prompt_len=0, start=0, n=None):
    n = T - start if n is None else n
    ids = np.arange(10, 10 + T, dtype=np.int32)
    top = np.full((T, k), -1, dtype=np.int32)
    lps = np.full((T, k), -np.inf, dtype=np.float32)
    top[start:start + n] = np.arange(k)
    lps[start:start + n] = np.log(np.full(k, 0.9 / k))
    tail = np.full((T, 2), np.nan, dtype=np.float32)
    tail[start:start + n] = [0.1, 0.3]
    return {"input_ids": ids, "prompt_len": prompt_len, "label_start": start, "topk_ids": top,
            "topk_logprobs": lps, "tail_mass": tail,
            "tail_temperatures": np.asarray([1.0, 2.0], dtype=np.float32)}


def test_collate_pads_masks_and_aligns_targets():
    b = collate([sample(5, 3), sample(7, 3, prompt_len=3, start=2, n=4)], pad_id=99)
    assert b.input_ids.shape == (2, 7) and b.topk_ids.shape == (2, 7, 3)
    assert b.input_ids[0, 5:].tolist() == [99, 99] and b.attention_mask[0].tolist() == [1] * 5 + [0] * 2
    assert b.targets[0].tolist() == [11, 12, 13, 14, -100, -100, -100]
    # sample mode: hard labels are the sampled tokens only (positions 2..5 predict tokens 3..6)
    assert b.targets[1].tolist() == [-100, -100, 13, 14, 15, 16, -100]
    assert b.kd_mask[1].tolist() == [False, False, True, True, True, True, False]
    assert b.kd_mask[0].tolist() == [True] * 5 + [False] * 2
    # the stored tail masses travel with the labels: [B, L, m], 0 where there is no label
    assert b.tail_mass.shape == (2, 7, 2) and b.tail_temperatures.tolist() == [1.0, 2.0]
    assert b.tail_mass[1, 2].tolist() == pytest.approx([0.1, 0.3]) and b.tail_mass[1, 1].sum() == 0


def test_batch_feeds_the_loss():
    b = collate([sample(5, 3), sample(7, 3, prompt_len=3, start=2, n=4)])
    logits = torch.randn(2 * 7, 20, requires_grad=True)
    parts = distill_loss(logits, **b.flat(), kind="fkl", temperature=2.0, alpha=0.5, tail="bucket")
    parts.total.backward()
    assert torch.isfinite(parts.total) and torch.isfinite(logits.grad).all()
    # rows without labels get no gradient from either term
    pad_rows = (~b.kd_mask.reshape(-1)) & (b.targets.reshape(-1) < 0)
    assert logits.grad[pad_rows].abs().sum() == 0


def test_pack_concatenates_without_padding_and_restarts_positions():
    from orchestrator.kd.batches import pack

    a, b = sample(5, 3), sample(7, 3, prompt_len=3, start=2, n=4)
    p, c = pack([a, b]), collate([a, b], pad_id=99)
    assert p.input_ids.shape == (1, 12) and p.attention_mask.tolist() == [[1] * 12]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]]
    # each sample's labels are where they are unpacked; the last position of the first sample has
    # no hard target: the next token in the row (10) is the second sample's first
    for field in ("input_ids", "targets", "topk_ids", "topk_logprobs", "kd_mask", "tail_mass"):
        packed, padded = getattr(p, field)[0], getattr(c, field)
        assert torch.equal(packed[:5], padded[0, :5]) and torch.equal(packed[5:], padded[1]), field
    assert p.targets[0, 4] == -100 and p.input_ids[0, 5] == 10
    assert set(p.model_inputs()) == {"input_ids", "position_ids"}
    assert set(c.model_inputs()) == {"input_ids", "attention_mask"}


def test_packer_fills_each_row_to_the_token_budget_and_holds_back_the_next_sample():
    from orchestrator.errors import ConfigError
    from orchestrator.kd.batches import Packer, unpacked_slots

    lengths = [5, 4, 3, 9, 2, 2, 6]
    packer = Packer(iter([sample(n, 2) for n in lengths]), max_tokens=10)
    rows = [[len(s["input_ids"]) for s in packer.take()] for _ in range(3)]
    assert rows == [[5, 4], [3], [9]] and packer.held == 1  # the 2 drawn, not yet batched
    with pytest.raises(ConfigError, match="a sample of 5 tokens does not fit a packed row of 4"):
        Packer(iter([sample(5, 2)] * 2), max_tokens=4).take()
    # rows of 10 tokens, 20 slots: two rows, first-fit (the 4 fills the second row's end)
    packer = Packer(iter([sample(n, 2) for n in [6, 6, 3, 4, 9, 1]]), max_tokens=20,
                    row_tokens=10)
    assert [len(s["input_ids"]) for s in packer.take()] == [6, 6, 3, 4]  # 9 needs a 3rd row
    assert [len(s["input_ids"]) for s in packer.take()] == [9, 1]
    # padded in groups of 2: (5, 4) → 10 slots, (3, 9) → 18, (2,) → 2
    assert unpacked_slots([5, 4, 3, 9, 2], batch_size=2) == 30


def test_pack_into_rows_pads_only_each_row_s_end():
    from orchestrator.kd.batches import pack

    b = pack([sample(n, 2) for n in (6, 6, 3, 4)], row_tokens=10)  # first-fit: (6, 3), (6, 4)
    assert b.input_ids.shape == (2, 10)
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]]
    assert b.attention_mask[0].tolist() == [1] * 9 + [0]  # the padding: no labels, not counted
    assert b.targets[0, 8:].tolist() == [-100, -100] and not b.kd_mask[0, 9]
    assert b.input_ids[0, 6:9].tolist() == [10, 11, 12]  # the 3-token sample, after the first
