"""`raydistill demo`: build (once, cached) a small real teacher and run examples/quickstart.yaml.

The demo teacher is a 4-layer, 256-wide Llama with its own 4k BPE tokenizer, trained for a few
minutes on the Python standard library's own sources (text every CPython install has), and measured
on held-out modules against a unigram baseline. Its transfer set (JSONL) is written beside it.
Run: `raydistill demo` (first run ~10 min on 2 CPUs, later runs reuse the cache).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path

from orchestrator import tiny
from orchestrator.progress import console, say

QUICKSTART = Path(__file__).resolve().parent.parent / "examples" / "quickstart.yaml"


def demo_home(home: str | None) -> Path:
    return Path(home or os.environ.get("RAYDISTILL_HOME") or "~/.cache/raydistill").expanduser()


def run_demo(*, overrides: list[str], teacher_minutes: float, home: str | None,
             rebuild: bool) -> int:
    from orchestrator.config import load_config
    from orchestrator.pipeline import capture

    root = demo_home(home)
    teacher = root / "demo-teacher"
    if rebuild or not (teacher / "demo.json").exists():
        build_demo_teacher(teacher, root / "demo-data", minutes=teacher_minutes)
    else:
        say(f"using the cached demo teacher in {teacher} ({_describe(teacher)})")
    if not (root / "demo-data" / "transfer.jsonl").exists():
        files = tiny.stdlib_sources()
        _write_demo_data(root / "demo-data", [f for f in files if not tiny.held_out(f)],
                         [f for f in files if tiny.held_out(f)], seed=0)
    paths = [f"teacher.model={teacher}", f"data.path={root / 'demo-data' / 'transfer.jsonl'}"]
    cfg = load_config(QUICKSTART, [*paths, *overrides])
    manifest = capture(cfg)
    say(f"[green]soft labels ready[/] in {cfg.output_dir}: {len(manifest.shards)} shards "
        f"(read them with orchestrator.shards.read_shards, or `raydistill inspect {cfg.output_dir}`)")
    return 0 if manifest.complete else 1


def _describe(teacher: Path) -> str:
    m = json.loads((teacher / "demo.json").read_text())
    return (f"held-out {m['heldout_nats']:.2f} nats/token vs unigram {m['unigram_nats']:.2f}, "
            f"{m['train_minutes']:.1f} min")


def build_demo_teacher(out: Path, data_dir: Path, *, minutes: float, seed: int = 0,
                       layers: int = 4, hidden: int = 256, seq: int = 128, batch: int = 16,
                       lr: float = 2e-3, vocab_size: int = 4096) -> dict:
    """Train the demo teacher for `minutes` and save it (HF format) with its metrics in demo.json."""
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(os.cpu_count() or 1)
    files = tiny.stdlib_sources()
    train_files = [f for f in files if not tiny.held_out(f)]
    test_files = [f for f in files if tiny.held_out(f)]
    say(f"demo teacher: {len(train_files)} training / {len(test_files)} held-out stdlib modules")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tok = tiny.train_tokenizer(tiny.chunks_of_text(train_files), out, vocab_size=vocab_size)
    train_ids = _encode(tok, train_files)
    test_ids = _encode(tok, test_files)
    say(f"tokenizer ({len(tok)} tokens) and {len(train_ids):,} training tokens in "
        f"{time.time() - t0:.0f}s")
    _write_demo_data(data_dir, train_files, test_files, seed=seed)

    config = tiny.llama_config(len(tok), layers=layers, hidden=hidden, heads=hidden // 64,
                               max_positions=512)
    model = tiny.build_model(config, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    data = torch.tensor(train_ids, dtype=torch.long)
    budget = minutes * 60
    gen = torch.Generator().manual_seed(seed)
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    step, start, loss_avg = 0, time.time(), None
    with Progress(TextColumn("training demo teacher"), BarColumn(),
                  TextColumn("step {task.fields[step]} · loss {task.fields[loss]}"),
                  TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task("train", total=budget, step=0, loss="-")
        while (elapsed := time.time() - start) < budget:
            frac = elapsed / budget
            for g in opt.param_groups:  # linear warm-up over 3%, cosine decay to 10%
                g["lr"] = lr * min(1.0, frac / 0.03) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
            idx = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
            x = torch.stack([data[i:i + seq + 1] for i in idx.tolist()])
            loss = model(input_ids=x, labels=x).loss  # HF shifts the labels by one
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            loss_avg = loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * loss.item()
            bar.update(task, completed=min(budget, time.time() - start), step=step,
                       loss=f"{loss_avg:.2f}")
    heldout = _heldout_nats(model, test_ids, seq=seq)
    unigram = _unigram_nats(train_ids, test_ids, len(tok))
    model.save_pretrained(str(out), safe_serialization=True)
    metrics = {"heldout_nats": heldout, "unigram_nats": unigram, "steps": step,
               "train_minutes": (time.time() - start) / 60, "train_tokens": step * batch * seq,
               "layers": layers, "hidden": hidden, "vocab_size": len(tok)}
    (out / "demo.json").write_text(json.dumps(metrics, indent=1))
    say(f"[green]demo teacher saved[/] in {out}: held-out {heldout:.2f} nats/token "
        f"(unigram {unigram:.2f}) after {step} steps")
    return metrics


def _encode(tok, files) -> list[int]:
    ids: list[int] = []
    for text in tiny.chunks_of_text(files, max_chars=100_000):
        ids.extend(tok(text)["input_ids"])
    return ids


def _heldout_nats(model, ids: list[int], *, seq: int, windows: int = 64) -> float:
    """Mean next-token cross-entropy on evenly spaced held-out windows."""
    import torch

    step = max(1, (len(ids) - seq - 1) // windows)
    starts = list(range(0, len(ids) - seq - 1, step))[:windows]
    x = torch.tensor([ids[s:s + seq + 1] for s in starts])
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
    model.train()
    return float(loss)


def _unigram_nats(train: list[int], test: list[int], vocab: int) -> float:
    import numpy as np

    counts = np.bincount(np.asarray(train), minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[np.asarray(test)].mean())


def _module_name(path: Path) -> str:
    """`json/decoder` for .../lib/python3.11/json/decoder.py: unique, unlike the file stem."""
    import sysconfig

    return str(path.relative_to(sysconfig.get_paths()["stdlib"]).with_suffix(""))


def _write_demo_data(data_dir: Path, train_files, test_files, *, seed: int) -> None:
    """transfer.jsonl: a 10% sample of the training modules (the students' transfer set, smaller
    than the teacher's text); heldout.jsonl: the held-out modules."""
    data_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    transfer = sorted(rng.sample(train_files, max(1, len(train_files) // 10)))
    for name, files in (("transfer.jsonl", transfer), ("heldout.jsonl", test_files)):
        tmp = data_dir / (name + ".tmp")
        with open(tmp, "w") as fh:
            for path in files:
                for j, text in enumerate(tiny.chunks_of_text([path], max_chars=2000)):
                    fh.write(json.dumps({"id": f"{_module_name(path)}:{j}", "text": text}) + "\n")
        tmp.rename(data_dir / name)
