"""The capture benchmark's fixed teacher: a 4 × 256 Llama with a 32k BPE vocabulary, trained
here on the standard library's sources and cached (nothing is downloaded)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from benchmarks._common import CACHE, VOCAB, log


def build_teacher(out: Path, *, steps: int, max_seconds: float, seed: int = 0) -> dict:
    """Train (once) the benchmark teacher and save it with its tokenizer in `out`; returns its info."""
    marker = out / "bench.json"
    if marker.exists():
        info = json.loads(marker.read_text())
        log(f"teacher cached in {out}: {info['layers']}x{info['hidden']}, vocab {info['vocab_size']}, "
            f"{info['steps']} steps, held-out {info['heldout_nats']:.2f} nats/token "
            f"(unigram {info['unigram_nats']:.2f})")
        return info

    import torch

    from orchestrator.driver import tiny

    torch.manual_seed(seed)
    torch.set_num_threads(os.cpu_count() or 1)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = tiny.stdlib_sources()
    train_files = [f for f in files if not tiny.held_out(f)]
    test_files = [f for f in files if tiny.held_out(f)]
    t0 = time.time()
    # The tokenizer is the same for the full and the quick teacher: reuse a sibling's if present.
    sibling = next((d for d in sorted(CACHE.glob("bench-teacher*")) if d not in (out, tmp)
                    and (d / "tokenizer.json").exists() and (d / "bench.json").exists()), None)
    if sibling is not None:
        for f in sibling.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy2(f, tmp / f.name)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tmp), local_files_only=True)
        log(f"tokenizer copied from {sibling}")
    else:
        log(f"training a {VOCAB}-token BPE on {len(train_files)} stdlib modules "
            f"({len(test_files)} held out) ...")
        tok = tiny.train_tokenizer(tiny.chunks_of_text(train_files), tmp, vocab_size=VOCAB)
        log(f"tokenizer: {len(tok)} tokens in {time.time() - t0:.0f}s")
    vocab = len(tok)

    t0 = time.time()
    train_ids = tiny.encode_files(tok, train_files)
    test_ids = tiny.encode_files(tok, test_files)
    np.save(tmp / "heldout_ids.npy", np.asarray(test_ids, dtype=np.int32))
    log(f"{len(train_ids):,} training / {len(test_ids):,} held-out tokens in {time.time() - t0:.0f}s")

    config = tiny.llama_config(vocab, layers=4, hidden=256, heads=4, max_positions=512)
    model = tiny.build_model(config, seed=seed)
    lr, batch, seq = 2e-3, 16, 128
    log(f"training the teacher: {steps} AdamW steps (lr {lr}, batch {batch}x{seq}), "
        f"at most {max_seconds:.0f}s ...")
    start = time.time()
    step = tiny.train_lm(model, train_ids, max_steps=steps, max_seconds=max_seconds, lr=lr,
                         batch=batch, seq=seq, seed=seed)
    trained = time.time() - start
    heldout = tiny.heldout_nats(model, test_ids, seq=seq)
    unigram = tiny.unigram_nats(train_ids, test_ids, vocab)
    model.save_pretrained(str(tmp), safe_serialization=True)
    info = {"layers": 4, "hidden": 256, "heads": 4, "vocab_size": vocab, "steps": step,
            "planned_steps": steps, "train_seconds": trained, "train_tokens": step * batch * seq,
            "heldout_nats": heldout, "unigram_nats": unigram, "seed": seed}
    (tmp / "bench.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log(f"teacher saved in {out}: {step} steps in {trained:.0f}s, held-out {heldout:.2f} nats/token "
        f"(unigram {unigram:.2f})")
    return info
