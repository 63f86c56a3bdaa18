"""The config's path fields: `~` and environment variables expanded once, when the config is loaded
(`orchestrator.config.load_config`), so the driver, the teacher actors and Train workers in other
processes, the fingerprints and every message see one spelling of each path: absolute for a local
path (actors do not share the driver's working directory), a URI (`s3://…`) with only its
variables expanded. An unset variable is an error naming the key and the variable —
`os.path.expandvars` alone would leave `$VAR` in the path and fail later, far from the cause.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

from orchestrator.errors import ConfigError

if TYPE_CHECKING:
    from orchestrator.config import Config

PATH_FIELDS = ("teacher.model", "data.path", "data.eval_path", "data.chat_template", "output_dir",
               "tune.space")
"""Every config field that holds a path (tune.space only when it names a YAML file; teacher.model
may also be a hub id). The serve section has none."""

_VARIABLE = re.compile(r"\$(\w+)|\$\{([^}]*)\}")  # what os.path.expandvars replaces on POSIX


def expand_paths(cfg: Config) -> None:
    """Expand every path field of `cfg` in place (see the module docstring)."""
    cfg.teacher.model = expand("teacher.model", cfg.teacher.model, absolute=False)
    cfg.student.model = expand("student.model", cfg.student.model, absolute=False)
    cfg.data.path = expand("data.path", cfg.data.path)
    cfg.data.eval_path = expand("data.eval_path", cfg.data.eval_path)
    cfg.data.chat_template = expand("data.chat_template", cfg.data.chat_template)
    cfg.output_dir = expand("output_dir", cfg.output_dir)
    space = cfg.tune.space
    if isinstance(space, str) and (space.endswith((".yaml", ".yml")) or "/" in space
                                   or space.startswith(("~", "$"))):
        cfg.tune.space = expand("tune.space", space)


def expand(key: str, value: str, *, absolute: bool = True) -> str:
    """`value` of the path field `key` with its environment variables and `~` expanded; a local
    path made absolute — with `absolute=False` (teacher.model, which may be a hub id like
    `org/model`) only when it starts with `.` or `/` or exists."""
    if not value:
        return value
    for plain, braced in _VARIABLE.findall(value):
        name = plain or braced
        if name and name not in os.environ:
            raise ConfigError(f"{key} {value} uses the environment variable {name}, which is not "
                              f"set; export {name}=… before running raydistill, or write the path "
                              "out in full")
    try:
        expanded = os.path.expandvars(value)
        if "://" in expanded:
            return expanded
        expanded = os.path.expanduser(expanded)
        if absolute or expanded.startswith((".", "/")) or os.path.exists(expanded):
            return os.path.abspath(expanded)
        return expanded
    except ValueError as e:  # a NUL byte, an unencodable user name after `~`
        raise ConfigError(f"{key} {value!r} is not a usable path ({e})") from None


def identity(path: str) -> str:
    """What a capture's fingerprint records of a local path: its real path (symlinks, `..`, `.`
    and a trailing slash resolved), so every spelling of one directory fingerprints alike. A hub
    id, a URI or a path that does not exist stays as it is."""
    if not path or "://" in path or not os.path.exists(path):
        return path
    return os.path.realpath(path)
