"""The packing table of `python -m benchmarks.train --only packing` (issue 14): training tokens/s
of the demo's students on the demo's transfer texts, padded (`train.batch_size` samples padded to
the longest, `kd.batches.collate`) against packed (`train.packing`: as many samples as fit
`train.max_tokens_per_batch` // 512 rows of 512 tokens, `kd.batches.Packer` + `pack`), measured
side by side.

The samples are the demo's (`raydistill demo`'s transfer.jsonl, tokenised by the demo teacher's
tokenizer, split at the quickstart's data.max_length 512 as `long_text: split` does) in a seeded
shuffle, as a train stream reads them; their teacher labels are random top-64 (the step's cost
does not depend on their values). Each round takes the next `ROUND_SAMPLES` samples and trains
them both ways, in alternating order (a step = forward, KD + CE loss, backward, AdamW; one torch
thread): tokens/s = their real tokens / the CPU time this process took to train them (on a shared
machine wall time measures the queue for the CPUs, not the step); the gain is the median of
per-round ratios. `padding_share` = padded
slots / slots of the padded layout (what packing removes).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from benchmarks._common import CACHE, log

SECTION = "## Sequence packing (issue 14)"
MAX_LENGTH, BATCH, K = 512, 8, 64  # the quickstart's data.max_length and train.batch_size
MAX_TOKENS = BATCH * MAX_LENGTH     # train.max_tokens_per_batch: a padded batch's worst case
ROUND_SAMPLES = 48
PRESETS = ("nano", "micro")         # the quickstart's student and the sweep's larger one
THREADS = 1  # one intra-op thread: on a shared, loaded machine the least disturbed measurement


def demo_samples(seed: int = 0) -> tuple[list[dict], object]:
    """The demo's transfer texts as train samples (≤ MAX_LENGTH tokens each, random top-K
    labels), shuffled; and the demo teacher's config. Needs `raydistill demo` to have built the
    demo teacher and data once (in ~/.cache/raydistill)."""
    import numpy as np
    from transformers import AutoConfig, AutoTokenizer

    teacher, data = CACHE / "demo-teacher", CACHE / "demo-data" / "transfer.jsonl"
    if not (teacher / "config.json").exists() or not data.exists():
        raise SystemExit(f"no demo teacher/data in {CACHE}: run `raydistill demo` once first "
                         "(the packing benchmark trains on the demo's texts)")
    tok = AutoTokenizer.from_pretrained(str(teacher))
    rng = np.random.default_rng(seed)
    samples = []
    for line in data.read_text().splitlines():
        ids = tok(json.loads(line)["text"])["input_ids"]
        for i in range(0, len(ids), MAX_LENGTH):
            piece = np.asarray(ids[i:i + MAX_LENGTH], dtype=np.int32)
            T = len(piece)
            lps = np.sort(np.log(rng.dirichlet(np.ones(K * 2), size=T)[:, :K]), -1)[:, ::-1]
            samples.append({"input_ids": piece, "prompt_len": 0,
                            "topk_ids": rng.integers(0, len(tok), (T, K), dtype=np.int32),
                            "topk_logprobs": np.ascontiguousarray(lps, dtype=np.float32),
                            "tail_mass": (1 - np.exp(lps).sum(-1, keepdims=True)).astype(
                                np.float32),
                            "tail_temperatures": np.ones(1, dtype=np.float32)})
    order = rng.permutation(len(samples))
    return [samples[i] for i in order], AutoConfig.from_pretrained(str(teacher))


def _train(model, opt, batches) -> float:
    """CPU seconds of this process to train these micro-batches, one optimizer step each (with
    one torch thread, the wall time on an idle machine; unlike wall time, not inflated by other
    work queued on the same CPUs)."""
    from orchestrator.kd.losses import distill_loss

    t = time.process_time()
    for batch in batches:
        logits = model(**batch.model_inputs(), use_cache=False).logits
        parts = distill_loss(logits.reshape(-1, logits.shape[-1]), **batch.flat())
        parts.total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.process_time() - t


def measure(rounds: int) -> dict:
    import torch

    from orchestrator.kd.batches import Packer, collate, pack, unpacked_slots
    from orchestrator.kd.student import build_student
    from orchestrator.shapes import resolve_shape

    torch.set_num_threads(THREADS)
    samples, teacher_cfg = demo_samples()
    lengths = [len(s["input_ids"]) for s in samples]
    out = {"samples": len(samples), "mean_length": statistics.mean(lengths), "presets": {}}
    for preset in PRESETS:
        model, _ = build_student(teacher_cfg, resolve_shape(preset=preset), seed=0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        rows = {"padded": [], "packed": []}
        for r in range(rounds + 1):  # round 0 warms up
            chunk = samples[(r * ROUND_SAMPLES) % len(samples):][:ROUND_SAMPLES]
            tokens = sum(len(s["input_ids"]) for s in chunk)
            padded = [collate(chunk[i:i + BATCH]) for i in range(0, len(chunk), BATCH)]
            packer = Packer(iter(chunk), max_tokens=MAX_TOKENS, row_tokens=MAX_LENGTH)
            packed, done = [], 0
            while done < len(chunk):
                taken = packer.take()
                done += len(taken)
                packed.append(pack(taken, row_tokens=MAX_LENGTH))
            layouts = {"padded": padded, "packed": packed}
            order = ("padded", "packed") if r % 2 else ("packed", "padded")  # drift cancels
            times = {name: _train(model, opt, layouts[name]) for name in order}
            if r == 0:
                continue
            slots = unpacked_slots([len(s["input_ids"]) for s in chunk], batch_size=BATCH)
            for name, batches in (("padded", padded), ("packed", packed)):
                rows[name].append({"s": times[name], "tokens": tokens, "steps": len(batches),
                                   "slots": slots})
            log(f"{preset} round {r}/{rounds}: padded {tokens / times['padded']:.0f} tok/s "
                f"({len(padded)} steps), packed {tokens / times['packed']:.0f} tok/s "
                f"({len(packed)} steps)")
        tokens = sum(x["tokens"] for x in rows["padded"])
        out["presets"][preset] = {
            "padding_share": 1 - tokens / sum(x["slots"] for x in rows["padded"]),
            **{f"{name}_tokens_per_s": statistics.median(x["tokens"] / x["s"] for x in rows[name])
               for name in rows},
            **{f"{name}_samples_per_step": ROUND_SAMPLES * rounds / sum(x["steps"] for x in rows[name])
               for name in rows},
            "gains": [a["s"] / p["s"] for a, p in zip(rows["padded"], rows["packed"])],
        }
        out["presets"][preset]["gain"] = statistics.median(out["presets"][preset]["gains"])
    return out


def markdown(R: dict, machine: str) -> str:
    m = R["packing"]
    lines = [SECTION, "",
             f"Command: `{R['command']}` (from the repository root). Date: {R['date']}. {machine}",
             "",
             f"The demo's transfer texts ({m['samples']} samples of ≤ {MAX_LENGTH} tokens, mean "
             f"{m['mean_length']:.0f}, in a seeded shuffle; random top-{K} labels), the demo "
             f"teacher's students trained side by side, {R['rounds']} paired rounds of "
             f"{ROUND_SAMPLES} samples: padded = `train.batch_size` {BATCH} padded to the longest; "
             f"packed = `train.packing: true`, `train.max_tokens_per_batch: {MAX_TOKENS}` "
             f"({MAX_TOKENS // MAX_LENGTH} rows of {MAX_LENGTH} tokens, block-diagonal attention "
             "through restarting position ids, sdpa; first-fit in stream order). Tokens/s count "
             f"real tokens per CPU-second of the training process ({THREADS} torch thread: its wall "
             "time on an idle machine); a step = forward, KD + CE loss, backward, AdamW; the two "
             "layouts in alternating order.", "",
             "| student | padding share (padded) | padded tokens/s | packed tokens/s | "
             "packed ÷ padded (median) | per-round range | no-padding bound 1 / (1 − share) | "
             "samples/step padded → packed |",
             "|---|---|---|---|---|---|---|---|"]
    for preset, p in m["presets"].items():
        lines.append(f"| {preset} | {100 * p['padding_share']:.1f}% | "
                     f"{p['padded_tokens_per_s']:.0f} | {p['packed_tokens_per_s']:.0f} | "
                     f"**{p['gain']:.2f}×** | {min(p['gains']):.2f}–{max(p['gains']):.2f}× | "
                     f"{1 / (1 - p['padding_share']):.2f}× | "
                     f"{p['padded_samples_per_step']:.1f} → "
                     f"{p['packed_samples_per_step']:.1f} |")
    lines += ["", "Packing removes the padded layout's padding share (the `padding_share` a "
              "training run reports); 1 / (1 − share) is the gain if a step's cost were "
              "proportional to its token slots; what is left is each row's unfilled end and the "
              "attention inside a row, computed over the whole row and masked (sdpa on a CPU has "
              "no varlen kernel; flash attention's varlen path, which transformers picks from the "
              "same position ids, skips the masked blocks)."]
    if R["machine"].get("load_1min", 0) > R["machine"].get("cpus", 1):
        lines += ["", f"This run shared its {R['machine']['cpus']} CPUs with other work (load "
                  f"{R['machine']['load_1min']:.0f} at the start): hence CPU time rather than wall "
                  "time, paired rounds in alternating order and the median ratio; contention for "
                  "caches and memory bandwidth still spreads the rounds (the per-round range)."]
    lines.append("")
    return "\n".join(lines)


def save(R: dict, path: Path) -> None:
    path.write_text(json.dumps(R, indent=1, default=str))
