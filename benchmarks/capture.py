"""Capture benchmark (issue 2): teacher scoring speed, shard size and peak memory, side by side.

Run from the repository root:

    .venv/bin/python -m benchmarks.capture            # full run (~10-12 min on a 2-core CPU)
    .venv/bin/python -m benchmarks.capture --quick    # smoke run (~2-3 min once the teacher is cached)

In one process and on the same model and token batch it measures tokens/s of
  (a) a bare transformers fp32 forward computing logits at every position (the reference, 1.00x),
  (b) vLLM's own `prompt_logprobs=64` path (flat logprobs, bf16),
  (c) raydistill's `HFBackend.score(k=64)`,
  (d) raydistill's `VLLMBackend(scoring="hidden").score(k=64)` in bf16 and fp32
      (and its `scoring="prompt_logprobs"` fallback),
then the bytes/token of the soft-label shard written from (c) with `orchestrator.shards.format.write_shard`
(read back and checked) next to alternative encodings explored here only, and the peak RSS of HF
scoring runs in fresh subprocesses (bounded by batch_tokens/chunk_rows, not by the batch).

The machine may be shared, so every timing of a path is paired with a timing of (a) taken right
after it, and ratios are medians of those pairs (a global ratio to the first (a) is shown too).
Results are printed as Markdown and, for a full run, written into BENCHMARKS.md under
"## Capture (issue 2)".

The teacher is a fixed 4-layer, 256-wide Llama with a 32k byte-level BPE vocabulary, trained here
for a fixed number of AdamW steps on the standard library's sources (nothing is downloaded) and
cached under ~/.cache/raydistill/bench-teacher (--quick uses it when present, else builds a
barely-trained bench-teacher-quick). At most one vLLM engine exists at a time.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import numpy as np  # noqa: E402

from benchmarks._common import (_T0, CACHE, K, MMAP_ENV, SEQ,  # noqa: E402
                                child_pids, err_text, log, make_batch, stack)
from benchmarks._encodings import shard_sizes  # noqa: E402
from benchmarks._teacher import build_teacher  # noqa: E402
from benchmarks._memory import memory_probe, run_probe  # noqa: E402
from benchmarks._report import LABELS, machine, markdown, write_benchmarks_md  # noqa: E402
from benchmarks._scoring import (Reference, agreement, bench_head, bench_hf_backend,  # noqa: E402
                                 bench_vllm_backend, bench_vllm_prompt_logprobs, lp_error, timed)


ALL = ["ref", "vllm_pl", "hf", "vllm_hidden_bf16", "vllm_hidden_float32", "vllm_backend_pl"]
QUICK = ["ref", "vllm_pl", "hf", "vllm_hidden_bf16"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.capture", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="16 sequences, 2 repeats, fewer memory probes and vLLM engines")
    ap.add_argument("--paths", default=None,
                    help=f"comma list of speed paths, or 'all' (default: {','.join(ALL)}; quick: "
                         f"{','.join(QUICK)})")
    ap.add_argument("--train-steps", type=int, default=None,
                    help="AdamW steps for a new teacher (default 150; quick teacher 10)")
    ap.add_argument("--train-max-seconds", type=float, default=300.0)
    ap.add_argument("--sequences", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--write", action=argparse.BooleanOptionalAction, default=None,
                    help="write BENCHMARKS.md (default: yes for a full run, no for --quick)")
    ap.add_argument("--json", default=None, help="also dump the raw results here")
    ap.add_argument("--_probe", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._probe:
        print("PROBE " + json.dumps(memory_probe(json.loads(args._probe))), flush=True)
        return 0

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    quick = args.quick
    paths = ALL if args.paths == "all" else (args.paths.split(",") if args.paths else
                                              (QUICK if quick else ALL))
    n = args.sequences or (16 if quick else 64)
    repeats = args.repeats or (2 if quick else 3)
    write = args.write if args.write is not None else not quick
    command = " ".join([".venv/bin/python -m benchmarks.capture", *(sys.argv[1:] if argv is None
                                                                    else argv)])
    R: dict = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "quick": quick, "repeats": repeats, "speed": {}, "diag": {}, "agreement": {},
               "problems": [], "machine": machine(), "load_start": os.getloadavg()[0]}

    # --quick reuses the full teacher when a full run has built it (realistic distributions)
    teacher = CACHE / "bench-teacher"
    if quick and not (teacher / "bench.json").exists():
        teacher = CACHE / "bench-teacher-quick"
    R["teacher_cached"] = (teacher / "bench.json").exists()
    steps = args.train_steps or (10 if teacher.name.endswith("quick") else 150)
    R["teacher"] = build_teacher(teacher, steps=steps, max_seconds=args.train_max_seconds)
    if R["teacher"]["vocab_size"] < 32000:
        R["problems"].append(f"teacher vocabulary is {R['teacher']['vocab_size']} (< 32k)")
    if R["teacher"]["steps"] < R["teacher"].get("planned_steps", 0):
        R["problems"].append(f"teacher trained {R['teacher']['steps']} of "
                             f"{R['teacher']['planned_steps']} steps (time cap)")
    seqs = make_batch(teacher, n)
    R["batch"] = {"n": n, "seq": SEQ}
    log(f"batch: {n} × {SEQ} = {n * SEQ:,} held-out tokens; paths: {', '.join(paths)}")

    def attempt(key, fn):
        log(f"{LABELS.get(key, key)} ...  (load average {os.getloadavg()[0]:.1f})")
        try:
            out = fn()
            res = out[0] if isinstance(out, tuple) else out
            extra = (f"; paired (a) {res['ref_tps']} → {res['ratio_paired']:.2f}× paired, "
                     f"{res['ratio_best']:.2f}× best/best" if "ref_tps" in res else "")
            log(f"  {res['best']:,.0f} tok/s best, {res['median']:,.0f} median "
                f"(times {res['times']}){extra}")
            R["speed"][key] = res
            return out
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            R["speed"][key] = {"error": err_text(e)}
            R["problems"].append(f"{LABELS.get(key, key)} failed: `{err_text(e)[:500]}`")
            return None
        finally:
            left = child_pids()
            if left:
                time.sleep(3)
                left = child_pids()
                if left:
                    log(f"  vLLM processes still alive after this path: {left}")
                    R["problems"].append(f"after {key}, vLLM processes were still alive: {left}")

    log(f"{LABELS['ref']} ...")
    ref = Reference(teacher, seqs)
    attempt("ref", lambda: timed(ref.run, tokens=ref.tokens, repeats=repeats, warmup=0)[0])

    hf_out = None
    if "hf" in paths:
        got = attempt("hf", lambda: bench_hf_backend(teacher, seqs, repeats, ref))
        hf_out = got[1] if got else None
    if hf_out is not None:
        lps = stack(hf_out, "topk_logprobs")
        R["batch"]["top1_p"] = float(np.exp(lps[:, 0]).mean())
        R["batch"]["top64_mass"] = float(np.exp(lps).sum(1).mean())
        R["batch"]["target_nats"] = float(-np.nanmean(stack(hf_out, "target_logprobs")))
        log(f"teacher on the batch: top-1 p {R['batch']['top1_p']:.2f}, top-64 mass "
            f"{R['batch']['top64_mass']:.3f}, next-token CE {R['batch']['target_nats']:.2f} nats")
        bad = [i for i, (s, sl) in enumerate(zip(seqs, hf_out))
               if sl.topk_ids.shape != (len(s), K) or not np.all(np.diff(sl.topk_logprobs, axis=1) <= 0)]
        if bad:
            R["problems"].append(f"HFBackend: {len(bad)} sequences with wrong shapes or unsorted top-k")
        log("shard sizes ...")
        try:
            R["shards"] = shard_sizes(hf_out, seqs)
            for e in R["shards"]["encodings"]:
                log(f"  {e['bytes_per_token']:7.1f} B/token  exact={e['ids_exact']}  "
                    f"err={e['max_err']:.4f}  {e['name']}")
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            R["problems"].append(f"shard size measurement failed: `{err_text(e)}`")

    if not args.no_memory:
        # (label, kind, chunk_rows, sequences, sequence length). More sequences = more batches of
        # batch_tokens (8192) for the body; chunk_rows bounds the [rows × vocab] head block.
        specs = ([("HF backend, chunk_rows=512", "hf", 512, 4, SEQ),
                  ("HF backend, chunk_rows=512", "hf", 512, 32, SEQ),
                  ("HF backend, chunk_rows=64", "hf", 64, 32, SEQ),
                  ("bare logits forward (a)", "ref", 0, 32, SEQ)] if quick else
                 [("HF backend, chunk_rows=512", "hf", 512, 8, SEQ),
                  ("HF backend, chunk_rows=512", "hf", 512, 32, SEQ),
                  ("HF backend, chunk_rows=512", "hf", 512, 128, SEQ),
                  ("HF backend, chunk_rows=64", "hf", 64, 128, SEQ),
                  ("HF backend, chunk_rows=2048", "hf", 2048, 128, SEQ),
                  ("bare logits forward (a), 8192-token batches", "ref", 0, 128, SEQ),
                  # glibc keeps freed tensor memory (dynamic mmap threshold), which makes the peak
                  # creep up with more batches; a fixed threshold shows the real working set
                  (f"HF backend, chunk_rows=512, {MMAP_ENV}", "hf", 512, 32, SEQ),
                  (f"HF backend, chunk_rows=512, {MMAP_ENV}", "hf", 512, 128, SEQ)])
        R["memory"] = []
        for label, kind, rows, nseq, slen in specs:
            log(f"memory probe: {label}, {nseq} × {slen} tokens ...")
            env = dict([MMAP_ENV.split("=")]) if MMAP_ENV in label else {}
            m = run_probe({"kind": kind, "teacher": str(teacher), "chunk_rows": rows, "n": nseq,
                           "seq": slen, "env": env})
            m["label"] = f"{label}, {nseq} × {slen} tokens"
            if "error" in m:
                log(f"  failed: {m['error'][-300:]}")
                R["problems"].append(f"memory probe {label} failed: `{m['error'][-300:]}`")
            else:
                log(f"  RSS {m['rss_before_mib']:.0f} MiB before, peak {m['peak_scoring_mib']:.0f} MiB "
                    f"(+{m['delta_mib']:.0f}), VmHWM {m['hwm_mib']:.0f} MiB")
            R["memory"].append(m)

    def compare(key, ids, lps, t, keep=None):
        if hf_out is None:
            return
        h_ids, h_lps, h_t = (stack(hf_out, a) for a in ("topk_ids", "topk_logprobs", "target_logprobs"))
        if keep is not None:
            h_ids, h_lps, h_t = h_ids[keep], h_lps[keep], h_t[keep]
        if ids.shape != h_ids.shape:
            R["problems"].append(f"{key}: top-k arrays {ids.shape} vs HF's {h_ids.shape}")
            return
        a = R["agreement"][key] = agreement(h_ids, h_lps, h_t, ids, lps, t)
        log(f"  vs HF: top-1 same {a['top1_same']:.4f}, top-64 overlap {a['topk_overlap']:.4f}, "
            f"top-1 Δlp max {a['top1_lp_maxdiff']:.3f}, target Δlp max {a['target_lp_maxdiff']:.3f}")

    vllm_pl = None

    def head_errors(key, dtype, out, diag):
        """The fast path's error against vLLM's own prompt_logprobs in the same dtype (bf16, from
        (b)) and against the fp32 reference (the HF backend in fp32), on the same batch."""
        ids, lps = stack(out, "topk_ids"), stack(out, "topk_logprobs")
        errs = R.setdefault("head_error", {}).setdefault(key, {})
        if diag.get("self_check"):
            errs["self_check"] = diag["self_check"]
        if vllm_pl is not None and dtype == "bfloat16" and key == "vllm_hidden_bf16":
            errs["vs_vllm_prompt_logprobs"] = lp_error(vllm_pl[0], vllm_pl[1], ids[keep],
                                                       lps[keep])
        if hf_out is not None:
            errs["vs_fp32"] = lp_error(stack(hf_out, "topk_ids"), stack(hf_out, "topk_logprobs"),
                                       ids, lps)
            if vllm_pl is not None and key == "vllm_hidden_bf16":
                h_ids, h_lps = stack(hf_out, "topk_ids")[keep], stack(hf_out, "topk_logprobs")[keep]
                errs["vllm_prompt_logprobs_vs_fp32"] = lp_error(h_ids, h_lps, vllm_pl[0], vllm_pl[1])
        log(f"  head error ({key}): " + "; ".join(
            f"{name} max {e['max_nats']:.4f} / mean {e['mean_nats']:.4f} nat"
            for name, e in errs.items()))

    starts = np.cumsum([0] + [len(s) for s in seqs[:-1]])
    keep = np.concatenate([np.arange(len(s) - 1) + o for s, o in zip(seqs, starts)])
    if "vllm_pl" in paths:
        got = attempt("vllm_pl", lambda: bench_vllm_prompt_logprobs(teacher, seqs, repeats, ref))
        if got:
            # vLLM's prompt position p (p >= 1) is HF row p - 1; the last HF row has no counterpart
            starts = np.cumsum([0] + [len(s) for s in seqs[:-1]])
            keep = np.concatenate([np.arange(len(s) - 1) + o for s, o in zip(seqs, starts)])
            vllm_pl = [np.concatenate([a[j] for a in got[1]]) for j in range(3)]
            compare("vllm_pl", *vllm_pl, keep=keep)

    for key, dtype, scoring in (("vllm_hidden_bf16", "bfloat16", "hidden"),
                                ("vllm_hidden_float32", "float32", "hidden"),
                                ("vllm_backend_pl", "bfloat16", "prompt_logprobs")):
        if key not in paths:
            continue
        got = attempt(key, lambda: bench_vllm_backend(teacher, seqs, repeats, ref, dtype=dtype,
                                                      scoring=scoring))
        if not got:
            continue
        res, out, diag = got
        bad = [i for i, (s, sl) in enumerate(zip(seqs, out)) if sl.topk_ids.shape != (len(s), K)]
        if bad:
            R["problems"].append(f"{key}: {len(bad)} sequences with wrong top-k shapes "
                                 f"(e.g. {out[bad[0]].topk_ids.shape} for {len(seqs[bad[0]])} tokens)")
        else:
            compare(key, stack(out, "topk_ids"), stack(out, "topk_logprobs"), stack(out, "target_logprobs"))
            head_errors(key, dtype, out, diag)
        if diag.get("encode"):
            R["diag"][f"encode_{dtype}"] = diag["encode"]
            log(f"  encode only: {diag['encode']['best']:,.0f} tok/s best")
        if diag.get("hidden") is not None:
            try:
                dt = "bf16" if dtype == "bfloat16" else "fp32"
                head = bench_head(diag["hidden"], diag["head"], seqs, repeats,
                                  chunks=(512, 2048) if dt == "bf16" else (512,))
                labels = {"per_sequence": f"per sequence, as VLLMBackend does, {dt}",
                          "concat_512": f"sequences concatenated, chunk_rows=512, {dt}",
                          "concat_2048": f"sequences concatenated, chunk_rows=2048, {dt}"}
                if "head_alive" in diag:
                    head["alive"] = diag["head_alive"]["per_sequence"]
                labels["alive"] = f"per sequence, measured while the vLLM engine is still up, {dt}"
                for k2, v in head.items():
                    v["label"], v["parent"] = labels[k2], key
                    log(f"  head only ({labels[k2]}): {v['best']:,.0f} tok/s best")
                    R["diag"].setdefault("head", {})[f"{k2}_{dt}"] = v
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                R["problems"].append(f"head diagnostic failed: `{err_text(e)}`")
        del diag, got, out
        gc.collect()

    if any(p.startswith("vllm") for p in paths):
        attempt("ref_end", lambda: timed(ref.run, tokens=ref.tokens, repeats=repeats, warmup=0)[0])

    R["total_seconds"] = time.time() - _T0
    R["load_end"] = os.getloadavg()[0]
    body = markdown(json.loads(json.dumps(R, default=float)))
    print("\n" + body, flush=True)
    if R["problems"]:
        print("Problems seen:\n" + "\n".join(f"- {p}" for p in R["problems"]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(R, indent=1, default=float))
    if write:
        path = write_benchmarks_md(R, body, command)
        log(f"wrote {path}")
    log(f"done in {R['total_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
