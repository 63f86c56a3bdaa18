"""`raydistill inspect OUTPUT_DIR`: every capture of an output_dir (main, held-out,
behaviour-cloning samples, of every config, and of the previous layout) on a real capture, and the
experiments and sweeps in it (made by hand here, in the layout the pipeline writes)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from orchestrator.driver.cli import main
from orchestrator.program import command_name
from orchestrator.errors import ShardError
from orchestrator.driver.inspect import describe
from orchestrator.storage import filesystem
from orchestrator.shards.manifest import load_manifest, save_manifest
from orchestrator.winners import write_winners
from tests.conftest import capture_folder
from tune_spaces.leaderboard import COLUMNS


def _totals(out: Path) -> tuple[int, int, int, int]:
    m = load_manifest(*filesystem(str(out)))
    return (len(m.shards), m.total_units, sum(s.rows for s in m.shards.values()),
            sum(s.tokens for s in m.shards.values()))


def _copy(captured, dest: Path) -> Path:
    shutil.copytree(captured["out"], dest, ignore=shutil.ignore_patterns("experiments", "sweeps"))
    return dest


def test_every_capture_of_a_real_output_dir(captured, tmp_path, capsys):
    """Each capture folder, with its kind, fingerprint, totals, size and data file; a capture of
    the previous layout (manifest.json directly in output_dir) is listed as such."""
    out = _copy(captured, tmp_path / "out")
    main_folder = capture_folder(out)
    shutil.copytree(main_folder, out, dirs_exist_ok=True)  # as the previous layout kept it
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"captures in {out}: 4 (one folder per kind and fingerprint" in text
    for label, where, head in (
            ("capture", main_folder, f"capture {main_folder}"),
            ("held-out", capture_folder(out, "heldout"), f"held-out {capture_folder(out, 'heldout')}"),
            ("bc samples", capture_folder(out, "bc"), f"bc samples {capture_folder(out, 'bc')}"),
            ("capture", out, f"capture {out}   (previous layout)")):
        shards, units, rows, tokens = _totals(where)
        block = text[text.index(f"{head}\n"):].split("\n", 5)
        m = load_manifest(*filesystem(str(where)))
        assert block[1].startswith(f"  fingerprint {m.fingerprint}   complete: True"), label
        assert f"shards {shards}/{units}   samples {rows}   tokens {tokens}   " in block[2], label
        assert block[2].split()[-4:-2] == [f"{sum(s.bytes for s in m.shards.values()) / 1e6:.1f}",
                                          "MB"], label
        assert block[3] == f"  data {m.capture['data']['path']}", label
    assert str(main_folder.name).startswith("main-") and main_folder.parent.name == "captures"
    assert "complete: True" in text and "unfinished" not in text
    assert '"capture": "main"' in text  # a main capture's first shard metadata
    assert f"experiments: none in {out}/experiments" in text
    assert f"sweeps: none in {out}/sweeps" in text


def test_an_unfinished_capture_says_how_to_resume_it(captured, tmp_path):
    out = _copy(captured, tmp_path / "out")
    fs, root = filesystem(str(capture_folder(out, "heldout")))
    m = load_manifest(fs, root)
    m.complete = False
    save_manifest(fs, root, m)
    text = describe(str(out))
    held = text[text.index("held-out "):text.index("bc samples ")]
    assert "complete: False" in held
    assert f"unfinished: `{command_name()} capture CONFIG` (or `run`) resumes it" in held


def _report(exp: Path, students: dict, **extra) -> None:
    exp.mkdir(parents=True)
    (exp / "report.json").write_text(json.dumps({"students": students, "settings": {},
                                                 "history": {}, **extra}))


def _row(steps, nll, gap=None) -> dict:
    row = {"steps": steps, "student_nll": nll, "teacher_nll": 4.57, "kl": 0.4, "top1": 0.3}
    return row | ({"gap_recovered": gap} if gap is not None else {})


def _experiments(out: Path) -> None:
    exps = out / "experiments"
    _report(exps / "exp-20261203-100000-aaaa",
            {"kd": _row(300, 5.262, gap=-1.09), "hard": _row(300, 4.902, gap=0.0),
             "bc": _row(300, 5.5, gap=-1.8)},
            verdict="Distillation did not help: KD 5.262 vs hard labels 4.902 nats/token.")
    _report(exps / "exp-20261203-110000-bbbb",
            {"kd": _row(12, 3.1, gap=0.5), "hard": _row(12, 3.4)})
    unreported = exps / "exp-20261203-120000-cccc"
    (unreported / "kd").mkdir(parents=True)
    (unreported / "kd" / "done.json").write_text(json.dumps(
        {"history": [], "final": {"step": 40}, "wall_s": 9.0}))
    (unreported / "hard" / "checkpoint_2026-12-03_12-01-00.000000").mkdir(parents=True)
    (unreported / "hard" / ".hidden-state").mkdir()


def _sweeps(out: Path) -> None:
    done = out / "sweeps" / "sweep-20261203-130000-dddd"
    (done / "trials").mkdir(parents=True)
    rows = [{"rank": 1, "id": "t00-1x128-fkl-T1", "status": "finished", "eval_kl": 0.52},
            {"rank": 2, "id": "t01-2x128-fkl-T2", "status": "finished", "eval_kl": 0.61},
            {"rank": 3, "id": "t02-1x128-fkl-T2", "status": "stopped", "eval_kl": 0.9},
            {"rank": 4, "id": "t03-2x256-fkl-T1", "status": "error"}]
    with open(done / "leaderboard.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    write_winners(str(done), [{"id": "t00-1x128-fkl-T1", "path": "trials/a/model", "rank": 1,
                               "metrics": {"eval_kl": 0.52}}], metric="eval_kl", mode="min")
    running = out / "sweeps" / "sweep-20261203-140000-eeee"
    for trial in ("a", "b"):
        (running / "trials" / trial).mkdir(parents=True)


def test_experiments_and_sweeps(tmp_path, capsys):
    out = tmp_path / "out"
    _experiments(out)
    _sweeps(out)
    assert main(["inspect", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"captures: none in {out}/captures" in lines
    me = command_name()
    expected = [
        f"experiments in {out}/experiments: 3",
        "  exp-20261203-100000-aaaa: Distillation did not help: KD 5.262 vs hard labels "
        "4.902 nats/token.",
        "    kd: 300 steps, -109% of the gap closed; hard: 300 steps; bc: 300 steps, -180% of "
        "the gap closed",
        "  exp-20261203-110000-bbbb: held-out NLL (nats/token, lower is better): kd 3.100, "
        "hard 3.400; teacher 4.570",
        "    kd: 12 steps, 50% of the gap closed; hard: 12 steps",
        f"  exp-20261203-120000-cccc: no report yet (interrupted or still training; `{me} run "
        "CONFIG --resume exp-20261203-120000-cccc`, or `train`, continues it)",
        "    hard: not finished (1 checkpoint(s)); kd: finished, 40 steps",
        f"sweeps in {out}/sweeps: 2",
        "  sweep-20261203-130000-dddd: 4 trial(s) (1 failed, 2 finished, 1 stopped early); "
        "winners: t00-1x128-fkl-T1 (eval_kl 0.520)",
        f"  sweep-20261203-140000-eeee: 2 trial(s) started, no leaderboard yet (interrupted or "
        f"still running; `{me} tune CONFIG --resume sweep-20261203-140000-eeee` continues it)",
    ]
    start = lines.index(expected[0])
    assert lines[start:start + len(expected)] == expected


def test_a_folder_with_nothing_of_a_run_is_refused(tmp_path, capsys):
    (tmp_path / "empty" / "notes").mkdir(parents=True)
    with pytest.raises(ShardError, match=r"holds no capture \(captures/, manifest.json\), "
                                         r"experiments/ or sweeps/; pass a run's output_dir"):
        describe(str(tmp_path / "empty"))
    assert main(["inspect", str(tmp_path / "empty")]) == 2
    assert "raydistill: error:" in capsys.readouterr().err
