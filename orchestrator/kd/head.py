"""A Hugging Face causal LM split into its final hidden states and its LM head, for
`chunked.chunked_distill_loss` (pure torch; transformers models, no transformers import).

    head = lm_head(model, probe_ids=batch_ids[:1, :16])   # once; HeadNotFused → dense path
    hidden = final_hidden(model, input_ids=ids, attention_mask=mask)         # [B, T, H]
    parts = chunked_distill_loss(hidden.reshape(-1, hidden.shape[-1]), **head.kwargs(), ...)

The head is the model's whole head, in the order its forward applies it (and vLLM's, as
`softlabels.topk_from_hidden`): logits = W·h + b, then softcap · tanh(logits / softcap) (Gemma 2's
`final_logit_softcapping`), then × logit_scale (Cohere's `logit_scale`; Granite's
1 / `logits_scaling`). Tied embeddings need nothing: the output layer's weight *is* the embedding
matrix, and its gradient reaches both uses. Anything else is `HeadNotFused`, the signal to keep the
dense `model(...).logits` + `distill_loss` path: an output layer that is not a linear map, a forward
without `logits_to_keep`, a config key that changes the logits in a way not listed above, or (when
`probe_ids` are given) logits that the split does not reproduce.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch

from orchestrator.kd.softlabels import head_transform

PROBE_RTOL = 1e-3
"""How far the split head's logits may differ from the model's own on the probe, relative to the
largest logit (fp32; low-precision heads get a few of their roundings)."""


class HeadNotFused(NotImplementedError):
    """This model's head cannot be run by `chunked_distill_loss`; the message says why."""


@dataclasses.dataclass(frozen=True)
class LMHead:
    weight: torch.Tensor
    """[V, H] the output layer's weight (the embedding matrix when tied): the parameter itself."""
    bias: torch.Tensor | None
    """[V] or None."""
    logit_scale: float = 1.0
    softcap: float | None = None

    def kwargs(self) -> dict:
        """The head arguments of `chunked_distill_loss`."""
        return {"weight": self.weight, "bias": self.bias, "logit_scale": self.logit_scale,
                "softcap": self.softcap}

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., V] the head applied densely (for checks and the dense fallback)."""
        z = torch.nn.functional.linear(hidden, self.weight, self.bias)
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z * self.logit_scale if self.logit_scale != 1.0 else z


def lm_head(model, *, probe_ids: torch.Tensor | None = None) -> LMHead:
    """The head of `model` (a transformers causal LM, or a wrapper with `.module`, e.g. DDP).

    probe_ids: [b, t] token ids; when given, one no-grad forward checks that `final_hidden` and
    the head reproduce `model(probe_ids).logits` (within PROBE_RTOL), which catches a head this
    function does not know. Raises HeadNotFused when the split cannot be used."""
    inner = getattr(model, "module", model)
    out = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if not isinstance(out, torch.nn.Linear):
        raise HeadNotFused(f"{type(inner).__name__}'s output layer is "
                           f"{type(out).__name__ if out is not None else 'missing'}, not a "
                           "torch.nn.Linear")
    if "logits_to_keep" not in inspect.signature(inner.forward).parameters:
        raise HeadNotFused(f"{type(inner).__name__}.forward has no logits_to_keep argument, so "
                           "its hidden states cannot be had without its logits")
    try:
        args = head_transform(inner.config.to_dict(), fix="the dense loss is used")
    except NotImplementedError as e:
        raise HeadNotFused(str(e)) from None
    head = LMHead(weight=out.weight, bias=out.bias, **args)
    if probe_ids is not None:
        _check(model, head, probe_ids)
    return head



def current_head(model, head: LMHead) -> LMHead:
    """`head` with the weight and bias the model's output layer holds now: read after the
    model's forward, because a sharded model (FSDP) holds the whole parameters only from its
    forward to its backward (`orchestrator.train.sharding`)."""
    inner = getattr(model, "module", model)
    out = inner.get_output_embeddings()
    return dataclasses.replace(head, weight=out.weight, bias=out.bias)


def final_hidden(model, *, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T, H] the final (post-norm) hidden states, the head's input, with no logits computed.
    `position_ids` (no attention_mask): a packed row (`batches.pack`; `Batch.model_inputs` gives
    either pair).

    Through the model's own forward (so a DDP or FSDP wrapper's hooks run): `logits_to_keep` with
    no positions makes the head a [B, 0, H] matmul, and the last of the hidden states it returns is
    the normed state the head reads (checked by `lm_head`'s probe)."""
    none = torch.empty(0, dtype=torch.long, device=input_ids.device)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                output_hidden_states=True, logits_to_keep=none, use_cache=False)
    return out.hidden_states[-1]


def _check(model, head: LMHead, probe_ids: torch.Tensor) -> None:
    """Both ways of computing the logits, in eval mode (no dropout), must agree on the probe."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            want = model(input_ids=probe_ids, use_cache=False).logits.float()
            got = head.logits(final_hidden(model, input_ids=probe_ids)).float()
    finally:
        model.train(training)
    # fp32: 1e-3 of the largest logit; bf16 / fp16: a few roundings (the two matmuls differ in shape)
    rel = max(PROBE_RTOL, 4 * torch.finfo(head.weight.dtype).eps)
    err = (got - want).abs().max().item() if got.shape == want.shape else float("inf")
    if not err <= rel * max(1.0, want.abs().max().item()):
        raise HeadNotFused(f"{type(getattr(model, 'module', model)).__name__}'s logits are not "
                           f"its hidden states through its output layer (max |difference| {err:.3g} "
                           "on the probe): its forward does something this split does not know")
