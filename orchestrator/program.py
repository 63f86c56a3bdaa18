"""How the user can call this program: what help texts and hints print in place of a bare
`raydistill`, which works only where the venv is activated or raydistill is installed on PATH.
A root module, so every layer's messages can use it (orchestrator.driver.cli re-exports it).
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys


def command_name() -> str:
    """How the user can call this program, for the commands that help texts and hints print:
    `raydistill` when that name on PATH is this program (an activated venv, a pip install), else
    the path it was invoked by (`.venv/bin/raydistill` after `./scripts/bootstrap.sh`), else the
    script beside this Python (`python -m orchestrator.driver.cli`, tests)."""
    on_path = shutil.which("raydistill")
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else ""
    if os.path.basename(argv0) == "raydistill":
        invoked = argv0
    else:
        beside = os.path.join(os.path.dirname(sys.executable), "raydistill")
        invoked = beside if os.path.isfile(beside) else ""
    if not invoked or (on_path and _same_file(on_path, invoked)):
        return "raydistill"
    relative = os.path.relpath(invoked)
    return shlex.quote(invoked if relative.startswith("..") else relative)


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
