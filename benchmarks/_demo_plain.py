"""The demo-quality check's plain-torch reference: one student trained in a plain loop on a finished
capture — the product's collate, loss and evaluation, but its own data order — to tell a product
bug from a recipe limit (BENCHMARKS.md, "Demo quality (issue 15)").

    python -m benchmarks._demo_plain --capture RUNS/captures/main-<fp> \
        --heldout RUNS/captures/heldout-<fp> --teacher ~/.cache/raydistill/demo-teacher \
        --order global --alpha 0.5          # --order shard: the stream's old order; --alpha 0: hard

--order global shuffles every sample each epoch; shard visits the shards in the stream's seeded
order, each shuffled alone (the order before train.shuffle_shards); windowN, N shards together.
Prints the held-out NLL, KL and top-1 every --eval-every steps, then RESULT and the JSON curve.
"""
import argparse, json, time
import numpy as np, torch
from transformers import AutoConfig
from orchestrator.train.stream import ShardWatcher, epoch_order, _row_seed
from orchestrator.shards.manifest import load_manifest
from orchestrator.storage import filesystem
from orchestrator.kd.batches import collate, fold_vocab
from orchestrator.kd.losses import distill_loss
from orchestrator.kd.evaluate import evaluate, finish
from orchestrator.kd.student import build_student
from orchestrator.shapes import resolve_shape
from orchestrator.train.loop import lr_lambda

p = argparse.ArgumentParser()
p.add_argument("--capture"); p.add_argument("--heldout"); p.add_argument("--teacher")
p.add_argument("--order", default="global")  # global | shard | capture0
p.add_argument("--steps", type=int, default=300); p.add_argument("--batch", type=int, default=8)
p.add_argument("--lr", type=float, default=0.004); p.add_argument("--alpha", type=float, default=0.5)
p.add_argument("--T", type=float, default=1.0); p.add_argument("--warmup", type=int, default=20)
p.add_argument("--eval-every", type=int, default=100); p.add_argument("--eval-samples", type=int, default=256)
p.add_argument("--preset", default="nano"); p.add_argument("--seed", type=int, default=0)
p.add_argument("--loss", default="fkl"); p.add_argument("--tail", default="renormalize")
a = p.parse_args()
torch.set_num_threads(2)
w = ShardWatcher(a.capture, wait=False)
fs, root = filesystem(a.capture); m = load_manifest(fs, root)
units = sorted(m.shards)
by_unit = {u: w.read(u) for u in units}
held = []
hw = ShardWatcher(a.heldout, wait=False); fs2, r2 = filesystem(a.heldout)
for u in sorted(load_manifest(fs2, r2).shards):
    held += hw.read(u)
held = held[:a.eval_samples]
def stream():
    e = 0
    while True:
        if a.order == "global":
            allr = [s for u in units for s in by_unit[u]]
            rng = np.random.default_rng([a.seed, e])
            for i in rng.permutation(len(allr)): yield allr[i]
        elif a.order.startswith("window"):
            W = int(a.order[6:]); order = epoch_order(units, seed=a.seed, epoch=e, capture_order=False)
            for j in range(0, len(order), W):
                win = [s for u in order[j:j + W] for s in by_unit[u]]
                rng = np.random.default_rng([a.seed, e, j, 0xB10C])
                for i in rng.permutation(len(win)): yield win[i]
        else:
            for u in epoch_order(units, seed=a.seed, epoch=e, capture_order=(a.order == "capture0" and e == 0)):
                rng = np.random.default_rng(_row_seed(a.seed, e, u))
                for i in rng.permutation(len(by_unit[u])): yield by_unit[u][i]
        e += 1
model, _ = build_student(AutoConfig.from_pretrained(a.teacher), resolve_shape(preset=a.preset), seed=a.seed)
rows = model.get_output_embeddings().weight.shape[0]
opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01, betas=(0.9, 0.95))
sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, warmup=a.warmup, total=a.steps))
it = stream(); t0 = time.time(); curve = []
for step in range(1, a.steps + 1):
    batch, _ = fold_vocab(collate([next(it) for _ in range(a.batch)]), rows)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    parts = distill_loss(logits.reshape(-1, logits.shape[-1]), kind=a.loss, temperature=a.T, alpha=a.alpha,
                         tail=a.tail, **batch.flat())
    parts.total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step(); sch.step(); opt.zero_grad(set_to_none=True)
    if step % a.eval_every == 0 or step == a.steps:
        r = finish(evaluate(model, held)); model.train()
        curve.append({"step": step, "nll": r["eval_student_nll"], "kl": r["eval_kl"], "top1": r["eval_top1"], "teacher": r["eval_teacher_nll"], "s": time.time() - t0})
        print(json.dumps(curve[-1]), flush=True)
print("RESULT", json.dumps({"args": vars(a), "curve": curve}))
