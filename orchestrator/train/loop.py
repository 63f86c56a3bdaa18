"""The Ray Train worker loop: one student, data-parallel over `train.num_workers` workers.

Each worker streams its samples from the shards (`train.stream.SampleStream`, read by Ray Data),
builds micro-batches of `batch_size` padded samples or, packed, of as many samples as fit
`max_tokens_per_batch` token slots (`kd.batches`), runs the forward and loss in fp32 or under
bf16 autocast (fp32 weights and optimizer state), optionally with gradient checkpointing,
runs `grad_accum` micro-batches per optimizer step (DDP syncs only on the last), clips gradients,
steps AdamW under a warm-up + cosine schedule, and every `eval_every` steps evaluates on its slice
of the held-out capture (sums all-reduced), saves a checkpoint — a Hugging Face directory that
transformers and vLLM load, plus `train_state.pt` (optimizer, schedule, step, data position) — and
reports. On a restart (FailureConfig, or the same run name after a driver crash) it resumes from the
last checkpoint: same weights, optimizer, schedule, and the exact data position (the samples each
worker consumed).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
import warnings
from contextlib import nullcontext

import torch

from orchestrator.errors import ConfigError, DivergedError
from orchestrator.kd.evaluate import SEQUENCES_KEY
from orchestrator.train import sharding
from orchestrator.train.layout import batch_layout, refuse_changed_layout
from orchestrator.train.specs import TrainSpec

STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.json"


def lr_lambda(step: int, *, warmup: int, total: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0.1 at `total`."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_worker(config: dict) -> None:
    """`train_loop_per_worker` of the TorchTrainer; config = {"spec": TrainSpec}."""
    import ray.train
    import ray.train.torch
    from transformers import AutoConfig

    from orchestrator.kd.batches import (Packer, check_packing, collate, fold_vocab, pack,
                                         unpacked_slots)
    from orchestrator.kd.student import build_student, load_pretrained
    from orchestrator.teacher_info import load_tokenizer
    from orchestrator.train.stream import SampleStream, ShardWatcher, heldout_samples

    spec: TrainSpec = config["spec"]
    student, data, loss, opt, ev, run = (spec.student, spec.data, spec.loss, spec.optim,
                                         spec.eval, spec.run)
    if run.torch_threads and not run.local:
        torch.set_num_threads(run.torch_threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if student.model:  # pretrained: its own weights (fp32 master copy) and embedding rows
        model, _ = load_pretrained(student.model, revision=student.revision)
    else:
        teacher_cfg = AutoConfig.from_pretrained(student.teacher_model)
        teacher = None
        if student.init_from_teacher:
            from transformers import AutoModelForCausalLM

            teacher = AutoModelForCausalLM.from_pretrained(student.teacher_model,
                                                           dtype=torch.float32)
        model, _ = build_student(teacher_cfg, student.shape, init_from_teacher=teacher,
                                 seed=opt.seed)
        del teacher
    vocab_rows = model.get_output_embeddings().weight.shape[0]  # teacher ids past it: the tail
    tokenizer = load_tokenizer(student.teacher_model)
    model.to(device)  # before the optimizer and its restored state
    if opt.packing:
        check_packing(model, family=model.config.model_type)
    if run.gradient_checkpointing:  # recompute each layer's activations in the backward
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layout = batch_layout(batch_size=opt.batch_size, grad_accum=opt.grad_accum,
                          num_workers=world, seed=opt.seed,
                          max_tokens_per_batch=opt.max_tokens_per_batch if opt.packing else None,
                          on_policy=spec.on_policy.share if spec.on_policy else 0.0,
                          shuffle_shards=data.shuffle_shards)
    strategy = "fsdp" if sharding.sharded(run.strategy, world) else "ddp"
    state = _restore(model, layout=layout, label=run.label, strategy=strategy)
    step, history = state.get("step", 0), state.get("history", [])
    resumed_from = step if state else None
    # samples this worker consumed (checkpoints before packing stored one count for all ranks)
    position = state.get("positions", [state.get("position", 0)] * world)[rank] if state else 0
    core = model
    # the fused head is checked on the whole model, before sharding (a fixed probe: every rank
    # decides alike)
    probe = (torch.arange(1, 17, device=device) % core.config.vocab_size).unsqueeze(0)
    step_loss = _student_loss(core, loss, run=run, world=world, probe_ids=probe)
    model = sharding.wrap(model, strategy=strategy, world=world)
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt.lr, weight_decay=0.01,
                                  betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, warmup=opt.warmup_steps, total=opt.max_steps))
    if state:
        sharding.load_optimizer(model, optimizer, state["optimizer"], strategy=strategy,
                                world=world)
        schedule.load_state_dict(state["schedule"])

    group = None if run.local else ray.util.get_current_placement_group()
    watcher = ShardWatcher(data.shards_uri, wait=data.streaming, board=run.board)
    stream = SampleStream(watcher, units=data.units, rank=rank, world=world, seed=opt.seed,
                          position=position, streaming=data.streaming, expect=data.expect,
                          reader_cpus=run.reader_cpus, shuffle_shards=data.shuffle_shards,
                          report_to=(run.board, run.label) if run.board is not None else None)
    samples = iter(stream)
    packer = (Packer(samples, max_tokens=opt.max_tokens_per_batch,
                     row_tokens=data.max_length or None) if opt.packing else None)
    heldout = []
    if ev.heldout_uri:
        heldout = heldout_samples(ShardWatcher(ev.heldout_uri, wait=False), rank=rank,
                                  world=world, limit=ev.samples,
                                  expect=ev.heldout_expect or {
                                      "tokenizer_fingerprint": data.expect.get(
                                          "tokenizer_fingerprint")})

    onp, n_on = None, 0
    if spec.on_policy is not None:  # the student's own samples, scored by the teacher
        from orchestrator.train.onpolicy import OnPolicySource, on_policy_count

        n_on = on_policy_count(spec.on_policy.share, opt.batch_size)
        prompts = SampleStream(watcher, units=data.units, rank=rank, world=world,
                               seed=opt.seed + 1, position=state.get("onpolicy_positions",
                                                                     [0] * world)[rank],
                               streaming=data.streaming, expect=data.expect,
                               reader_cpus=run.reader_cpus,
                               report_to=stream.report_to if n_on == opt.batch_size
                               and not spec.on_policy.start_step else None)
        onp = OnPolicySource(spec.on_policy, prompts=iter(prompts), per_step=n_on * opt.grad_accum,
                             rank=rank, world=world, seed=opt.seed, label=run.label)
        if step >= spec.on_policy.start_step:
            onp.sync(sharding.full_weights(core, strategy=strategy, world=world), step)
        on_loss = step_loss.with_spec(spec.on_policy.loss)
    start = spec.on_policy.start_step if onp else 0
    window = {"loss": 0.0, "kd": 0.0, "ce": 0.0, "tokens": 0, "slots": 0, "wait": 0.0,
              "time": 0.0, "n": 0, "folded": 0.0, "kd_positions": 0, "onpolicy_kd": 0.0}
    warned_fold = False
    model.train()
    while step < opt.max_steps:
        t0 = time.perf_counter()
        wait = 0.0
        # before on_policy.start_step the whole batch is offline (the student warms up first)
        n_now, share = (n_on, spec.on_policy.share) if onp and step >= start else (0, 0.0)
        on_rows = onp.take(step, prefetch=step + 1 < opt.max_steps) if n_now else []
        for micro in range(opt.grad_accum):
            parts = []  # (batch, loss, weight): the offline part and the on-policy part
            if n_now < opt.batch_size:
                tw = time.perf_counter()
                rows = (packer.take() if packer else
                        [next(samples) for _ in range(opt.batch_size - n_now)])
                wait += time.perf_counter() - tw
                batch = (pack(rows, row_tokens=packer.row_tokens,
                              hard_labels_from_prompt=data.hard_labels_from_prompt) if packer else
                         collate(rows, hard_labels_from_prompt=data.hard_labels_from_prompt))
                window["slots"] += unpacked_slots([len(r["input_ids"]) for r in rows],
                                                  batch_size=opt.batch_size - n_now)
                parts.append(("offline", batch, step_loss, 1.0 - share))
            if n_now:
                mine = on_rows[micro * n_now:(micro + 1) * n_now]
                window["slots"] += unpacked_slots([len(r["input_ids"]) for r in mine],
                                                  batch_size=n_on)
                parts.append(("onpolicy", collate(mine), on_loss, share))
            for j, (kind, batch, part_loss, weight) in enumerate(parts):
                batch, folded = fold_vocab(batch, vocab_rows)
                window["folded"] += folded
                window["kd_positions"] += int(batch.kd_mask.sum())
                if folded > 0 and not warned_fold:
                    warned_fold = True
                    share = folded / max(int(batch.kd_mask.sum()), 1)
                    warnings.warn(f"the {run.label} student has {vocab_rows} embedding rows; "
                                  f"teacher top-k ids past them carry {share:.2%} of the teacher's"
                                  " probability per position in this batch, folded into the tail"
                                  " (metric folded_mass)", stacklevel=1)
                sync = (micro == opt.grad_accum - 1 and j == len(parts) - 1) or world == 1
                if strategy == "fsdp":
                    model.set_requires_gradient_sync(sync)
                with (model.no_sync() if not sync and hasattr(model, "no_sync") else nullcontext()):
                    with torch.autocast(device.type, dtype=torch.bfloat16,
                                        enabled=opt.precision == "bf16"):
                        loss_parts = part_loss(model, batch, device=device)
                    (loss_parts.total * (weight / opt.grad_accum)).backward()
                _check_finite(loss_parts.total.item(), spec, step=step + 1)
                window["loss"] += loss_parts.total.item() * weight / opt.grad_accum
                if kind == "offline":
                    window["kd"] += loss_parts.kd.item() / opt.grad_accum
                    window["ce"] += loss_parts.ce.item() / opt.grad_accum
                else:
                    window["onpolicy_kd"] += loss_parts.kd.item() / opt.grad_accum
                window["tokens"] += int(batch.attention_mask.sum())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if (onp is not None and step >= start and step < opt.max_steps
                and (step % spec.on_policy.sync_every == 0 or step == start)):
            onp.sync(sharding.full_weights(core, strategy=strategy, world=world), step)
        window["wait"] += wait
        window["time"] += time.perf_counter() - t0
        window["n"] += 1
        evaluate_now = step % ev.every == 0 or step == opt.max_steps
        if step % run.log_every == 0 or evaluate_now:
            metrics = _window_metrics(window, step=step, lr=schedule.get_last_lr()[0],
                                      epoch=stream.epoch, world=world)
            if onp is not None:
                metrics["onpolicy_kd"] = window["onpolicy_kd"] / max(window["n"], 1)
                metrics.update(onp.metrics(wall_s=window["time"],
                                           train_s=window["time"] - window["wait"]
                                           - onp.window["wait_s"]))
            metrics.update(time=time.time(), pid=os.getpid(), threads=torch.get_num_threads(),
                           fused_head=float(step_loss.head is not None))
            # teacher mass on ids the student has no row for, per labelled position (0 unless a
            # pretrained student's table is smaller than the teacher's)
            metrics["folded_mass"] = window["folded"] / max(window["kd_positions"], 1)
            if group is not None:  # lets a sweep reap the group of a trial Tune killed
                metrics["placement_group"] = group.id.hex()
            if resumed_from is not None:
                metrics["resumed_from"] = resumed_from
            window = dict.fromkeys(window, 0.0)
            sequences = None
            if evaluate_now and ev.heldout_uri:  # every rank, even one with no held-out
                scores, sequences = _evaluate(    # samples: it enters the collectives
                    core, heldout, device=device, world=world, per_sequence=step == opt.max_steps,
                    head=step_loss.head)
                metrics.update(scores)
            # the last evaluation's per-sequence sums stay in the history (the report pairs the
            # students on them); Ray Train, Tune and the board get only scalars
            history.append(metrics if sequences is None else metrics | {SEQUENCES_KEY: sequences})
            if run.board is not None and rank == 0:
                run.board.train_update.remote(run.label, metrics)
            positions = (_positions(stream.position - (packer.held if packer else 0), world)
                         if evaluate_now else None)
            if onp is not None and evaluate_now:  # prompts asked for but not trained on: again
                positions = {"samples": positions,
                             "onpolicy": _positions(prompts.position - onp.in_flight(), world)}
            _report(metrics, history, step=step, positions=positions, model=core,
                    tokenizer=tokenizer, optimizer=optimizer, schedule=schedule, layout=layout,
                    checkpoint=evaluate_now, rank=rank, keep=run.local, strategy=strategy,
                    world=world)


def _check_finite(loss: float, spec: TrainSpec, *, step: int) -> None:
    """Stop a diverged run before its NaN reaches the weights or a checkpoint: the last
    checkpoint stays the last good one, and a sweep reports the trial as failed."""
    if not math.isfinite(loss):
        raise DivergedError(
            f"the {spec.run.label} student diverged: its loss is {loss} at step {step} "
            f"(train.loss {spec.loss.kind}, train.lr {spec.optim.lr:g}). Lower train.lr, raise "
            "train.warmup_steps, or use train.temperature closer to 1")


def _student_loss(model, loss, *, run, world: int, probe_ids):
    """The run's `StudentLoss`, the same path on every rank (DDP needs one graph shape): when one
    rank's probe refuses the fused head, all take the dense path. A dense fallback is said once."""
    from orchestrator.kd.step import StudentLoss

    step_loss = StudentLoss(model, loss, fused=run.fused_head, probe_ids=probe_ids)
    if world > 1:
        import torch.distributed as dist

        fused = torch.tensor([1 if step_loss.head is not None else 0])
        dist.all_reduce(fused, op=dist.ReduceOp.MIN)
        if fused.item() == 0 and step_loss.head is not None:
            step_loss.head, step_loss.reason = None, "another worker's head check refused it"
    if step_loss.head is None and run.fused_head:
        import ray.train

        if ray.train.get_context().get_world_rank() == 0:
            print(f"[{run.label}] {step_loss.describe()}", flush=True)
    return step_loss


def _window_metrics(window: dict, *, step: int, lr: float, epoch: int, world: int) -> dict:
    n = max(window["n"], 1)
    return {"step": step, "epoch": epoch, "workers": world, "lr": lr, "loss": window["loss"] / n,
            "kd": window["kd"] / n, "ce": window["ce"] / n,
            "step_time_s": window["time"] / n, "data_wait_s": window["wait"] / n,
            "data_wait_share": window["wait"] / max(window["time"], 1e-9),
            "tokens_per_s": window["tokens"] * world / max(window["time"], 1e-9),
            "padding_share": 1.0 - window["tokens"] / max(window["slots"], 1)}


def _positions(consumed: int, world: int) -> list[int]:
    """Every rank's data position (samples consumed), gathered for the checkpoint: packed
    micro-batches hold different numbers of samples on different ranks."""
    if world == 1:
        return [consumed]
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, consumed)
    return out


def _evaluate(model, heldout: list[dict], *, device, world: int, per_sequence: bool,
              head=None) -> tuple[dict, dict | None]:
    """Held-out metrics over every rank's slice, and (if `per_sequence`) every held-out
    sequence's own sums, gathered from all ranks ({sample_id: [positions, NLL sum]}). Each rank
    enters the collectives, also one whose slice is empty (fewer held-out samples than workers)."""
    from orchestrator.kd.evaluate import SUM_KEYS, evaluate, finish

    sequences = {} if per_sequence else None
    sums = evaluate(model, heldout, device=str(device), per_sequence=sequences, head=head)
    if world > 1:
        import torch.distributed as dist

        t = torch.tensor([sums[k] for k in SUM_KEYS], dtype=torch.float64)
        dist.all_reduce(t)
        sums = dict(zip(SUM_KEYS, t.tolist()))
        if sequences is not None:
            parts = [None] * world
            dist.all_gather_object(parts, sequences)
            sequences = {k: v for part in parts for k, v in part.items()}
    return finish(sums), sequences


def _report(metrics: dict, history: list, *, step: int, positions: list[int] | None, model,
            tokenizer, optimizer, schedule, layout: dict, checkpoint: bool, rank: int, keep: bool,
            strategy: str, world: int) -> None:
    """Every rank reports (Ray Train requires it); rank 0 attaches the checkpoint (an fsdp run's
    shards are gathered to it first, by every rank). Ray copies it to storage, so the local copy is
    removed — except in local mode, where it is the checkpoint (the driver exports it, then
    removes it)."""
    import ray.train

    if checkpoint and (rank == 0 or sharding.sharded(strategy, world)):
        weights, optim = sharding.full_state(model, optimizer, strategy=strategy, world=world)
    if not checkpoint or rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    tmp = tempfile.mkdtemp(prefix="raydistill-ckpt-")
    extra = {}
    if isinstance(positions, dict):  # on-policy: the prompt stream's positions too
        positions, extra = positions["samples"], {"onpolicy_positions": positions["onpolicy"]}
    try:
        model.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save({"optimizer": optim, "schedule": schedule.state_dict(), "step": step,
                    "position": positions[0], "positions": positions, "layout": layout,
                    "strategy": strategy, **extra},
                   os.path.join(tmp, STATE_FILE))
        with open(os.path.join(tmp, HISTORY_FILE), "w") as f:
            json.dump(history, f)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def _restore(model, *, layout: dict, label: str, strategy: str) -> dict:
    """Load the last checkpoint of this run into the (unsharded) model, if any (weights_only: no
    untrusted unpickling), and return its step, history, optimizer and schedule state; refuse one
    saved under another batch layout (the driver checks first; this catches other ways in) or
    another train.strategy (its optimizer state is laid out for that one)."""
    import ray.train
    from safetensors.torch import load_file

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return {}
    with checkpoint.as_directory() as d:
        weights = load_file(os.path.join(d, "model.safetensors"))
        missing, _ = model.load_state_dict(weights, strict=False)
        if [m for m in missing if "lm_head" not in m]:  # a tied head is saved once
            raise RuntimeError(f"checkpoint {d} lacks weights: {missing[:5]}")
        if "lm_head.weight" in missing:
            model.tie_weights()
        state = torch.load(os.path.join(d, STATE_FILE), weights_only=True)
        what = f"the {label} student's checkpoint at step {state['step']}"
        refuse_changed_layout(state.get("layout", {}), layout, what=what)
        if state.get("strategy", "ddp") != strategy:
            raise ConfigError(
                f"{what} was trained with train.strategy={state.get('strategy', 'ddp')} (on "
                f"several workers), this run uses {strategy}; its optimizer state is laid out for "
                "the other. Resume with the old train.strategy, or start a new experiment (omit "
                "--resume)")
        with open(os.path.join(d, HISTORY_FILE)) as f:
            history = json.load(f)
    return {"step": state["step"], "history": history, "optimizer": state["optimizer"],
            "schedule": state["schedule"], "position": state["position"],
            **{key: state[key] for key in ("positions", "onpolicy_positions") if key in state}}
