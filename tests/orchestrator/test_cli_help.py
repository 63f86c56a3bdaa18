"""The command line explains itself: every option has help, every command's --help ends with an
example, the program names itself the way the user can call it, and the install instructions
point only at files the repository has."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.driver import cli
from orchestrator.driver.cli import main
from orchestrator.program import command_name

ROOT = Path(__file__).resolve().parents[2]


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_option_of_every_command_has_help_and_every_command_an_example():
    parser = cli._parser()
    commands = _commands(parser)
    assert set(commands) >= {"capture", "train", "run", "demo", "tune", "serve", "query",
                             "submit", "jobs", "inspect"}
    missing = []
    for name, p in [("raydistill", parser), *commands.items()]:
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if not (action.help or "").strip():
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
        assert "example" in (p.epilog or ""), f"`{name} --help` ends with no example"
        assert p.formatter_class is argparse.RawDescriptionHelpFormatter, name  # keeps lines
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    missing += [f"command {c.dest}" for c in sub._choices_actions if not (c.help or "").strip()]
    assert not missing, f"options without help: {missing}"


def test_help_ends_with_a_runnable_example(capsys):
    for name in _commands(cli._parser()):
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        examples = re.split(r"^examples?:$", text, flags=re.M)[-1].splitlines()
        assert examples and all(line.strip().startswith(f"{command_name()} {name}")
                                for line in examples if line.strip()), (name, examples)


def _fake_program(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "raydistill"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    return script


def test_command_name_is_the_bare_name_only_when_path_finds_this_program(tmp_path, monkeypatch):
    venv_bin = tmp_path / "proj" / ".venv" / "bin"
    _fake_program(venv_bin)
    elsewhere = _fake_program(tmp_path / "other-bin")
    monkeypatch.chdir(tmp_path / "proj")
    monkeypatch.setattr(sys, "argv", [".venv/bin/raydistill", "demo"])
    # not activated: PATH has no raydistill, or another one
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert command_name() == ".venv/bin/raydistill"
    monkeypatch.setenv("PATH", f"{elsewhere.parent}:/usr/bin:/bin")
    assert command_name() == ".venv/bin/raydistill"
    # `source .venv/bin/activate`: the bare name is this program
    monkeypatch.setenv("PATH", f"{venv_bin}:/usr/bin:/bin")
    assert command_name() == "raydistill"
    # invoked by its absolute path from elsewhere: that path, as the user can type it again
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.chdir(tmp_path / "other-bin")
    monkeypatch.setattr(sys, "argv", [str(venv_bin / "raydistill")])
    assert command_name() == str(venv_bin / "raydistill")


def test_command_name_outside_the_script_is_the_venvs_program(tmp_path, monkeypatch):
    """`python -m orchestrator.driver.cli`, tests, the demo's helpers: the script beside this Python."""
    venv_bin = tmp_path / "venv" / "bin"
    _fake_program(venv_bin)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "executable", str(venv_bin / "python"))
    monkeypatch.setattr(sys, "argv", ["-m"])
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert command_name() == "venv/bin/raydistill"
    monkeypatch.setenv("PATH", f"{venv_bin}:/usr/bin:/bin")
    assert command_name() == "raydistill"
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))  # no script anywhere
    assert command_name() == "raydistill"


def test_usage_and_errors_name_the_program_as_called(tmp_path, monkeypatch, capsys):
    _fake_program(tmp_path / ".venv" / "bin")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [".venv/bin/raydistill"])
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    with pytest.raises(SystemExit):
        main(["inspect", "a", "--", "run"])
    err = capsys.readouterr().err
    assert err.startswith("usage: .venv/bin/raydistill") and \
        "only `.venv/bin/raydistill submit` takes a command after --" in err


def test_hints_name_the_program_as_called(tmp_path, monkeypatch):
    """The next command a message suggests is one the user can paste: not activated, it is
    `.venv/bin/raydistill …` (jobs, query, inspect)."""
    import socket

    from orchestrator.errors import RaydistillError
    from orchestrator.driver.inspect import describe
    from orchestrator.driver.jobs import jobs
    from serve.client import query

    _fake_program(tmp_path / ".venv" / "bin")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [".venv/bin/raydistill"])
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    with pytest.raises(RaydistillError, match=r"`\.venv/bin/raydistill jobs logs` needs a job id; "
                                              r"`\.venv/bin/raydistill jobs list` shows them"):
        jobs("logs", job_id=None, address=None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RaydistillError, match=r"start one with `\.venv/bin/raydistill serve"):
        query("x", url=f"http://127.0.0.1:{port}")
    (tmp_path / "out" / "sweeps" / "sweep-1" / "trials" / "t0").mkdir(parents=True)
    assert "`.venv/bin/raydistill tune CONFIG --resume sweep-1`" in describe(str(tmp_path / "out"))


def test_activating_the_venv_puts_raydistill_on_path():
    """README: after the install, `source .venv/bin/activate` makes `raydistill` callable."""
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "activate").is_file() or not (bin_dir / "raydistill").is_file():
        pytest.skip("not running from a venv with raydistill installed")
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"} | {"PATH": "/usr/bin:/bin"}
    found = subprocess.run(["bash", "-c", f"source {bin_dir}/activate && command -v raydistill"],
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert found == str(bin_dir / "raydistill")


def test_install_docs_reference_only_files_in_the_repository():
    """scripts/ name no file the repository lacks; README and docs/ link only to existing files."""
    for script in (ROOT / "scripts").glob("*.sh"):
        for name in re.findall(r"[\w./-]+\.md\b", script.read_text()):
            assert (ROOT / name).is_file(), f"{script.name} points to {name}, not in the repository"
    for doc in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#\s]+)", doc.read_text()):
            if "://" in target:
                continue
            assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which is missing"
