"""Training batches from decoded shard samples (pure numpy/torch, no Ray).

A sample from `shards.read_shards` holds input_ids [T], topk_ids [T, k], topk_logprobs [T, k],
tail_mass [T, m] (the teacher's tail at each of the capture's tail_temperatures [m]) and
label_start/prompt_len. Two layouts feed the KD loss directly; in both, position t of a sample
predicts its token t + 1:

- `collate` pads a list of samples to the longest: [B, L], attention_mask marks the real tokens.
- `pack` concatenates them into rows of at most `row_tokens` (`train.packing`; `Packer` draws
  a micro-batch's samples from the stream); position ids restart at 0 for each sample, which
  transformers reads as packed sequences (attention_mask None, no cache): a block-diagonal causal
  mask for sdpa / eager, the varlen path for flash attention, sliding windows kept within each
  sample. Attention never crosses a sample boundary, and the last position of a sample has no
  hard target (the next token in the row is another sample's). Rows as long as the capture's
  max_length keep the attention's cost that of the padded layout (a masked row of n tokens costs
  n² on sdpa), with the padding gone but for each row's end.

`check_packing` asks a model once whether it honours packed position ids (a family whose forward
does not would silently attend across samples).

`fold_vocab` then folds the teacher's top-k ids the student has no embedding row for (a smaller
table over the same tokenizer) into the tail.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

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
        is not the sample's. A sample's `loss_mask` [T] (the learned tokens, if it has one) keeps
        only the positions whose next token it marks, for the hard labels and the KD positions
        alike."""
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
        learned = s.get("loss_mask")
        if learned is not None and not learned.all():  # position t learns token t + 1
            nxt = np.append(np.asarray(learned[1:], dtype=bool), False)
            self.targets[row, at:end][~nxt] = -100
            self.kd[row, at:end] &= nxt
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
                   temps=np.array(samples[0]["tail_temperatures"], dtype=np.float32))  # writable


def collate(samples: list[dict], *, pad_id: int = 0, hard_labels_from_prompt: bool = False) -> Batch:
    """Pad samples to the longest: [B, L]."""
    out = _layout(samples, len(samples), max(len(s["input_ids"]) for s in samples), pad_id)
    for b, s in enumerate(samples):
        out.place(s, row=b, at=0, hard_labels_from_prompt=hard_labels_from_prompt)
    return out.batch()


def fold_vocab(batch: Batch, rows: int) -> tuple[Batch, float]:
    """`batch` with every teacher top-k id >= `rows` (the student's embedding rows) folded into
    the tail, and the probability mass (T = 1) folded, summed over the labelled positions.

    Teacher and student share the tokenizer, but the teacher's table may be padded past it
    (152,064 vs 151,936 rows): the student gives those ids probability 0, so their teacher mass
    joins the tail bucket. At T = 1 the stored log-probs are normalised over the whole vocabulary:
    the folded share is exp(lp). At another tail temperature T the partition comes from the
    stored tail r_T: Z_T = Σ_topk exp(lp / T) / (1 − r_T), the share exp(lp / T) / Z_T. A folded
    slot keeps a valid id (0) and log-prob −inf, moved behind the others (the order stays
    descending); the losses give the student −inf there too (`losses.topk_divergence`). A
    position whose whole top-k is folded has no label left (kd_mask False). No copy when nothing
    needs folding."""
    folded = (batch.topk_ids >= rows) & batch.kd_mask.unsqueeze(-1)  # [B, L, k]
    if not bool(folded.any()):
        return batch, 0.0
    lps = batch.topk_logprobs.double()
    temps = batch.tail_temperatures.double()                        # [m]
    tails = batch.tail_mass.double()                                # [B, L, m]
    tempered = torch.exp(lps.unsqueeze(-1) / temps)                 # [B, L, k, m]
    z = tempered.sum(-2) / (1.0 - tails).clamp(min=1e-12)           # [B, L, m]
    share = (tempered * folded.unsqueeze(-1)).sum(-2) / z
    at_one = (lps.exp() * folded).sum(-1)                           # [B, L]
    share = torch.where((temps - 1.0).abs() <= 1e-6, at_one.unsqueeze(-1), share)
    order = torch.sort(folded.to(torch.int8), dim=-1, stable=True).indices  # kept ids first
    ids = torch.where(folded, torch.zeros_like(batch.topk_ids), batch.topk_ids).gather(-1, order)
    top = torch.where(folded, torch.full_like(batch.topk_logprobs, -math.inf),
                      batch.topk_logprobs).gather(-1, order)
    return replace(batch, topk_ids=ids, topk_logprobs=top,
                   tail_mass=(tails + share).clamp(max=1.0).float(),
                   kd_mask=batch.kd_mask & ~folded.all(-1)), float(at_one.sum())



def rows_of(lengths: list[int], *, row_tokens: int) -> list[list[int]]:
    """First-fit: the indices of the samples in each row; each sample, in order, goes to the
    first row with room for it, else starts a new row (short samples fill the ends that long ones
    left)."""
    rows: list[list[int]] = []
    fills: list[int] = []
    for i, T in enumerate(lengths):
        r = _first_fit(fills, T, row_tokens)
        if r == len(rows):
            rows.append([])
            fills.append(0)
        rows[r].append(i)
        fills[r] += T
    return rows


def _first_fit(fills: list[int], T: int, row_tokens: int) -> int:
    """The first row with room for T more tokens; len(fills) when none has."""
    return next((r for r, fill in enumerate(fills) if fill + T <= row_tokens), len(fills))


def pack(samples: list[dict], *, row_tokens: int | None = None,
         hard_labels_from_prompt: bool = False) -> Batch:
    """Concatenate samples into rows of at most `row_tokens` tokens (`rows_of`; None: one row),
    [R, longest row]. Position ids restart at 0 for each sample; a row shorter than the
    longest ends in padding (attention_mask 0, no labels), whose positions continue its last
    sample's — after it, so no real token attends to them."""
    lengths = [len(s["input_ids"]) for s in samples]
    rows = rows_of(lengths, row_tokens=row_tokens or sum(lengths))
    width = max(sum(lengths[i] for i in row) for row in rows)
    if row_tokens is not None and max(lengths) > row_tokens:
        raise ConfigError(f"a sample of {max(lengths)} tokens does not fit a packed row of "
                          f"{row_tokens}; train.max_tokens_per_batch and the row length must be "
                          "at least the capture's data.max_length")
    out = _layout(samples, len(rows), width, 0)
    positions = np.zeros((len(rows), width), dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            out.place(samples[i], row=r, at=at, hard_labels_from_prompt=hard_labels_from_prompt)
            positions[r, at:at + lengths[i]] = np.arange(lengths[i])
            at += lengths[i]
        if at < width:  # the padding continues the last sample's positions
            positions[r, at:] = positions[r, at - 1] + 1 + np.arange(width - at)
    return out.batch(position_ids=positions)


class Packer:
    """Draws packed micro-batches from a sample stream: samples in stream order, first-fit into
    rows of `row_tokens` (`rows_of`), while they fit max_tokens // row_tokens rows — a micro-batch
    never has more token slots than `max_tokens`, like a padded one of max_tokens / row_tokens
    samples. The sample that did not fit is held back and starts the next micro-batch, so a
    micro-batch holds a variable number of samples, and the data position of a checkpoint is the
    samples the stream yielded minus the `held` one (`train.loop`). `row_tokens` None or above
    max_tokens: one row of up to max_tokens."""

    def __init__(self, samples: Iterator[dict], *, max_tokens: int, row_tokens: int | None = None):
        self.samples = samples
        self.row_tokens = min(row_tokens or max_tokens, max_tokens)
        self.max_rows = max_tokens // self.row_tokens
        self._held: dict | None = None

    @property
    def held(self) -> int:
        """Samples drawn from the stream but not yet in a micro-batch (0 or 1)."""
        return 0 if self._held is None else 1

    def take(self) -> list[dict]:
        first = self._held if self._held is not None else next(self.samples)
        self._held = None
        self._fits(first)
        taken, fills = [first], [len(first["input_ids"])]
        for s in self.samples:
            self._fits(s)
            T = len(s["input_ids"])
            r = _first_fit(fills, T, self.row_tokens)
            if r == self.max_rows:
                self._held = s
                return taken
            if r == len(fills):
                fills.append(0)
            fills[r] += T
            taken.append(s)
        return taken  # a finite iterator ended (a training stream never does)

    def _fits(self, s: dict) -> None:
        if len(s["input_ids"]) > self.row_tokens:
            raise ConfigError(f"a sample of {len(s['input_ids'])} tokens does not fit a packed "
                              f"row of {self.row_tokens} tokens; raise train.max_tokens_per_batch "
                              "to at least the capture's data.max_length")


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
