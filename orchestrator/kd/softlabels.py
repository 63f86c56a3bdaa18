"""Top-k soft labels from hidden states or logits, one bounded chunk at a time (pure torch).

The teacher's distribution over the vocabulary at each position is reduced to its k most likely
token ids and their log-probabilities, normalised over the *whole* vocabulary (log-softmax), plus
the log-probability of the token that actually follows. Never more than `chunk_rows × vocab` logits
exist at once, so peak memory depends on the chunk size, not on the text length.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np
import torch


class TopK(NamedTuple):
    """Top-k labels of N positions (on the CPU)."""

    ids: torch.Tensor
    """[N, k] int32, rank order (most likely first)."""
    logprobs: torch.Tensor
    """[N, k] float32, descending, normalised over the whole vocabulary."""
    target_logprobs: torch.Tensor
    """[N] float32, the log-prob of the next token (NaN where it is unknown)."""
    tail_mass: torch.Tensor
    """[N, 1 + len(tail_temperatures)] float32: column 0 is r_1, the probability mass outside the
    top-k; column j the tempered tail Σ_tail p^(1/T) / Σ_all p^(1/T) at tail_temperatures[j-1]."""


def topk_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    k: int,
    targets: torch.Tensor | None = None,
    chunk_rows: int = 512,
    bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    tail_temperatures: tuple[float, ...] = (),
) -> TopK:
    """Apply the LM head chunk by chunk and keep the top-k of each row.

    hidden: [N, H] final (post-norm) hidden states; weight: [V, H] LM head; targets: [N] next-token
    ids or -1 where unknown. The head is the model's whole head, in vLLM's order: logits =
    W·h + bias, then softcap·tanh(logits / softcap) (Gemma 2's final_logit_softcapping), then
    × logit_scale (Cohere's logit_scale; Granite's 1 / logits_scaling). See `TopK` for the outputs.
    """
    n, dev = hidden.shape[0], weight.device
    # results stay on the device until one host copy at the end (no sync per chunk)
    ids = torch.empty((n, k), dtype=torch.int32, device=dev)
    lps = torch.empty((n, k), dtype=torch.float32, device=dev)
    tlp = torch.full((n,), float("nan"), dtype=torch.float32, device=dev)
    tail = torch.empty((n, 1 + len(tail_temperatures)), dtype=torch.float32, device=dev)
    hidden = hidden.to(weight.dtype)
    bias = None if bias is None else bias.to(weight.dtype)
    for start in range(0, n, chunk_rows):
        end = min(n, start + chunk_rows)
        # F.linear, as vLLM's head calls it: the bias joins before the one rounding to the dtype
        logits = torch.nn.functional.linear(hidden[start:end], weight, bias)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        if logit_scale != 1.0:
            logits = logits * logit_scale
        t = None if targets is None else targets[start:end].to(logits.device)
        ids[start:end], lps[start:end], tlp[start:end], tail[start:end] = _topk_rows(
            logits, k=k, targets=t, tail_temperatures=tail_temperatures)
    return TopK(ids.cpu(), lps.cpu(), tlp.cpu(), tail.cpu())


def topk_from_logits(
    logits: torch.Tensor, *, k: int, targets: torch.Tensor | None = None,
    tail_temperatures: tuple[float, ...] = (),
) -> TopK:
    """Top-k log-probs of one chunk of logits [N, V]; see `TopK` for the outputs."""
    return TopK(*(x.cpu() for x in _topk_rows(logits, k=k, targets=targets,
                                               tail_temperatures=tail_temperatures)))


def _topk_rows(logits: torch.Tensor, *, k: int, targets: torch.Tensor | None,
               tail_temperatures: tuple[float, ...] = ()):
    # log-softmax is never materialised: top-k on the raw logits (same order), then subtract the
    # row's log-sum-exp. For bf16/fp16 logits the exponentials are taken in that dtype, shifted by
    # the row max (the top-1 value), and summed in fp32: ~1e-3 nat from an fp32 log-sum-exp and
    # twice as fast on a CPU as upcasting the whole [rows × vocab] chunk.
    vals, idx = torch.topk(logits, k, dim=-1, sorted=True)
    top = vals[:, :1]
    total, tail = _split_sum(logits, top, idx, 1.0)
    lse = top.float() + torch.log(total).float().unsqueeze(1)
    lps = vals.float() - lse
    tails = [tail]
    for T in tail_temperatures:  # one more pass over the chunk per extra temperature
        tails.append(_split_sum(logits, top, idx, T)[1])
    tlp = torch.full((logits.shape[0],), float("nan"), dtype=torch.float32, device=logits.device)
    if targets is not None:
        picked = logits.gather(1, targets.clamp(min=0).long().unsqueeze(1)).squeeze(1)
        tlp = torch.where(targets >= 0, picked.float() - lse.squeeze(1), tlp)
    return idx.to(torch.int32), lps, tlp, torch.stack(tails, 1).float()


def _split_sum(logits: torch.Tensor, top: torch.Tensor, idx: torch.Tensor, T: float):
    """Σ_all exp((l − top) / T) [rows] float64 and the tail's share of it, r_T [rows] float64.

    One pass over the chunk: the exponentials (in the logits' dtype, see `_topk_rows`) have their
    top-k entries read and then zeroed (O(k) per row), so the single reduction sums the tail
    alone. Tail and top-k sums are added in float64, so a tail far below fp32's resolution of 1
    keeps its size (relative error ~1e-7) instead of vanishing into 1 − Σ top-k."""
    e = torch.exp(logits - top if T == 1.0 else (logits - top) / T)
    top_sum = e.gather(-1, idx).double().sum(-1)
    e.scatter_(-1, idx, 0.0)
    # fp32 accumulation inside the reduction is fastest on CUDA; on CPUs upcasting first is
    # (measured: H200 2.0 vs 3.8 ms per 4096 × 128k rows; EPYC 35 vs 41 ms per 512 × 32k)
    if e.dtype == torch.float32:
        tail_sum = e.sum(-1)
    elif e.is_cuda:
        tail_sum = e.sum(-1, dtype=torch.float32)
    else:
        tail_sum = e.float().sum(-1)
    total = top_sum + tail_sum.double()
    return total, tail_sum.double() / total


@dataclasses.dataclass
class SoftLabels:
    """One sequence's teacher labels, as a backend returns them (numpy, on the CPU).

    Row j of the top-k arrays is the teacher's distribution over the token at position
    `label_start + j + 1`, given the tokens up to position `label_start + j`.
    input_ids: [T]; topk_ids: [n, k] int32 (rank order); topk_logprobs: [n, k] float32 (descending);
    target_logprobs: [n] float32, the log-prob of the token that actually follows (NaN past the end);
    tail_mass: [n, len(tail_temperatures)] float32, the teacher's exact tail mass (outside the top-k)
    at each temperature of `tail_temperatures` (always 1.0 first), computed before quantisation.
    In score mode label_start = 0 and n = T; in sample mode label_start = prompt_len - 1 and n is the
    number of sampled tokens. loss_mask: [T] bool, the tokens that are learned (a completion's or
    the assistant's), None for every token.
    """

    input_ids: np.ndarray
    prompt_len: int
    label_start: int
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    target_logprobs: np.ndarray
    tail_mass: np.ndarray
    tail_temperatures: tuple[float, ...] = (1.0,)
    loss_mask: np.ndarray | None = None


def flat_logprobs_to_arrays(flat, positions: range, *, k: int, has_target: bool = True):
    """Turn vLLM `FlatLogprobs` (flat python lists) into top-k arrays for the given positions.

    At each position vLLM lists the chosen (sampled or actual) token first, then the top-k in rank
    order, so the top-k are entries 1..k and the target log-prob is entry 0. Returns ids [n, k],
    logprobs [n, k], target_logprobs [n] and tail_mass [n, 1] (r_1 = 1 − Σ top-k probabilities,
    from vLLM's fp32 log-probs summed in float64: as exact as those log-probs, ~1e-7 per entry)
    like `topk_from_hidden`.
    """
    n = len(positions)
    tok = np.asarray(flat.token_ids, dtype=np.int32)
    lp = np.asarray(flat.logprobs, dtype=np.float64)
    starts = np.asarray([flat.start_indices[p] for p in positions], dtype=np.int64)
    ends = np.asarray([flat.end_indices[p] for p in positions], dtype=np.int64)
    if n and not np.all(ends - starts == k + 1):
        raise ValueError(f"vLLM returned an unexpected number of log-probs per position "
                         f"(expected the chosen token plus {k})")
    cols = starts[:, None] + 1 + np.arange(k)[None, :]
    tlp = lp[starts] if has_target else np.full((n,), np.nan)
    tail = np.clip(1.0 - np.exp(lp[cols]).sum(-1, keepdims=True), 0.0, None)
    return (tok[cols], lp[cols].astype(np.float32), tlp.astype(np.float32),
            tail.astype(np.float32))


HEAD_KEYS_APPLIED = ("final_logit_softcapping", "logits_scaling", "logit_scale")
"""Config keys of the LM head that `head_transform` turns into `topk_from_hidden` arguments."""
_HEAD_KEYS_HARMLESS = ("attn_logit_softcapping", "output_router_logits", "router_logit_softcapping",
                       "tie_word_embeddings")
_HEAD_KEY_WORDS = ("logit", "lm_head", "output_mult", "scale_width", "dim_model_base")


def head_transform(config: dict, *, fix: str) -> dict:
    """`topk_from_hidden`'s head arguments (logit_scale, softcap) from a model's config.json dict:
    Gemma 2/3's final_logit_softcapping, Granite's logits_scaling (logits divided by it),
    Cohere's logit_scale (multiplied). Any other config key that looks like it changes the logits
    (a name with "logit", "lm_head", "output_mult", … and a non-neutral value) is refused with
    `fix`, the setting that scores with the model's own head instead."""
    flat = dict(config)
    flat.update(config.get("text_config") or {})
    unknown = sorted(key for key, value in flat.items()
                     if any(w in key for w in _HEAD_KEY_WORDS)
                     and key not in HEAD_KEYS_APPLIED and key not in _HEAD_KEYS_HARMLESS
                     and value not in (None, False, 0, 1, 1.0, ""))
    if unknown:
        raise NotImplementedError(
            f"this teacher's config has head settings the fast scoring path does not apply "
            f"({', '.join(f'{k}={flat[k]!r}' for k in unknown)}); {fix}")
    scale = 1.0
    if flat.get("logits_scaling") not in (None, 0):
        scale /= float(flat["logits_scaling"])
    if flat.get("logit_scale") not in (None, 0):
        scale *= float(flat["logit_scale"])
    cap = flat.get("final_logit_softcapping")
    return {"logit_scale": scale, "softcap": float(cap) if cap else None}
