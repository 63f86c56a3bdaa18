"""`raydistill inspect OUTPUT_DIR`: what an output_dir holds, as text — every capture (main,
held-out split, behaviour-cloning samples, of every config that captured there: fingerprint,
totals, size, data file, and a main capture's shard metadata), each experiment (its report's
verdict, or its students' state) and each sweep (trials by status, winners).

    raydistill inspect runs/quickstart
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter

import pyarrow.fs as pafs

from orchestrator.shards.dirs import CAPTURES_DIR, StoredCapture, join, list_captures
from orchestrator.shards.plan import CaptureKind
from orchestrator.program import command_name
from orchestrator.errors import ShardError
from orchestrator.shards.manifest import SHARDS_DIR
from orchestrator.storage import exists, filesystem
from orchestrator.shards.format import load_shard, read_bytes, shard_metadata
from orchestrator.winners import WINNERS_FILE
from orchestrator.names import EXPERIMENTS_DIR, SWEEPS_DIR

_STATUS = {"finished": "finished", "stopped": "stopped early", "error": "failed"}


def describe(output_dir: str) -> str:
    fs, root = filesystem(output_dir)
    captures = list_captures(output_dir)
    experiments = _subdirs(fs, f"{root}/{EXPERIMENTS_DIR}")
    sweeps = _subdirs(fs, f"{root}/{SWEEPS_DIR}")
    if not captures and not experiments and not sweeps:
        raise ShardError(f"{output_dir} holds no capture ({CAPTURES_DIR}/, manifest.json), "
                         f"{EXPERIMENTS_DIR}/ or {SWEEPS_DIR}/; pass a run's output_dir (the config's "
                         "output_dir)")
    if captures:
        lines = [f"captures in {output_dir}: {len(captures)} (one folder per kind and "
                 "fingerprint: each config finds its own)"]
    else:
        lines = [f"captures: none in {join(output_dir, CAPTURES_DIR)}"]
    for stored in captures:
        lines += _capture(stored)
    lines += _experiments(fs, f"{root}/{EXPERIMENTS_DIR}", output_dir, experiments)
    lines += _sweeps(fs, f"{root}/{SWEEPS_DIR}", output_dir, sweeps)
    return "\n".join(lines)


def _capture(stored: StoredCapture) -> list[str]:
    kind, manifest = CaptureKind(stored.kind), stored.manifest
    head = f"{kind.label} {stored.uri}" + ("   (previous layout)" if stored.old_layout else "")
    if manifest is None:
        return [head, f"  {stored.problem or 'shards/ without manifest.json'}: not resumable"]
    shards = manifest.shards
    tokens = sum(s.tokens for s in shards.values())
    size = sum(s.bytes for s in shards.values())
    data = manifest.capture.get("data") if isinstance(manifest.capture, dict) else None
    lines = [head,
             f"  fingerprint {manifest.fingerprint}   complete: {manifest.complete}",
             f"  shards {len(shards)}/{manifest.total_units}   samples "
             f"{sum(s.rows for s in shards.values())}   tokens {tokens}   "
             f"{size / 1e6:.1f} MB   {size / max(tokens, 1):.1f} B/token"]
    if isinstance(data, dict) and data.get("path"):
        lines.append(f"  data {data['path']}")
    if not manifest.complete:
        lines.append(f"  unfinished: `{command_name()} capture CONFIG` (or `run`) resumes it")
    if kind is CaptureKind.MAIN and shards:
        fs, root = filesystem(stored.uri)
        first = shards[min(shards)]
        table = load_shard(read_bytes(fs, f"{root}/{SHARDS_DIR}/{first.file}"), name=first.file)
        meta = shard_metadata(table)
        meta["id_dictionary"] = f"<{len(meta.get('id_dictionary', []))} ids>"
        lines.append("  metadata of " + first.file + " " +
                     json.dumps(meta, indent=2, sort_keys=True).replace("\n", "\n  "))
    return lines


def _experiments(fs, parent: str, output_dir: str, names: list[str]) -> list[str]:
    if not names:
        return [f"experiments: none in {join(output_dir, EXPERIMENTS_DIR)}"]
    lines = [f"experiments in {join(output_dir, EXPERIMENTS_DIR)}: {len(names)}"]
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
        return [f"sweeps: none in {join(output_dir, SWEEPS_DIR)}"]
    lines = [f"sweeps in {join(output_dir, SWEEPS_DIR)}: {len(names)}"]
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


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x
