"""`raydistill inspect OUTPUT_DIR`: what an output_dir holds, as text — each capture (main, held-out
split, behaviour-cloning samples: totals, and the main capture's shard metadata), each experiment
(its report's verdict, or its students' state) and each sweep (trials by status, winners).

    raydistill inspect runs/quickstart
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter

import pyarrow.fs as pafs

from orchestrator.shards.plan import BC_DIR, HELDOUT_DIR, CaptureKind
from orchestrator.program import command_name
from orchestrator.errors import ShardError
from orchestrator.shards.manifest import SHARDS_DIR, Manifest, load_manifest
from orchestrator.storage import exists, filesystem
from orchestrator.shards.format import load_shard, read_bytes, shard_metadata
from orchestrator.winners import WINNERS_FILE
from orchestrator.names import EXPERIMENTS_DIR, SWEEPS_DIR

_CAPTURES = ((CaptureKind.MAIN, ""), (CaptureKind.HELDOUT, HELDOUT_DIR), (CaptureKind.BC, BC_DIR))
_STATUS = {"finished": "finished", "stopped": "stopped early", "error": "failed"}


def describe(output_dir: str) -> str:
    fs, root = filesystem(output_dir)
    captures = [(kind, sub, load_manifest(fs, _path(root, sub))) for kind, sub in _CAPTURES]
    experiments = _subdirs(fs, f"{root}/{EXPERIMENTS_DIR}")
    sweeps = _subdirs(fs, f"{root}/{SWEEPS_DIR}")
    if all(m is None for _, _, m in captures) and not experiments and not sweeps:
        raise ShardError(f"{output_dir} holds no capture (manifest.json), {EXPERIMENTS_DIR}/ or "
                         f"{SWEEPS_DIR}/; pass a run's output_dir (the config's output_dir)")
    lines = []
    for kind, sub, manifest in captures:
        lines += _capture(fs, root, output_dir, kind=kind, sub=sub, manifest=manifest)
    lines += _experiments(fs, f"{root}/{EXPERIMENTS_DIR}", output_dir, experiments)
    lines += _sweeps(fs, f"{root}/{SWEEPS_DIR}", output_dir, sweeps)
    return "\n".join(lines)


def _capture(fs, root: str, output_dir: str, *, kind: CaptureKind, sub: str,
             manifest: Manifest | None) -> list[str]:
    where = _path(output_dir, sub)
    if manifest is None:
        return [f"{kind.label}: none in {where}"]
    shards = manifest.shards
    tokens = sum(s.tokens for s in shards.values())
    size = sum(s.bytes for s in shards.values())
    lines = [f"{kind.label} {where}",
             f"  fingerprint {manifest.fingerprint}   complete: {manifest.complete}",
             f"  shards {len(shards)}/{manifest.total_units}   samples "
             f"{sum(s.rows for s in shards.values())}   tokens {tokens}   "
             f"{size / max(tokens, 1):.1f} B/token"]
    if not manifest.complete:
        lines.append(f"  unfinished: `{command_name()} capture CONFIG` (or `run`) resumes it")
    if kind is CaptureKind.MAIN and shards:
        first = shards[min(shards)]
        table = load_shard(read_bytes(fs, f"{root}/{SHARDS_DIR}/{first.file}"), name=first.file)
        meta = shard_metadata(table)
        meta["id_dictionary"] = f"<{len(meta.get('id_dictionary', []))} ids>"
        lines.append("  metadata of " + first.file + " " +
                     json.dumps(meta, indent=2, sort_keys=True).replace("\n", "\n  "))
    return lines


def _experiments(fs, parent: str, output_dir: str, names: list[str]) -> list[str]:
    if not names:
        return [f"experiments: none in {_path(output_dir, EXPERIMENTS_DIR)}"]
    lines = [f"experiments in {_path(output_dir, EXPERIMENTS_DIR)}: {len(names)}"]
    for name in names:
        report = _json(fs, f"{parent}/{name}/report.json")
        if isinstance(report, dict) and isinstance(report.get("students"), dict):
            lines.append(f"  {name}: {_verdict(report)}")
            lines.append("    " + "; ".join(_student(label, row) for label, row
                                             in report["students"].items()))
        else:
            lines.append(f"  {name}: no report yet (interrupted or still training; "
                         f"`{command_name()} run CONFIG --resume {name}`, or `train`, "
                         "continues it)")
            students = _subdirs(fs, f"{parent}/{name}")
            if students:
                lines.append("    " + "; ".join(_unreported(fs, f"{parent}/{name}/{s}", s)
                                                 for s in students))
    return lines


def _verdict(report: dict) -> str:
    """The report's verdict sentence when it has one, else its held-out NLLs side by side."""
    if isinstance(report.get("verdict"), str) and report["verdict"].strip():
        return report["verdict"].strip()
    rows = report["students"]
    nlls = [f"{label} {row['student_nll']:.3f}" for label, row in rows.items()
            if isinstance(row, dict) and _num(row.get("student_nll"))]
    teacher = next((row["teacher_nll"] for row in rows.values()
                    if isinstance(row, dict) and _num(row.get("teacher_nll"))), None)
    if not nlls:
        return "report without held-out metrics (no held-out split)"
    return ("held-out NLL (nats/token, lower is better): " + ", ".join(nlls) +
            (f"; teacher {teacher:.3f}" if teacher is not None else ""))


def _student(label: str, row) -> str:
    if not isinstance(row, dict):
        return label
    text = f"{label}: {row.get('steps', '?')} steps"
    if _num(row.get("gap_recovered")) and label != "hard":
        text += f", {100 * row['gap_recovered']:.0f}% of the gap closed"
    return text


def _unreported(fs, run: str, label: str) -> str:
    """One student of an experiment without a report: finished (done.json) or its checkpoints."""
    done = _json(fs, f"{run}/done.json")  # orchestrator/train/launch.py: a finished run's record
    if isinstance(done, dict):
        return f"{label}: finished, {done.get('final', {}).get('step', '?')} steps"
    checkpoints = [d for d in _subdirs(fs, run) if d.startswith("checkpoint_")]  # Ray Train's
    return f"{label}: not finished ({len(checkpoints)} checkpoint(s))"


def _sweeps(fs, parent: str, output_dir: str, names: list[str]) -> list[str]:
    if not names:
        return [f"sweeps: none in {_path(output_dir, SWEEPS_DIR)}"]
    lines = [f"sweeps in {_path(output_dir, SWEEPS_DIR)}: {len(names)}"]
    for name in names:
        rows = _leaderboard(fs, f"{parent}/{name}/leaderboard.csv")
        if rows is None:
            trials = _subdirs(fs, f"{parent}/{name}/trials")
            lines.append(f"  {name}: {len(trials)} trial(s) started, no leaderboard yet "
                         f"(interrupted or still running; `{command_name()} tune CONFIG "
                         f"--resume {name}` continues it)")
            continue
        counts = Counter(r.get("status", "?") for r in rows)
        states = ", ".join(f"{n} {_STATUS.get(s, s)}" for s, n in sorted(counts.items()))
        lines.append(f"  {name}: {len(rows)} trial(s) ({states}); {_winners(fs, parent, name)}")
    return lines


def _winners(fs, parent: str, name: str) -> str:
    doc = _json(fs, f"{parent}/{name}/{WINNERS_FILE}")
    if not isinstance(doc, dict) or not doc.get("models"):
        return "no winners (no trial finished)"
    metric = doc.get("metric", "")
    shown = []
    for m in doc["models"]:
        value = (m.get("metrics") or {}).get(metric)
        shown.append(f"{m.get('id')} ({metric} {value:.3f})" if _num(value) else str(m.get("id")))
    return "winners: " + ", ".join(shown)


def _leaderboard(fs, path: str) -> list[dict] | None:
    if not exists(fs, path):
        return None
    with fs.open_input_stream(path) as f:
        return list(csv.DictReader(io.StringIO(f.read().decode("utf-8", "replace"))))


def _json(fs, path: str):
    """The parsed file, or None when it is missing or not JSON (a run still writing it)."""
    if not exists(fs, path):
        return None
    with fs.open_input_stream(path) as f:
        try:
            return json.loads(f.read())
        except ValueError:
            return None


def _subdirs(fs, path: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos
                  if i.type == pafs.FileType.Directory and not i.base_name.startswith("."))


def _path(base: str, sub: str) -> str:
    """`base/sub` ('' → base); a URI's query (`?endpoint_override=…`) stays last."""
    if not sub:
        return base
    path, sep, query = base.partition("?")
    return f"{path.rstrip('/')}/{sub}{sep}{query}"


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x
