"""How one student is spread over its Ray Train workers (`train.strategy`).

- `ddp`: every worker holds the whole model; gradients are all-reduced (Ray Train's
  `prepare_model`, DistributedDataParallel).
- `fsdp`: PyTorch FSDP2 (`fully_shard`): every decoder layer, and the rest of the model (embeddings,
  final norm, LM head) as the root, is sharded across the workers; a layer's parameters are
  gathered for its forward and again for its backward, gradients are reduce-scattered, and each
  worker keeps only its shard of the weights, gradients and AdamW state. The root is not resharded
  after its forward: the fused LM head + loss (`orchestrator.kd.step`) reads the whole head
  between the model's forward and its backward.

Checkpoints look the same whichever the strategy: a Hugging Face directory of the full weights
(gathered to the first worker) and `train_state.pt` with the full optimizer state, so an fsdp
student exports, evaluates and serves like any other. A checkpoint records its strategy; resuming
under the other one is refused (the optimizer state is laid out differently).
"""

from __future__ import annotations

import torch

STRATEGIES = ("ddp", "fsdp")


def wrap(model, *, strategy: str, world: int):
    """The model to train on `world` workers (the model itself on one)."""
    if world <= 1:
        return model
    if strategy == "ddp":
        import ray.train.torch

        return ray.train.torch.prepare_model(model)
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model, reshard_after_forward=False)
    return model


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's repeated blocks: modules of the classes transformers lists as never to be split
    across devices (`_no_split_modules`: LlamaDecoderLayer, Qwen2DecoderLayer…)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder layer class "
                         "(_no_split_modules); train it with train.strategy=ddp")
    return layers


def sharded(strategy: str, world: int) -> bool:
    return strategy == "fsdp" and world > 1


def full_state(model, optimizer, *, strategy: str, world: int) -> tuple[dict | None, dict | None]:
    """(weights, optimizer state), whole, on the first worker; (None, None) on the others. For
    fsdp every worker must call it (the shards are gathered)."""
    if not sharded(strategy, world):
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    optim = get_optimizer_state_dict(model, optimizer, options=options)
    if torch.distributed.get_rank() != 0:
        return None, None
    return weights, optim


def full_weights(model, *, strategy: str, world: int) -> dict | None:
    """The whole weights (HF names) on the first worker, None on the others; for fsdp every worker
    must call it (the shards are gathered). What on-policy rollouts are refreshed with."""
    if not sharded(strategy, world):
        return model.state_dict() if world == 1 or torch.distributed.get_rank() == 0 else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                   cpu_offload=True))
    return weights if torch.distributed.get_rank() == 0 else None


def load_optimizer(model, optimizer, state: dict, *, strategy: str, world: int) -> None:
    """Restore the optimizer state `full_state` saved (every worker reads the whole of it)."""
    if not sharded(strategy, world):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         set_optimizer_state_dict)

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))
