"""Training batches from decoded shard samples (pure numpy/torch, no Ray).

A sample from `shards.read_shards` holds input_ids [T], topk_ids [T, k], topk_logprobs [T, k],
tail_mass [T, m] (the teacher's tail at each of the capture's tail_temperatures [m]) and
label_start/prompt_len. Two layouts feed the KD loss directly; in both, position t of a sample
predicts its token t + 1:

- `collate` pads a list of samples to the longest: [B, L], attention_mask marks the real tokens.
- `pack` concatenates them without padding into one row [1, ΣT] (`train.packing`); position ids
  restart at 0 for each sample, which transformers reads as packed sequences (attention_mask None,
  no cache): a block-diagonal causal mask for sdpa / eager, the varlen path for flash attention,
  sliding windows kept within each sample. Attention never crosses a sample boundary, and the
  last position of a sample has no hard target (the next token in the row is another sample's).

`check_packing` asks a model once whether it honours packed position ids (a family whose forward
does not would silently attend across samples).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from orchestrator.errors import ConfigError, ShardError


@dataclass
class Batch:
    input_ids: torch.Tensor      # [B, L] int64, padded with pad_id
    attention_mask: torch.Tensor  # [B, L] int64
    targets: torch.Tensor        # [B, L] int64: next token, -100 where none or masked
    topk_ids: torch.Tensor       # [B, L, k] int64, 0 where no label
    topk_logprobs: torch.Tensor  # [B, L, k] float32
    kd_mask: torch.Tensor        # [B, L] bool: positions with teacher labels
    tail_mass: torch.Tensor      # [B, L, m] float32: the teacher's tail at each temperature, 0 where no label
    tail_temperatures: torch.Tensor  # [m] float32: the capture's tail temperatures (1.0 first)
    position_ids: torch.Tensor | None = None  # [1, L] int64 when packed: restarts at each sample

    def flat(self) -> dict[str, torch.Tensor]:
        """The [B·L, ...] views `losses.distill_loss` takes."""
        k = self.topk_ids.shape[-1]
        return {"targets": self.targets.reshape(-1), "topk_ids": self.topk_ids.reshape(-1, k),
                "topk_logprobs": self.topk_logprobs.reshape(-1, k),
                "kd_mask": self.kd_mask.reshape(-1),
                "tail_mass": self.tail_mass.reshape(-1, self.tail_mass.shape[-1]),
                "tail_temperatures": self.tail_temperatures}

    def model_inputs(self, device=None) -> dict[str, torch.Tensor]:
        """The student's forward arguments (to pass with use_cache=False): ids and the padding
        mask, or (packed) ids and the restarting position ids with no mask — what makes
        transformers keep each sample's attention to itself."""
        extra = ({"attention_mask": self.attention_mask} if self.position_ids is None
                 else {"position_ids": self.position_ids})
        out = {"input_ids": self.input_ids, **extra}
        return out if device is None else {k: v.to(device) for k, v in out.items()}


class _Layout:
    """The arrays of a batch being built; `place` writes one sample's labels at a row/offset."""

    def __init__(self, rows: int, length: int, *, k: int, temps: np.ndarray, pad_id: int):
        self.ids = np.full((rows, length), pad_id, dtype=np.int64)
        self.mask = np.zeros((rows, length), dtype=np.int64)
        self.targets = np.full((rows, length), -100, dtype=np.int64)
        self.top_ids = np.zeros((rows, length, k), dtype=np.int64)
        self.top_lps = np.zeros((rows, length, k), dtype=np.float32)
        self.kd = np.zeros((rows, length), dtype=bool)
        self.tails = np.zeros((rows, length, len(temps)), dtype=np.float32)
        self.temps = temps

    def place(self, s: dict, *, row: int, at: int, hard_labels_from_prompt: bool) -> None:
        """Sample `s` at positions at … at + T − 1 of `row`. Hard labels: every next token of the
        sample in score mode; in sample mode only the sampled continuation (prompt positions are
        masked unless hard_labels_from_prompt). Its last position has none: the token after it
        is not the sample's."""
        T = len(s["input_ids"])
        end = at + T
        self.ids[row, at:end] = s["input_ids"]
        self.mask[row, at:end] = 1
        first = 0 if hard_labels_from_prompt else max(0, s["prompt_len"] - 1)
        self.targets[row, at + first:end - 1] = s["input_ids"][first + 1:T]
        labelled = s["topk_ids"][:, 0] >= 0
        self.top_ids[row, at:end][labelled] = s["topk_ids"][labelled]
        self.top_lps[row, at:end][labelled] = s["topk_logprobs"][labelled]
        self.kd[row, at:end] = labelled
        if not np.array_equal(np.asarray(s["tail_temperatures"], dtype=np.float32), self.temps):
            raise ShardError("one batch mixes samples of captures with different "
                             "teacher.tail_temperatures; train on one capture at a time")
        self.tails[row, at:end][labelled] = s["tail_mass"][labelled]

    def batch(self, position_ids: np.ndarray | None = None) -> Batch:
        arrays = (self.ids, self.mask, self.targets, self.top_ids, self.top_lps, self.kd,
                  self.tails, self.temps)
        pos = None if position_ids is None else torch.from_numpy(position_ids)
        return Batch(*(torch.from_numpy(x) for x in arrays), position_ids=pos)


def _layout(samples: list[dict], rows: int, length: int, pad_id: int) -> _Layout:
    return _Layout(rows, length, k=samples[0]["topk_ids"].shape[1], pad_id=pad_id,
                   temps=np.asarray(samples[0]["tail_temperatures"], dtype=np.float32))


def collate(samples: list[dict], *, pad_id: int = 0, hard_labels_from_prompt: bool = False) -> Batch:
    """Pad samples to the longest: [B, L]."""
    out = _layout(samples, len(samples), max(len(s["input_ids"]) for s in samples), pad_id)
    for b, s in enumerate(samples):
        out.place(s, row=b, at=0, hard_labels_from_prompt=hard_labels_from_prompt)
    return out.batch()


def pack(samples: list[dict], *, max_tokens: int | None = None,
         hard_labels_from_prompt: bool = False) -> Batch:
    """Concatenate samples into one row [1, ΣT] with no padding; position ids restart at 0 for
    each sample. `max_tokens`: refuse a row longer than this (train.max_tokens_per_batch)."""
    lengths = [len(s["input_ids"]) for s in samples]
    total = sum(lengths)
    if max_tokens is not None and total > max_tokens:
        raise ConfigError(f"{len(samples)} samples of {total} tokens do not fit "
                          f"train.max_tokens_per_batch={max_tokens}; raise it to at least the "
                          "capture's longest sample (data.max_length)")
    out = _layout(samples, 1, total, 0)
    at = 0
    for s, T in zip(samples, lengths):
        out.place(s, row=0, at=at, hard_labels_from_prompt=hard_labels_from_prompt)
        at += T
    positions = np.concatenate([np.arange(T, dtype=np.int64) for T in lengths])[None]
    return out.batch(position_ids=positions)


class Packer:
    """Draws packed micro-batches from a sample stream: samples in stream order until the next
    would take the row past `max_tokens`; that one is held back and starts the next row. So a
    micro-batch holds a variable number of samples, and the data position of a checkpoint is the
    samples the stream yielded minus the `held` one (`train.loop`)."""

    def __init__(self, samples: Iterator[dict], *, max_tokens: int):
        self.samples, self.max_tokens = samples, max_tokens
        self._held: dict | None = None

    @property
    def held(self) -> int:
        """Samples drawn from the stream but not yet in a micro-batch (0 or 1)."""
        return 0 if self._held is None else 1

    def take(self) -> list[dict]:
        first = self._held if self._held is not None else next(self.samples)
        self._held = None
        rows, tokens = [first], len(first["input_ids"])
        if tokens > self.max_tokens:
            raise ConfigError(f"a sample of {tokens} tokens does not fit "
                              f"train.max_tokens_per_batch={self.max_tokens}; raise it to at "
                              "least the capture's data.max_length")
        while True:
            s = next(self.samples)
            if tokens + len(s["input_ids"]) > self.max_tokens:
                self._held = s
                return rows
            rows.append(s)
            tokens += len(s["input_ids"])


def unpacked_slots(lengths: list[int], *, batch_size: int) -> int:
    """Token slots these samples take padded, in consecutive groups of `batch_size` each padded
    to its longest (what `collate` builds): 1 − Σlengths / this is the padding share, the one
    an unpacked run wastes and a packed run removes."""
    return sum(len(group) * max(group)
               for group in (lengths[i:i + batch_size] for i in range(0, len(lengths), batch_size)))


def check_packing(model, *, family: str = "") -> None:
    """Refuse a model whose forward lets packed samples see each other: one no-grad forward of
    two short samples packed must give each sample's own logits (fp32 tolerance)."""
    inner = getattr(model, "module", model)
    vocab = inner.get_input_embeddings().weight.shape[0]
    device = inner.get_input_embeddings().weight.device
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, vocab, (n,), generator=g).to(device) for n in (5, 3))
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = torch.cat([model(input_ids=x[None], use_cache=False).logits[0] for x in (a, b)])
            positions = torch.cat([torch.arange(5), torch.arange(3)])[None].to(device)
            packed = model(input_ids=torch.cat([a, b])[None], position_ids=positions,
                           use_cache=False).logits[0]
    finally:
        model.train(training)
    err = (packed.float() - alone.float()).abs().max().item()
    if not err <= 1e-3 * max(1.0, alone.abs().max().item()):
        name = family or type(inner).__name__
        raise ConfigError(f"train.packing=true: the {name} student's attention crosses sample "
                          f"boundaries in a packed row (max |difference| {err:.3g} from its "
                          "samples alone): its transformers forward does not read packed position "
                          "ids. Set train.packing=false")
