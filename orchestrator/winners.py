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
from orchestrator.names import EXPERIMENTS_DIR, SWEEPS_DIR
from orchestrator.program import command_name
from orchestrator.storage import write_atomic_local

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
    source: str = ""
    """Where it comes from, for messages: `experiment exp-…, 300 steps`, `sweep sweep-…`."""

    @property
    def heldout_nll(self) -> float | None:
        """Its held-out NLL (nats/token), from the report or the sweep's winners file."""
        value = self.metrics.get("eval_student_nll", self.metrics.get("student_nll"))
        return float(value) if isinstance(value, (int, float)) else None


def write_winners(sweep_dir: str, models: list[dict], *, metric: str, mode: str) -> str:
    """Write `winners.json` atomically; `models` are dicts as in the module docstring."""
    path = os.path.join(sweep_dir, WINNERS_FILE)
    write_atomic_local(path, json.dumps({"format": FORMAT, "version": VERSION, "metric": metric,
                                         "mode": mode, "models": models}, indent=1))
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


def models_of(run_dirs: list[str]) -> tuple[list[ServedModel], list[str], list[str]]:
    """(`best_first` of the models the directories of `run_dirs` hold, the directories that
    hold some, a note for each that holds none); an error if none holds any."""
    groups, held, notes = [], [], []
    for d in run_dirs:
        try:
            groups.append(find_models(d))
            held.append(d)
        except RaydistillError as e:
            if len(run_dirs) == 1:
                raise
            notes.append(f"  nothing to serve from {d}: {e}")
    if not groups:
        raise RaydistillError("no finished students to serve: " + "; ".join(n.strip()
                                                                            for n in notes))
    return best_first(groups), held, notes


def best_first(groups: list[list[ServedModel]]) -> list[ServedModel]:
    """The models of several run directories (an experiment's students, a sweep's winners) in one
    list, best first by held-out NLL; those without one keep their order, after the others."""
    models = [m for group in groups for m in group]
    ids = [m.id for m in models]
    if len(set(ids)) < len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise RaydistillError(f"two models are both named {dup!r}; serve their run directories "
                              "one at a time (`raydistill serve RUN_DIR`)")
    ranked = sorted((m for m in models if m.heldout_nll is not None), key=lambda m: m.heldout_nll)
    return ranked + [m for m in models if m.heldout_nll is None]


def describe(m: ServedModel) -> str:
    """`kd (experiment exp-…, 300 steps): held-out NLL 4.756`."""
    nll = m.heldout_nll
    return (f"{m.id}" + (f" ({m.source})" if m.source else "")
            + (f": held-out NLL {nll:.3f}" if nll is not None else ": no held-out NLL recorded"))


def why_served(served: list[ServedModel], *, found: list[ServedModel],
               dirs: list[str]) -> list[str]:
    """Lines saying which models of `dirs` are served and which are not, with their held-out
    NLL, and how to serve each directory again."""
    lines = [f"  served: {describe(m)}" for m in served]
    lines += [f"  not served: {describe(m)}" for m in found[len(served):]]
    if len(dirs) > 1:
        lines.append("  (best first by held-out NLL; a sweep's trials are scored on the first "
                     "tune.eval_samples of the same held-out sequences)")
    lines += [f"  `{command_name()} serve {d}` serves {'them' if len(dirs) == 1 else 'its models'} "
              "until Ctrl-C" for d in dirs]
    return lines


def _from_dir(root: str) -> list[ServedModel]:
    if os.path.isfile(os.path.join(root, WINNERS_FILE)):
        return _from_winners(root)
    if os.path.isfile(os.path.join(root, "report.json")):
        return _from_report(root)
    if os.path.isfile(os.path.join(root, "config.json")):
        return [ServedModel(id=os.path.basename(root.rstrip("/")), path=root)]
    for sub in (SWEEPS_DIR, EXPERIMENTS_DIR):
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
        steps = _trial_steps(p)
        out.append(ServedModel(id=m["id"], path=p, rank=m.get("rank", n),
                               metrics=m.get("metrics", {}),
                               source=f"sweep {os.path.basename(root)}"
                                      + (f", {steps} steps" if steps else "")))
    return sorted(out, key=lambda m: m.rank)


def _trial_steps(model_path: str) -> int | None:
    """The steps a sweep trial trained (its run's done.json beside the model), if recorded."""
    try:
        with open(os.path.join(os.path.dirname(model_path.rstrip("/")), "done.json")) as f:
            return int(json.load(f)["final"]["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


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
            steps = metrics.get("steps")
            out.append(ServedModel(id=label, path=path, rank=rank, metrics=metrics,
                                   source=f"experiment {os.path.basename(root)}"
                                          + (f", {steps} steps" if steps else "")))
    return out


def _newest(parent: str) -> str | None:
    if not os.path.isdir(parent):
        return None
    subs = [os.path.join(parent, d) for d in os.listdir(parent)
            if os.path.isdir(os.path.join(parent, d))]
    return max(subs, key=os.path.getmtime) if subs else None
