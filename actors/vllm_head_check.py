"""vLLM's own head, run inside vLLM's worker on given hidden states: the reference of the hidden
path's start-up self-check (`VLLMBackend.self_check`).

vLLM's pooling runner (which the hidden path uses) builds the model without its LM head and
logits processor. This worker extension (`LLM(worker_extension_cls=...)`, called by name through
`collective_rpc`, so nothing is pickled) puts them back for one call: it loads the head's weight
(and bias) from the checkpoint into the very `ParallelLMHead` module vLLM's model class declared,
uses the `LogitsProcessor` that class configured (its scale, soft cap), calls the model class's own
`compute_logits` on the hidden states, and returns `log_softmax(logits.float())` top-k — what
vLLM's `prompt_logprobs` computes from the same hidden states. Tied heads use vLLM's loaded
embedding as is. Afterwards the placeholders are restored and the head weight is freed, so the
check costs one head's memory for a moment and no second engine.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch


class HeadReference:
    """Mixed into vLLM's worker class by `worker_extension_cls`."""

    def raydistill_head_logprobs(self, hidden: list, k: int, model_dir: str,
                                 head_dtype: str = "model"):
        """hidden: [n, H] final hidden states as nested float lists (they cross the RPC as plain
        data) → (ids, logprobs) [n, k] nested lists, from vLLM's own `compute_logits` + fp32
        log-softmax (vLLM's sampler does the same)."""
        from vllm.model_executor.models.utils import StageMissingLayer

        model = self.get_model()
        hidden = torch.tensor(hidden, dtype=torch.float32)
        device = next(model.parameters()).device
        dtype = self.vllm_config.model_config.dtype  # the engine's compute dtype
        restore = {}
        for name in ("lm_head", "logits_processor"):
            mod = model._modules.get(name)
            if isinstance(mod, StageMissingLayer):
                restore[name] = mod
                real = mod.__dict__["module"]
                if name == "lm_head":
                    real = _materialise_head(real, Path(model_dir), device=device)
                model._modules[name] = real
        processor = model._modules.get("logits_processor")
        saved_dtype = getattr(processor, "head_dtype", None)
        if processor is not None:  # the generate runner's head dtype (the pooling runner's is fp32)
            processor.head_dtype = (dtype if head_dtype == "model"
                                    else getattr(torch, head_dtype))
        try:
            with torch.inference_mode():
                logits = model.compute_logits(hidden.to(device, dtype))
                if logits is None:  # a tensor-parallel rank other than the one that gathers
                    return None
                lps = torch.log_softmax(logits.float(), dim=-1)
                vals, ids = lps.topk(k, dim=-1)
        finally:
            if processor is not None:
                processor.head_dtype = saved_dtype
            for name, mod in restore.items():
                model._modules[name] = mod
        return ids.cpu().tolist(), vals.cpu().tolist()


def _materialise_head(meta_head, model_dir: Path, *, device):
    """A real copy of vLLM's (meta-device) ParallelLMHead with the checkpoint's weight and bias,
    loaded through the module's own weight loaders and post-load processing."""
    from actors.vllm_backend import load_head_tensors

    weight, bias = load_head_tensors(model_dir)
    head = copy.deepcopy(meta_head).to_empty(device=device)
    # to_empty makes new Parameters, which lose the attributes vLLM's create_weights set on them
    # (`output_dim` 0 for the weight and bias of a vocab-parallel layer): without it the loader
    # cannot shard or pad a vocabulary that is not a multiple of its padding size (a checkpoint
    # table of 552 rows is 576 in vLLM) and asserts equal shapes
    for _, param in head.named_parameters(recurse=False):
        if getattr(param, "output_dim", None) is None:
            param.output_dim = 0
    head.weight_loader(head.weight, weight.to(head.weight.dtype))
    if getattr(head, "bias", None) is not None:
        if bias is None:
            raise KeyError(f"{model_dir}: vLLM's head has a bias but the checkpoint holds none")
        head.weight_loader(head.bias, bias.to(head.bias.dtype))
    head.quant_method.process_weights_after_loading(head)
    return head
