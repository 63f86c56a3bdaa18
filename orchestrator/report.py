"""The experiment report: `report.json`, `report.md` and PNG plots (loss curves; student vs.
teacher metrics) comparing the KD student with the baselines on the held-out split.

"% of the gap recovered" = (NLL of the from-scratch hard-label student − NLL of the student) /
(NLL of the hard-label student − NLL of the teacher), on the same held-out positions.
"""

from __future__ import annotations

import json
import os
import tempfile

from orchestrator.evaluate import gap_recovered
from orchestrator.manifest import filesystem

NAMES = {"kd": "KD (soft labels)", "hard": "hard labels", "bc": "behaviour cloning"}


def summarise(results: dict) -> dict:
    """label → the final held-out metrics, with the gap recovered against the hard baseline."""
    rows = {}
    scratch = results.get("hard")
    for label, r in results.items():
        f = r.final
        row = {"model_dir": r.model_dir, "wall_s": round(r.wall_s, 1), "steps": f.get("step"),
               "tokens_per_s": f.get("tokens_per_s"), "data_wait_share": _mean_wait(r.history)}
        for key in ("eval_student_nll", "eval_student_ppl", "eval_teacher_nll", "eval_teacher_ppl",
                    "eval_kl", "eval_top1"):
            if key in f:
                row[key.removeprefix("eval_")] = f[key]
        if scratch is not None and "student_nll" in row and "eval_student_nll" in scratch.final:
            row["gap_recovered"] = gap_recovered(
                student_nll=row["student_nll"], scratch_nll=scratch.final["eval_student_nll"],
                teacher_nll=row["teacher_nll"])
        rows[label] = row
    return rows


def _mean_wait(history: list[dict]) -> float | None:
    times = sum(h.get("step_time_s", 0.0) for h in history)
    waits = sum(h.get("data_wait_s", 0.0) for h in history)
    return waits / times if times else None


def write_report(out_uri: str, *, results: dict, settings: dict) -> str:
    """Write report.json, report.md and plots/ under `out_uri` (local or s3://); returns the
    Markdown report's location."""
    rows = summarise(results)
    report = {"students": rows, "settings": settings,
              "history": {label: r.history for label, r in results.items()}}
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "plots"))
        with open(os.path.join(tmp, "report.json"), "w") as f:
            json.dump(report, f, indent=1)
        plots = _plots(tmp, results, rows)
        with open(os.path.join(tmp, "report.md"), "w") as f:
            f.write(_markdown(rows, settings, plots))
        _upload(tmp, out_uri)
    return f"{out_uri.rstrip('/')}/report.md"


def _upload(local_dir: str, out_uri: str) -> None:
    import pyarrow.fs as pafs

    fs, root = filesystem(out_uri)
    fs.create_dir(root, recursive=True)
    pafs.copy_files(local_dir, root, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _markdown(rows: dict, settings: dict, plots: list[str]) -> str:
    tr = settings["train"]
    lines = [
        "# Distillation report", "",
        f"Teacher `{settings['teacher']}` (top-{settings['k']}, {settings['mode']} mode); student "
        f"{_shape(settings['student'])}; {tr['max_steps']} steps × {tr['batch_size']} × "
        f"{tr['grad_accum']} sequences per worker, {max(tr['num_workers'], 1)} worker(s), seed "
        f"{tr['seed']}; KD loss {tr['loss']} at T={tr['temperature']}, alpha={tr['alpha']}, "
        f"tail={tr['tail']}.", "",
        "Held-out split, teacher-scored. NLL in nats/token; KL(teacher‖student) over the teacher's "
        "top-k + tail; top-1 = the student's argmax is the teacher's.", "",
        "| student | NLL | perplexity | teacher NLL | KL | top-1 | gap recovered | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, r in rows.items():
        gap = r.get("gap_recovered")
        lines.append(
            f"| {NAMES.get(label, label)} | {_fmt(r.get('student_nll'), '.3f')} | "
            f"{_fmt(r.get('student_ppl'), '.1f')} | {_fmt(r.get('teacher_nll'), '.3f')} | "
            f"{_fmt(r.get('kl'), '.3f')} | {_fmt(r.get('top1'), '.1%')} | "
            f"{_fmt(None if gap is None else 100 * gap, '.0f')}{'%' if gap is not None else ''} | "
            f"{r['wall_s']:.0f} |")
    lines += ["", "Captures: " + ", ".join(
        f"{k} {v['shards']} shards / {v['rows']} samples / {v['tokens']} tokens"
        for k, v in settings["captures"].items()), ""]
    for label, r in rows.items():
        lines.append(f"- {NAMES.get(label, label)}: `{r['model_dir']}` (Hugging Face directory)")
    lines.append("")
    lines += [f"![{os.path.splitext(os.path.basename(p))[0]}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _shape(student: dict) -> str:
    from orchestrator.student import resolve_shape

    s = resolve_shape(preset=student["preset"], layers=student["layers"], hidden=student["hidden"],
                      heads=student["heads"], intermediate=student["intermediate"])
    return f"{s.layers} layers × {s.hidden} hidden ({s.heads} heads, MLP {s.intermediate})"


def _plots(tmp: str, results: dict, rows: dict) -> list[str]:
    """plots/loss.png (training CE and held-out NLL per student over steps) and
    plots/metrics.png (held-out NLL, KL and top-1 per student, teacher NLL as a line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for label, r in results.items():
        steps = [h["step"] for h in r.history]
        ax1.plot(steps, [h["ce"] for h in r.history], label=NAMES.get(label, label))
        ev = [h for h in r.history if "eval_student_nll" in h]
        if ev:
            ax2.plot([h["step"] for h in ev], [h["eval_student_nll"] for h in ev], marker="o",
                     label=NAMES.get(label, label))
    teacher = next((r.get("teacher_nll") for r in rows.values() if r.get("teacher_nll")), None)
    if teacher is not None:
        ax2.axhline(teacher, color="black", linestyle="--", label="teacher")
    ax1.set(title="training cross-entropy (hard labels)", xlabel="step", ylabel="nats/token")
    ax2.set(title="held-out NLL", xlabel="step", ylabel="nats/token")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(tmp, "plots", "loss.png"), dpi=110)
    plt.close(fig)
    out.append("plots/loss.png")

    evaluated = {k: v for k, v in rows.items() if "student_nll" in v}
    if evaluated:
        labels = [NAMES.get(k, k) for k in evaluated]
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
        for ax, key, title in zip(axes, ("student_nll", "kl", "top1"),
                                  ("held-out NLL (nats/token)", "KL(teacher‖student)",
                                   "top-1 agreement")):
            ax.bar(labels, [v[key] for v in evaluated.values()], color="#4c72b0")
            if key == "student_nll":  # zoom in: the differences are tenths of a nat
                values = [v[key] for v in evaluated.values()] + ([teacher] if teacher else [])
                ax.set_ylim(min(values) - 0.3, max(values) + 0.2)
                if teacher is not None:
                    ax.axhline(teacher, color="black", linestyle="--", label="teacher")
                    ax.legend()
            ax.set_title(title)
            ax.tick_params(axis="x", labelrotation=15)
        fig.tight_layout()
        fig.savefig(os.path.join(tmp, "plots", "metrics.png"), dpi=110)
        plt.close(fig)
        out.append("plots/metrics.png")
    return out
