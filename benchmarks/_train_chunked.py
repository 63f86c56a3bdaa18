"""The chunked-loss table of `python -m benchmarks.train` (issue 14): at a 128k vocabulary, the step
time and peak memory of cross-entropy (dense, and chunked with alpha = 0), today's dense KD loss and
the chunked KD loss (kd/chunked.py), at T = 1 and T = 2, and the chunked loss's agreement with the
dense one. Same method as the issue-3 table: paired rounds (every round times each variant on the
same batch), ratios are medians of per-round ratios; peak memory is one step's RSS above the
pre-step level in a fresh process per variant."""

from __future__ import annotations

import statistics
import time

from benchmarks._common import log
from orchestrator.kd.chunked import CHUNK_BYTES

SECTION = "## Chunked KD + CE loss (issue 14)"
VOCAB, K, BATCH, SEQ, PRESET = 128256, 64, 2, 256, "mini"
VARIANTS = {
    "ce_dense": "CE, dense (F.cross_entropy on model(x).logits)",
    "ce_chunked": "CE, chunked (chunked_distill_loss, alpha=0)",
    "kd_dense_t1": "fKL + CE, T=1, dense (distill_loss on the logits, today's path)",
    "kd_chunked_t1": "fKL + CE, T=1, chunked",
    "kd_dense_t2": "fKL + CE, T=2, dense (today's path)",
    "kd_chunked_t2": "fKL + CE, T=2, chunked",
    "kd_chunked_t2_rc": "diag: fKL + CE, T=2, chunked, logits recomputed in backward",
}


def setup(seed: int = 0):
    """A 2 × 256 student (preset mini) over a 128k vocabulary, untied head; one batch of 2 × 256
    tokens with top-64 teacher labels (from random teacher logits, freed before any timing)."""
    import torch

    from orchestrator.driver import tiny
    from orchestrator.kd.head import lm_head
    from orchestrator.kd.student import build_student
    from orchestrator.shapes import resolve_shape

    torch.manual_seed(seed)
    teacher_cfg = tiny.llama_config(VOCAB, layers=4, hidden=512, heads=8, max_positions=SEQ)
    model, _ = build_student(teacher_cfg, resolve_shape(preset=PRESET), seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    top_lp, top_ids = torch.log_softmax(torch.randn(BATCH * SEQ, VOCAB) * 3, -1).topk(K, dim=-1)
    targets = torch.cat([ids[:, 1:], torch.full((BATCH, 1), -100)], 1).reshape(-1)
    batch = {"ids": ids, "labels": dict(topk_ids=top_ids, topk_logprobs=top_lp, targets=targets,
                                        kd_mask=targets >= 0)}
    return model, opt, batch, lm_head(model, probe_ids=ids[:1, :16])


def loss(variant: str, model, batch, head):
    """The variant's loss tensor (forward only)."""
    import torch.nn.functional as F

    from orchestrator.kd.chunked import chunked_distill_loss
    from orchestrator.kd.head import final_hidden
    from orchestrator.kd.losses import distill_loss

    T = 2.0 if "_t2" in variant else 1.0
    labels = batch["labels"]
    if "dense" in variant:
        logits = model(input_ids=batch["ids"]).logits.reshape(-1, VOCAB)
        if variant == "ce_dense":
            return F.cross_entropy(logits.float(), labels["targets"], ignore_index=-100)
        return distill_loss(logits, kind="fkl", temperature=T, alpha=0.5, **labels).total
    hidden = final_hidden(model, input_ids=batch["ids"])
    return chunked_distill_loss(hidden.reshape(-1, hidden.shape[-1]), **head.kwargs(),
                                kind="fkl", temperature=T,
                                alpha=0.0 if variant == "ce_chunked" else 0.5,
                                recompute=variant.endswith("_rc"), **labels).total


def step(variant: str, model, opt, batch, head) -> None:
    loss(variant, model, batch, head).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def agreement(model, batch, head) -> dict:
    """Chunked vs dense KD at T = 1 and 2 on the benchmark batch: |Δ loss| and, over every
    parameter, max |Δ grad| relative to that parameter's largest gradient entry."""
    out = {}
    for T in ("t1", "t2"):
        grads = []
        for way in ("dense", "chunked"):
            value = loss(f"kd_{way}_{T}", model, batch, head)
            value.backward()
            grads.append((value.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
            model.zero_grad(set_to_none=True)
        (ref, g_ref), (got, g_got) = grads
        rel = max(float((g_got[n] - g_ref[n]).abs().max() / g_ref[n].abs().max().clamp(min=1e-30))
                  for n in g_ref)
        out[T] = {"loss_dense": ref, "loss_chunked": got, "abs_diff": abs(got - ref),
                  "grad_rel_diff": rel}
        log(f"agreement {T}: {out[T]}")
    return out


def step_times(rounds: int) -> dict:
    """Per variant: the median CPU time of a step (process time, one torch thread) and the
    median of its per-round ratios to each CE, plus the median wall time.

    CPU time, one thread: on a shared machine whose load is many times its CPU count, wall times
    of the same step vary 2-5× from round to round (seen here: 9-50 s), while the CPU time a step
    consumes does not depend on how long it waited for a CPU; with one thread no OpenMP thread
    spins at a barrier waiting for a descheduled sibling (which would count as CPU time)."""
    import torch

    torch.set_num_threads(1)
    model, opt, batch, head = setup()
    agree = agreement(model, batch, head)
    for v in VARIANTS:  # warm-up
        step(v, model, opt, batch, head)
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    wall: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(rounds):
        for v in VARIANTS:
            c, t = time.process_time(), time.perf_counter()
            step(v, model, opt, batch, head)
            cpu[v].append(time.process_time() - c)
            wall[v].append(time.perf_counter() - t)
        log(f"chunked round {r + 1}/{rounds} (CPU s): "
            + ", ".join(f"{v} {cpu[v][-1]:.2f}" for v in VARIANTS))
    out: dict = {"agreement": agree}
    for v in VARIANTS:
        out[v] = {"median_s": statistics.median(cpu[v]), "wall_s": statistics.median(wall[v]),
                  "x_ce_dense": statistics.median(a / c for a, c in
                                                  zip(cpu[v], cpu["ce_dense"])),
                  "x_ce_chunked": statistics.median(a / c for a, c in
                                                    zip(cpu[v], cpu["ce_chunked"]))}
    return out


def markdown(R: dict, machine: str) -> str:
    st, mem, agree = R["steps"], R["memory"], R["steps"]["agreement"]
    peak = {v: mem.get(v, {}).get("peak_mib") for v in VARIANTS}
    lines = [SECTION, "",
             f"Command: `{R['command']}` (from the repository root). Date: {R['date']}. {machine}",
             "",
             f"Student 2 × 256 (preset `{PRESET}`, untied head) over a **{VOCAB:,}-token "
             f"vocabulary**, batch {BATCH} × {SEQ} tokens, top-{K} teacher labels, tail "
             "renormalize; a step = forward, loss, backward, AdamW. Chunked = "
             "`kd/head.py` `final_hidden` + `lm_head`, then `kd/chunked.py` "
             f"`chunked_distill_loss` (default chunk: {CHUNK_BYTES // 2**20} MiB of fp32 "
             f"logits = {max(16, CHUNK_BYTES // (4 * VOCAB))} rows). {R['rounds']} paired "
             "rounds; step time = CPU time of the step (process time, one torch thread: "
             "the machine is shared, its load often many times its CPU count, so wall "
             "times are shown but not compared); ratios are medians of per-round ratios. Peak memory = RSS "
             "above the pre-step level during one step (fresh process per variant).", "",
             "| variant | step CPU s (median) | × CE dense | × CE chunked | wall s (median) | "
             "step peak MiB | × CE dense | × CE chunked |", "|---|---|---|---|---|---|---|---|"]
    fmt = lambda m, base: "–" if m is None or not base else f"{m / base:.2f}"  # noqa: E731
    for v, name in VARIANTS.items():
        m = peak[v]
        lines.append(f"| {name} | {st[v]['median_s']:.3f} | {st[v]['x_ce_dense']:.3f} | "
                     f"{st[v]['x_ce_chunked']:.3f} | {st[v]['wall_s']:.1f} | "
                     f"{'–' if m is None else f'{m:.0f}'} | "
                     f"{fmt(m, peak['ce_dense'])} | {fmt(m, peak['ce_chunked'])} |")
    lines += ["", "Agreement of the chunked loss with the dense one (same model, same batch; "
              "gradient error = max over parameters of max |Δ grad| / max |grad|):", "",
              "| T | loss dense | loss chunked | \\|Δ loss\\| | gradient error |",
              "|---|---|---|---|---|"]
    for T, a in agree.items():
        lines.append(f"| {T[1]} | {a['loss_dense']:.6f} | {a['loss_chunked']:.6f} | "
                     f"{a['abs_diff']:.2e} | {a['grad_rel_diff']:.2e} |")
    lines += ["", "Targets (issue 14), against both CE baselines:", ""]
    for T in ("t1", "t2"):
        v = f"kd_chunked_{T}"
        for base in ("ce_dense", "ce_chunked"):
            x, m = st[v][f"x_{base}"], fmt(peak[v], peak[base])
            ok_m = "–" if m == "–" else ("met" if float(m) <= 1.05 else "missed")
            lines.append(f"- T = {T[1]}, vs {base.replace('_', ' ')}: step {x:.3f}× "
                         f"({'met' if x <= 1.05 else 'missed'}, ≤ 1.05×); peak memory {m}× "
                         f"({ok_m}, ≤ 1.05×); dense KD at this T: "
                         f"{fmt(peak[f'kd_dense_{T}'], peak[base])}× memory.")
    lines.append("")
    return "\n".join(lines)
