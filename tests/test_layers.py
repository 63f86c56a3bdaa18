"""The package's layers (docs/architecture.md) are import-linter contracts in pyproject.toml; this
runs them, and checks that every module of `orchestrator` is covered by one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent


def test_import_linter_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_every_orchestrator_module_is_in_a_layer_or_the_root():
    """A new subpackage or root module must join a contract, or it would escape the layers."""
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"][
        "contracts"]
    layers = {m.strip() for c in contracts if c["type"] == "layers" for line in c["layers"]
              for m in line.split("|")}
    (root,) = [c for c in contracts if c["name"].startswith("The root modules")]
    covered = layers | set(root["source_modules"])
    pkg = ROOT / "orchestrator"
    for path in sorted(pkg.iterdir()):
        if path.name.startswith(("_", ".")) or not (path.suffix == ".py" or path.is_dir()):
            continue
        name = f"orchestrator.{path.stem if path.suffix == '.py' else path.name}"
        assert name in covered, f"{name} is in no layer of pyproject's [tool.importlinter]"
