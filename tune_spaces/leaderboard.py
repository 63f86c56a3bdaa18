"""The sweep's leaderboard: `leaderboard.csv`, `leaderboard.md`, `pareto.png` and `winners.json`
in the sweep directory.

Every trial is a row (finished, stopped early by ASHA, or failed) with its student size,
parameters (counted from the shape for trials that exported no model), held-out metrics and — for
finished students — the latency per generated token measured on this machine (greedy decoding,
batch 1, `torch.get_num_threads()` threads). Winners are the Pareto front of (metric, parameters,
latency) among finished students, best metric first, or simply the best `top` by the metric;
`raydistill serve SWEEP_DIR` hosts them. The Pareto plot shows every trial with its status.
"""

from __future__ import annotations

import csv
import functools
import io
import math
import os
import statistics
import time

from orchestrator.storage import write_atomic_local
from orchestrator.winners import write_winners

COLUMNS = ("rank", "id", "status", "layers", "hidden", "params_m", "loss", "temperature",
           "alpha", "beta", "lr", "step", "eval_kl", "eval_student_nll", "eval_top1",
           "eval_teacher_nll", "latency_ms_per_token", "wall_s", "pareto", "winner",
           "model_dir", "trial_id", "error")
LATENCY_PROMPT = "def main(argv=None):\n    \"\"\"Parse the command line and"
METRIC_WORDS = {"eval_kl": "held-out KL(teacher ‖ student), nats/token",
                "eval_student_nll": "held-out NLL, nats/token",
                "eval_top1": "held-out top-1 agreement with the teacher"}
"""Axis labels in words for the metrics a sweep can rank by."""


def measure(model_dir: str, *, tokens: int, repeats: int = 5) -> dict:
    """Parameters and greedy-decoding latency (ms per generated token, median of `repeats` after
    two warm-up calls) of one exported student."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from orchestrator.teacher_info import load_tokenizer

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True,
                                                 dtype=torch.float32).eval()
    tok = load_tokenizer(model_dir, what="student")
    ids = tok(LATENCY_PROMPT, return_tensors="pt").input_ids
    times = []
    with torch.inference_mode():
        for i in range(repeats + 2):
            t0 = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                           min_new_tokens=tokens, do_sample=False,
                           pad_token_id=tok.pad_token_id or tok.eos_token_id)
            if i >= 2:  # the first calls warm up kernels and the allocator
                times.append((time.perf_counter() - t0) * 1000 / tokens)
    return {"params": model.num_parameters(), "latency_ms_per_token": statistics.median(times)}


def shape_params(teacher_model: str, shape: dict) -> int:
    """The parameters of a student of this shape (layers, hidden, heads, intermediate), without
    weights: built on PyTorch's meta device. For trials that stopped before exporting a model."""
    import torch
    from transformers import AutoModelForCausalLM

    from orchestrator.shapes import StudentShape
    from orchestrator.kd.student import student_config

    fields = {k: int(shape[k]) for k in ("layers", "hidden", "heads", "intermediate")}
    cfg = student_config(_teacher_config(teacher_model), StudentShape(**fields))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return model.num_parameters()


@functools.lru_cache(maxsize=4)
def _teacher_config(teacher_model: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(teacher_model)


def build_rows(outcomes: list, *, metric: str, mode: str, measured: dict) -> list[dict]:
    """One row per trial, ranked: finished by metric, then stopped by metric, then failed.
    `measured`: by trial name, `measure`'s dict (or only its `params`)."""
    rows = []
    for o in outcomes:
        st = o.settings
        m = measured.get(o.label, {})
        rows.append({
            "id": o.label, "trial_id": o.trial_id, "status": o.status,
            "layers": st.get("layers"), "hidden": st.get("hidden"),
            "params_m": round(m["params"] / 1e6, 3) if "params" in m else None,
            "loss": st.get("loss"), "temperature": st.get("temperature"),
            "alpha": st.get("alpha"), "beta": st.get("beta"), "lr": st.get("lr"),
            "step": o.metrics.get("step"),
            "eval_kl": o.metrics.get("eval_kl"),
            "eval_student_nll": o.metrics.get("eval_student_nll"),
            "eval_top1": o.metrics.get("eval_top1"),
            "eval_teacher_nll": o.metrics.get("eval_teacher_nll"),
            "latency_ms_per_token": m.get("latency_ms_per_token"),
            "wall_s": o.metrics.get("wall_s"), "model_dir": o.model_dir, "error": o.error,
            "metric": o.metrics.get(metric),
        })
    sign = 1 if mode == "min" else -1
    order = {"finished": 0, "stopped": 1, "error": 2}
    rows.sort(key=lambda r: (order[r["status"]],
                             sign * r["metric"] if _num(r["metric"]) else math.inf))
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
    return rows


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not math.isnan(x)


def pareto_front(rows: list[dict], *, mode: str) -> list[dict]:
    """Finished rows no other finished row beats on metric, parameters and latency at once."""
    sign = 1 if mode == "min" else -1
    done = [r for r in rows if r["status"] == "finished" and _num(r["metric"])
            and r["params_m"] is not None and r["latency_ms_per_token"] is not None]

    def key(r):
        return (sign * r["metric"], r["params_m"], r["latency_ms_per_token"])

    def dominates(a, b):
        ka, kb = key(a), key(b)
        return all(x <= y for x, y in zip(ka, kb)) and ka != kb

    return [r for r in done if not any(dominates(o, r) for o in done if o is not r)]


def write_leaderboard(sweep_dir: str, rows: list[dict], *, metric: str, mode: str,
                      winners: str, top: int, title: str) -> dict:
    """Write the four files; returns their paths and the winners' ids."""
    front = pareto_front(rows, mode=mode)
    front_ids = {r["id"] for r in front}
    finished = [r for r in rows if r["status"] == "finished" and r["model_dir"]]
    chosen = [r for r in finished if r["id"] in front_ids] if winners == "pareto" else finished
    chosen = chosen[:top]
    for r in rows:
        r["pareto"] = r["id"] in front_ids
        r["winner"] = any(r is c for c in chosen)
    paths = {"csv": os.path.join(sweep_dir, "leaderboard.csv"),
             "md": os.path.join(sweep_dir, "leaderboard.md"),
             "png": os.path.join(sweep_dir, "pareto.png")}
    _write_csv(paths["csv"], rows)
    _write_md(paths["md"], rows, metric=metric, mode=mode, title=title, winners=winners)
    _plot(paths["png"], rows, metric=metric)
    paths["winners"] = write_winners(sweep_dir, [
        {"id": r["id"], "path": os.path.relpath(r["model_dir"], sweep_dir), "rank": n,
         "params": int(r["params_m"] * 1e6) if r["params_m"] is not None else None,
         "latency_ms_per_token": r["latency_ms_per_token"],
         "metrics": {k: r[k] for k in ("eval_kl", "eval_student_nll", "eval_top1") if r[k] is not None},
         "trial_id": r["trial_id"]}
        for n, r in enumerate(chosen, start=1)], metric=metric, mode=mode)
    paths["winner_ids"] = [r["id"] for r in chosen]
    return paths


def _write_csv(path: str, rows: list[dict]) -> None:
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_atomic_local(path, text.getvalue())


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _write_md(path: str, rows: list[dict], *, metric: str, mode: str, title: str,
              winners: str) -> None:
    teacher = next((r["eval_teacher_nll"] for r in rows if r["eval_teacher_nll"] is not None), None)
    lines = [f"# Leaderboard — {title}", "",
             f"Ranked by held-out `{metric}` ({'lower' if mode == 'min' else 'higher'} is better)"
             + (f"; teacher NLL {teacher:.3f} nats/token" if teacher is not None else "") + ". "
             f"Latency: greedy decoding, batch 1, on this machine. Winners: "
             f"{'the Pareto front (metric vs parameters vs latency)' if winners == 'pareto' else 'the best by the metric'}"
             " — `raydistill serve` hosts them.", "",
             "| rank | id | status | size | params (M) | loss | T | α | step | KL | NLL | top-1 "
             "| ms/token | Pareto | winner |",
             "|---:|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|:-:|:-:|"]
    for r in rows:
        size = f"{r['layers']}×{r['hidden']}" if r["layers"] else "–"
        status = r["status"] if r["status"] != "error" else f"error: {r['error']}"
        lines.append(
            f"| {r['rank']} | {r['id']} | {status} | {size} | {_fmt(r['params_m'])} | "
            f"{_fmt(r['loss'])} | {_fmt(r['temperature'])} | {_fmt(r['alpha'], 3)} | "
            f"{_fmt(r['step'])} | {_fmt(r['eval_kl'])} | {_fmt(r['eval_student_nll'])} | "
            f"{_fmt(r['eval_top1'], 3)} | {_fmt(r['latency_ms_per_token'], 3)} | "
            f"{'★' if r['pareto'] else ''} | {'✓' if r['winner'] else ''} |")
    lines += ["", "Files: `leaderboard.csv` (every column), `pareto.png`, `winners.json`, "
              "`trials/<id>/model/` (Hugging Face directories).", ""]
    write_atomic_local(path, "\n".join(lines))


def _plot(path: str, rows: list[dict], *, metric: str) -> None:
    import matplotlib.pyplot as plt

    fig = pareto_figure(rows, metric=metric)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    write_atomic_local(path, png.getvalue())


def pareto_figure(rows: list[dict], *, metric: str):
    """Quality against size and against latency, every trial with its status: finished (★ on the
    Pareto front), stopped early (its last evaluation; no latency: it exported no model), failed
    (named in the caption)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finished = [r for r in rows if r["status"] == "finished" and _num(r["metric"])]
    stopped = [r for r in rows if r["status"] == "stopped" and _num(r["metric"])]
    failed = [r for r in rows if r["status"] == "error"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    for ax, xkey, xlabel in ((axes[0], "params_m", "parameters (millions)"),
                             (axes[1], "latency_ms_per_token", "latency (ms/token, batch 1)")):
        for r in (r for r in stopped if r[xkey] is not None):
            ax.scatter(r[xkey], r["metric"], s=40, marker="v", facecolors="none",
                       edgecolors="tab:blue", zorder=2, label="stopped early (last evaluation)")
            ax.annotate(f"{r['id']} (step {r['step']})", (r[xkey], r["metric"]), fontsize=7,
                        xytext=(4, -9), textcoords="offset points", color="tab:blue")
        for r in (r for r in finished if r[xkey] is not None):
            star = r["pareto"]
            ax.scatter(r[xkey], r["metric"], s=70 if star else 35,
                       c="tab:red" if star else "tab:gray", marker="*" if star else "o",
                       zorder=3 if star else 2, label="Pareto front" if star else "finished")
            ax.annotate(r["id"], (r[xkey], r["metric"]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
        front = sorted((r for r in finished if r["pareto"] and r[xkey] is not None),
                       key=lambda r: r[xkey])
        if len(front) > 1:
            ax.plot([r[xkey] for r in front], [r["metric"] for r in front], c="tab:red",
                    lw=1, alpha=0.6)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(METRIC_WORDS.get(metric, f"held-out {metric}"))
        ax.grid(alpha=0.3)
        if not ax.collections:
            ax.text(0.5, 0.5, "no trial to show", ha="center", va="center",
                    transform=ax.transAxes)
    handles = dict(zip(*reversed(axes[0].get_legend_handles_labels())))
    if handles:
        axes[0].legend(handles.values(), handles.keys(), fontsize=8, loc="best")
    axes[0].set_title("quality vs size (★ Pareto front)")
    axes[1].set_title("quality vs latency (finished students)")
    counts = (f"{len(rows)} trials: {sum(r['status'] == 'finished' for r in rows)} finished, "
              f"{sum(r['status'] == 'stopped' for r in rows)} stopped early, {len(failed)} failed")
    if failed:
        counts += " — failed: " + ", ".join(r["id"] for r in failed)
    fig.text(0.01, 0.01, counts, fontsize=8, ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig
