"""Student-training benchmark: KD step time and peak memory against plain cross-entropy (same
student, same batch, same run), measured here; the data-wait share of a streaming run and the
quality table, *read* from a finished run's report.json and cited with its path and date (this
benchmark does not train students). Writes the "## Training (issue 3)" section of BENCHMARKS.md, and
the "## Chunked KD + CE loss (issue 14)" section (the same measurements at a 128k vocabulary,
dense against chunked losses).

    python -m benchmarks.train                  # ~5 min on 2 CPUs
    python -m benchmarks.train --rounds 1       # smallest run
    python -m benchmarks.train --only chunked   # only the chunked-loss table at a 128k
                                                # vocabulary (issue 14; benchmarks/_train_chunked.py)
    python -m benchmarks.train --only packing   # only the packing table: tokens/s packed vs
                                                # padded on the demo's texts (issue 14;
                                                # benchmarks/_train_packing.py; ~3 min)
    python -m benchmarks.train --report PATH    # take the streaming/quality figures from that
                                                # report.json (default: the newest demo report
                                                # under runs/; none: the section says so)

Step timings are paired: every round times CE, then each KD variant, on the same batch; ratios
are medians over rounds. Peak memory: each variant runs one step in a fresh subprocess, after a
warm-up step and `malloc_trim`, and reports its RSS peak above the pre-step level.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import _train_chunked as chunked
from benchmarks import _train_packing as packing
from benchmarks._common import REPO, log, machine_facts, machine_line, peak_rss, write_section

SECTION = "## Training (issue 3)"
VOCAB, K, BATCH, SEQ = 32000, 64, 8, 256
VARIANTS = {
    "ce": "plain cross-entropy (F.cross_entropy)",
    "fkl": "forward KL, T=1, alpha=0.5",
    "rkl": "reverse KL, T=1, alpha=0.5",
    "jsd": "JSD(0.5), T=1, alpha=0.5",
    "tvd": "TVD, T=1, alpha=0.5",
    "fkl_t2": "forward KL, T=2, alpha=0.5",
    "fkl_tail": "forward KL, T=1, tail bucket",
    "dense": "reference: dense full-vocabulary KL (teacher [N, V] tensor)",
}


def _setup(seed: int = 0):
    """A 2 × 256 student over a 32k vocabulary and one batch with sparse top-64 teacher labels."""
    import torch

    from orchestrator.driver import tiny
    from orchestrator.kd.student import build_student
    from orchestrator.shapes import resolve_shape

    torch.manual_seed(seed)
    teacher_cfg = tiny.llama_config(VOCAB, layers=4, hidden=512, heads=8, max_positions=SEQ)
    model, _ = build_student(teacher_cfg, resolve_shape(preset="mini"), seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    teacher_logits = torch.randn(BATCH * SEQ, VOCAB) * 3
    t_lp = torch.log_softmax(teacher_logits, -1)
    top_lp, top_ids = t_lp.topk(K, dim=-1)
    targets = torch.cat([ids[:, 1:], torch.full((BATCH, 1), -100)], 1).reshape(-1)
    tail = (1 - top_lp.double().exp().sum(-1, keepdim=True)).float()  # the stored r_1
    batch = {"ids": ids, "targets": targets, "topk_ids": top_ids, "topk_logprobs": top_lp,
             "kd_mask": targets >= 0, "dense": t_lp, "tail_mass": tail,
             "tail_temperatures": torch.ones(1)}
    return model, opt, batch


def _step(variant: str, model, opt, batch) -> None:
    import torch
    import torch.nn.functional as F

    from orchestrator.kd.losses import distill_loss

    logits = model(input_ids=batch["ids"]).logits.reshape(-1, VOCAB)
    if variant == "ce":
        loss = F.cross_entropy(logits.float(), batch["targets"], ignore_index=-100)
    elif variant == "dense":
        lp = torch.log_softmax(logits.float(), -1)
        p = batch["dense"].exp()
        kl = (p * (batch["dense"] - lp)).sum(-1)
        ce = F.cross_entropy(logits.float(), batch["targets"], ignore_index=-100)
        loss = 0.5 * (kl * batch["kd_mask"]).sum() / batch["kd_mask"].sum() + 0.5 * ce
    else:
        kind = variant.split("_")[0]
        loss = distill_loss(logits, topk_ids=batch["topk_ids"],
                            topk_logprobs=batch["topk_logprobs"], targets=batch["targets"],
                            kd_mask=batch["kd_mask"], kind=kind, alpha=0.5,
                            temperature=2.0 if variant.endswith("t2") else 1.0,
                            tail="bucket" if variant.endswith("tail") else "renormalize",
                            tail_mass=batch["tail_mass"],
                            tail_temperatures=batch["tail_temperatures"]).total
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def step_times(rounds: int) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    model, opt, batch = _setup()
    for v in VARIANTS:  # warm-up
        _step(v, model, opt, batch)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(rounds):
        for v in VARIANTS:
            t = time.perf_counter()
            _step(v, model, opt, batch)
            times[v].append(time.perf_counter() - t)
        log(f"round {r + 1}/{rounds}: " + ", ".join(f"{v} {times[v][-1]:.3f}s" for v in VARIANTS))
    out = {}
    for v in VARIANTS:
        ratios = [a / c for a, c in zip(times[v], times["ce"])]
        out[v] = {"median_s": statistics.median(times[v]), "ratio": statistics.median(ratios)}
    return out


def _memory_child(variant: str) -> None:
    """Subprocess body: one warm-up step, trim the heap, then the measured step's RSS peak.
    `chunked:NAME` measures a variant of the chunked-loss table."""
    if variant.startswith("chunked:"):
        name = variant.split(":", 1)[1]
        model, opt, batch, head = chunked.setup()
        step = lambda: chunked.step(name, model, opt, batch, head)  # noqa: E731
    else:
        model, opt, batch = _setup()
        step = lambda: _step(variant, model, opt, batch)  # noqa: E731
    step()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base, peak, _ = peak_rss(step, interval_s=0.001)
    print(json.dumps({"base_mib": base / 2**20, "peak_mib": (peak - base) / 2**20}))


def peak_memory(variants=VARIANTS, prefix: str = "") -> dict:
    out = {}
    for v in variants:
        run = subprocess.run([sys.executable, "-m", "benchmarks.train", "--memory-child",
                              prefix + v],
                             capture_output=True, text=True, cwd=REPO, timeout=600)
        line = [x for x in run.stdout.splitlines() if x.startswith("{")]
        out[v] = json.loads(line[-1]) if line else {"error": run.stderr[-500:]}
        log(f"memory {v}: {out[v]}")
    return out


def streaming_and_quality(report_path: Path | None) -> dict | None:
    """Data-wait share while the capture ran, and the quality table, from a run's report.json."""
    if report_path is None:
        found = sorted(Path(REPO / "runs").glob("*/experiments/*/report.json"),
                       key=lambda p: p.stat().st_mtime)
        if not found:
            return None
        report_path = found[-1]
    report = json.loads(report_path.read_text())
    capture_dir = Path(report["settings"]["captures"]["capture"]["dir"])
    manifest = json.loads((capture_dir / "manifest.json").read_text())
    kd = report["history"].get("kd", [])
    during = [h for h in kd if h["time"] <= manifest["updated"]]
    share = (sum(h["data_wait_s"] for h in during) / sum(h["step_time_s"] for h in during)
             if during else None)
    after = [h for h in kd if h["time"] > manifest["updated"]]
    share_after = (sum(h["data_wait_s"] for h in after) / sum(h["step_time_s"] for h in after)
                   if after else None)
    finished = max((h["time"] for rows in report["history"].values() for h in rows),
                   default=report_path.stat().st_mtime)
    return {"report": str(report_path), "finished": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                  time.gmtime(finished)),
            "wait_share_while_capturing": share,
            "rows_while_capturing": len(during), "wait_share_after": share_after,
            "streamed": report["settings"].get("streaming", {}).get("streamed"),
            "students": report["students"], "settings": report["settings"]}


def markdown(R: dict) -> str:
    st, mem = R["steps"], R["memory"]
    lines = [SECTION, "",
             f"Command: `{R['command']}` (from the repository root). Date: {R['date']}. "
             + machine_line(R["machine"], load_end=R.get("load_end")), "",
             f"### KD step vs. cross-entropy ({R['rounds']} paired rounds)", "",
             f"Student 2 × 256 (preset `mini`), vocabulary {VOCAB:,}, batch {BATCH} × {SEQ} tokens, "
             f"top-{K} teacher labels; a step = forward, loss, backward, AdamW. Peak memory = RSS "
             "above the pre-step level during one step (fresh process per variant).", "",
             "| variant | step s (median) | × CE | step peak MiB | × CE |", "|---|---|---|---|---|"]
    ce_mem = mem.get("ce", {}).get("peak_mib")
    for v, name in VARIANTS.items():
        m = mem.get(v, {}).get("peak_mib")
        lines.append(f"| {name} | {st[v]['median_s']:.3f} | {st[v]['ratio']:.3f} | "
                     f"{'–' if m is None else f'{m:.0f}'} | "
                     f"{'–' if m is None or not ce_mem else f'{m / ce_mem:.2f}'} |")
    lines.append("")
    q = R.get("run")
    if q is None:
        lines += ["No run's report.json was given or found under runs/: no streaming or quality "
                  "figures (this benchmark does not train students; run `raydistill demo`, then "
                  "this benchmark, or pass --report).", ""]
        return "\n".join(lines)
    share, after = q["wait_share_while_capturing"], q["wait_share_after"]
    pct = lambda x: "–" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    tr = q["settings"].get("train", {})
    lines += [f"The two sections below are not measured by this benchmark: they are read from "
              f"`{q['report']}`, the report of experiment {q['settings'].get('experiment', '?')} "
              f"(finished {q['finished']}; students {tr.get('max_steps', '?')} steps × "
              f"{tr.get('batch_size', '?')} × {tr.get('grad_accum', '?')} sequences, teacher "
              f"{q['settings'].get('teacher', '?')}).", "",
              "### Streaming data wait", "",
              f"From that report (KD student trained while the capture ran: "
              f"{q['rows_while_capturing']} progress reports before the last shard). Share of step "
              f"time waiting for data while capturing: **{pct(share)}**; after the capture: "
              f"{pct(after)}.",
              "", "### Quality (held-out, teacher-scored)", "",
              "| student | NLL nats/token | teacher NLL | KL(teacher‖student) | top-1 | gap recovered |",
              "|---|---|---|---|---|---|"]
    for label, r in q["students"].items():
        gap = r.get("gap_recovered")
        lines.append(f"| {label} | {r.get('student_nll', float('nan')):.3f} | "
                     f"{r.get('teacher_nll', float('nan')):.3f} | {r.get('kl', float('nan')):.3f} | "
                     f"{100 * r.get('top1', float('nan')):.1f}% | "
                     f"{'–' if gap is None else f'{100 * gap:.0f}%'} |")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--report", type=Path, default=None)
    ap.add_argument("--only", choices=("kd", "chunked", "packing"), default=None,
                    help="run one table: kd (issue 3, 32k vocabulary), chunked or packing "
                         "(issue 14)")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        _memory_child(args.memory_child)
        return
    R = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rounds": args.rounds,
         "machine": machine_facts(),
         "command": "python -m benchmarks.train" + "".join(
             f" {a}" for a in sys.argv[1:] if not a.startswith("--memory-child"))}
    (REPO / "benchmarks" / "results").mkdir(exist_ok=True)
    if args.only in (None, "kd"):
        log("step times (paired rounds)")
        R["steps"] = step_times(args.rounds)
        log("peak memory (one subprocess per variant)")
        R["memory"] = peak_memory()
        R["run"] = streaming_and_quality(args.report)
        R["load_end"] = os.getloadavg()[0]
        text = markdown(R)
        print(text)
        log(f"wrote {write_section(SECTION, text)}")
        (REPO / "benchmarks" / "results" / "train.json").write_text(json.dumps(R, indent=1,
                                                                               default=str))
    if args.only in (None, "chunked"):
        C = {key: R[key] for key in ("date", "rounds", "command")}
        C["machine"] = machine_facts()
        log("chunked loss, 128k vocabulary: step times (paired rounds)")
        C["steps"] = chunked.step_times(args.rounds)
        log("chunked loss: peak memory (one subprocess per variant)")
        C["memory"] = peak_memory([v for v in chunked.VARIANTS if not v.endswith("_rc")],
                                  prefix="chunked:")
        text = chunked.markdown(C, machine_line(C["machine"], load_end=os.getloadavg()[0]))
        print(text)
        log(f"wrote {write_section(chunked.SECTION, text)}")
        (REPO / "benchmarks" / "results" / "train_chunked.json").write_text(
            json.dumps(C, indent=1, default=str))
    if args.only in (None, "packing"):
        P = {key: R[key] for key in ("date", "rounds", "command")} | {"machine": machine_facts()}
        log("packing: tokens/s packed vs padded on the demo's texts (paired rounds)")
        P["packing"] = packing.measure(args.rounds)
        text = packing.markdown(P, machine_line(P["machine"], load_end=os.getloadavg()[0]))
        print(text)
        log(f"wrote {write_section(packing.SECTION, text)}")
        packing.save(P, REPO / "benchmarks" / "results" / "train_packing.json")


if __name__ == "__main__":
    main()
