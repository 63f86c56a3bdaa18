"""The students a run offers for serving, and where to find them.

A sweep writes `winners.json` in its directory (`output_dir/sweeps/<sweep>/`):

    {"format": "raydistill.winners", "version": 1, "metric": "eval_kl", "mode": "min",
     "models": [{"id": "t0003-2x256-fkl-T2", "path": "trials/t0003/model", "rank": 1,
                 "params": 1234567, "latency_ms_per_token": 3.1,
                 "metrics": {"eval_kl": 0.52, ...}, "settings": {"student.hidden": 256, ...}}]}

(`path` relative to the sweep directory, or absolute). `find_models(run_dir)` accepts what a user is
likely to point at: a sweep directory, an experiment directory (`output_dir/experiments/<exp>/`
with its `report.json`; students `kd`, `bc`, `hard`), a Hugging Face model directory, or a whole
`output_dir` (its newest sweep, else its newest experiment).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from orchestrator.errors import RaydistillError

WINNERS_FILE = "winners.json"
FORMAT = "raydistill.winners"
VERSION = 1


@dataclass(frozen=True)
class ServedModel:
    id: str
    """The model name clients pass (`model` in the OpenAI API)."""
    path: str
    """Absolute path of a Hugging Face model directory (config, safetensors, tokenizer)."""
    rank: int = 1
    metrics: dict = field(default_factory=dict)


def write_winners(sweep_dir: str, models: list[dict], *, metric: str, mode: str) -> str:
    """Write `winners.json` atomically; `models` are dicts as in the module docstring."""
    path = os.path.join(sweep_dir, WINNERS_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"format": FORMAT, "version": VERSION, "metric": metric, "mode": mode,
                   "models": models}, f, indent=1)
    os.replace(tmp, path)
    return path


def find_models(run_dir: str, *, top: int | None = None) -> list[ServedModel]:
    """The servable students under `run_dir`, best first (at most `top`)."""
    root = os.path.abspath(os.path.expanduser(run_dir))
    if not os.path.isdir(root):
        raise RaydistillError(f"{run_dir} is not a directory; pass a sweep directory "
                              "(output_dir/sweeps/<name>), an experiment directory, a model "
                              "directory or an output_dir")
    models = _from_dir(root)
    if not models:
        raise RaydistillError(
            f"{run_dir} holds no finished students: expected {WINNERS_FILE} (a sweep), "
            "report.json (an experiment), config.json + weights (a model directory), or "
            "sweeps/ or experiments/ (an output_dir); run `raydistill tune` or `raydistill run` "
            "first")
    for m in models:
        if not os.path.isfile(os.path.join(m.path, "config.json")):
            raise RaydistillError(f"model {m.id}: {m.path} is not a Hugging Face model directory "
                                  "(no config.json); was the run finished?")
    return models[:top] if top else models


def _from_dir(root: str) -> list[ServedModel]:
    if os.path.isfile(os.path.join(root, WINNERS_FILE)):
        return _from_winners(root)
    if os.path.isfile(os.path.join(root, "report.json")):
        return _from_report(root)
    if os.path.isfile(os.path.join(root, "config.json")):
        return [ServedModel(id=os.path.basename(root.rstrip("/")), path=root)]
    for sub in ("sweeps", "experiments"):
        newest = _newest(os.path.join(root, sub))
        if newest is not None:
            found = _from_dir(newest)
            if found:
                return found
    return []


def _from_winners(root: str) -> list[ServedModel]:
    path = os.path.join(root, WINNERS_FILE)
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise RaydistillError(f"{path} is not readable JSON ({e}); rerun the sweep's "
                              "leaderboard step: `raydistill tune CONFIG --resume SWEEP`") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise RaydistillError(f"{path} is not a raydistill winners file")
    out = []
    for n, m in enumerate(doc.get("models", []), start=1):
        p = m["path"] if os.path.isabs(m["path"]) else os.path.join(root, m["path"])
        out.append(ServedModel(id=m["id"], path=p, rank=m.get("rank", n),
                               metrics=m.get("metrics", {})))
    return sorted(out, key=lambda m: m.rank)


_REPORT_ORDER = ("kd", "bc", "hard")


def _from_report(root: str) -> list[ServedModel]:
    with open(os.path.join(root, "report.json")) as f:
        students = json.load(f).get("students", {})
    labels = [lab for lab in _REPORT_ORDER if lab in students]
    labels += sorted(lab for lab in students if lab not in _REPORT_ORDER)
    out = []
    for rank, label in enumerate(labels, start=1):
        path = os.path.join(root, label, "model")
        if os.path.isdir(path):
            metrics = {k: v for k, v in students[label].items() if isinstance(v, (int, float))}
            out.append(ServedModel(id=label, path=path, rank=rank, metrics=metrics))
    return out


def _newest(parent: str) -> str | None:
    if not os.path.isdir(parent):
        return None
    subs = [os.path.join(parent, d) for d in os.listdir(parent)
            if os.path.isdir(os.path.join(parent, d))]
    return max(subs, key=os.path.getmtime) if subs else None
