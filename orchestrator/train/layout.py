"""What fixes a run's data position, so a resume can keep it: the batch layout a checkpoint was
saved under (`batch_layout`) and the refusal to resume under another (`refuse_changed_layout`)."""

from __future__ import annotations

from orchestrator.errors import ConfigError


def batch_layout(*, batch_size: int, grad_accum: int, num_workers: int, seed: int,
                 max_tokens_per_batch: int | None = None, on_policy: float | None = None,
                 shuffle_shards: int = 1) -> dict:
    """What fixes a run's data position: a checkpoint at step s has consumed s · batch_size ·
    grad_accum samples of each worker's stream (packed, `max_tokens_per_batch` given: as many as
    filled s · grad_accum micro-batches of that many token slots, counted in the checkpoint), and
    the streams depend on the number of workers (local mode, 0, streams like 1), the seed and the
    shards shuffled together. A resume must keep all of them. `on_policy` (a run's share λ, 0 for none; None: not checked,
    as for an experiment whose students differ in it) takes that share of each micro-batch out of
    the stream."""
    layout = {"train.batch_size": batch_size, "train.grad_accum": grad_accum,
              "train.num_workers": max(1, num_workers), "train.seed": seed,
              "train.packing": max_tokens_per_batch is not None,
              "train.shuffle_shards": shuffle_shards}
    if max_tokens_per_batch is not None:
        layout["train.max_tokens_per_batch"] = max_tokens_per_batch
    if on_policy is not None:
        layout["train.on_policy"] = on_policy
    return layout


def refuse_changed_layout(old: dict, new: dict, *, what: str) -> None:
    """ConfigError naming each setting whose value differs between `old` and `new`."""
    # recorded before packing / on-policy samples / shuffle windows existed: unpacked, offline,
    # one shard at a time
    old = {"train.packing": False, "train.on_policy": 0.0, "train.shuffle_shards": 1} | old
    changed = [f"{key} {old[key]} → {new[key]}" for key in new
               if key in old and old[key] != new[key]]
    if changed:
        raise ConfigError(
            f"{what} started with another batch layout ({', '.join(changed)}); resuming it would "
            "shift its data position and train on other samples than it should. Resume with the "
            "old values, or start a new experiment (omit --resume)")
