"""The run config: typed dataclasses (their fields and defaults in `orchestrator.config_sections`,
re-exported here), loaded from one YAML file plus `--set key=value` overrides, validated once
before any Ray work starts.

Errors name the field, the value, what is allowed and the fix, e.g.
`teacher.k must be between 1 and the vocabulary size (32000), got 40000`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from orchestrator.config_checks import validate, validate_serve  # noqa: F401 (public here)
from orchestrator.console import say
from orchestrator.errors import ConfigError
from orchestrator.config_sections import (CaptureConfig, Config, DataConfig,  # noqa: F401 (public)
                                          OnPolicyConfig, ServeConfig, StudentConfig,
                                          TeacherConfig, TrainConfig, TuneConfig)
from orchestrator.paths import expand_paths


_SECTIONS = {"teacher": TeacherConfig, "data": DataConfig, "capture": CaptureConfig,
             "student": StudentConfig, "train": TrainConfig, "on_policy": OnPolicyConfig,
             "tune": TuneConfig, "serve": ServeConfig}


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config, apply `key=value` overrides (values parsed as YAML), expand the path
    fields (`~`, environment variables: `orchestrator.paths`), validate."""
    raw = _read_yaml(path, fix="pass the path of a YAML run config")
    in_file = raw.get("student")
    in_file = dict(in_file) if isinstance(in_file, dict) else {}
    for item in overrides:
        _apply_override(raw, item)
    _student_source(raw, in_file, path=path,
                    overridden={item.partition("=")[0].strip() for item in overrides})
    cfg = _build(raw)
    expand_paths(cfg)  # once, here: everything downstream sees the expanded, absolute paths
    validate(cfg)
    return cfg


def _read_yaml(path: str | Path | None, *, fix: str) -> dict[str, Any]:
    """The mapping a YAML config file holds ({} without a path)."""
    if path is None:
        return {}
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {p} is a directory; {fix}")
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist; {fix}")
    try:
        raw = yaml.safe_load(p.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not UTF-8 text (byte {e.start}: {e.reason}); save "
                          "it as UTF-8 YAML") from None
    except OSError as e:
        raise ConfigError(f"config file {p} cannot be read ({e.strerror or e}); {fix}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    except (ValueError, RecursionError) as e:  # an integer of >4300 digits, nesting too deep
        raise ConfigError(f"config file {p} is not valid YAML: {str(e)[:120] or 'nested too deeply'}"
                          ) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections, got "
                          f"{type(raw).__name__}")
    return raw


_SHAPE_KEYS = ("preset", "layers", "hidden", "heads", "intermediate", "init_from_teacher")
"""What describes a student built from the teacher's config (a pretrained student.model has its
own shape and weights)."""


def _student_source(raw: dict, in_file: dict, *, path, overridden: set[str]) -> None:
    """A student is pretrained (student.model) or built at a shape (preset / explicit fields),
    never both: a config file naming both is refused (naming them); a `--set` of one over a file
    naming the other replaces it, saying so. With a model, the default preset does not apply."""
    student = raw.get("student")
    if not isinstance(student, dict):
        return  # absent or empty; not a mapping: `_build` names it

    def named(values: dict, keys) -> list:
        return [k for k in keys if values.get(k) is not None and values.get(k) != ""
                and values.get(k) is not False]

    file_model, file_shape = named(in_file, ("model",)), named(in_file, _SHAPE_KEYS)
    if file_model and file_shape:
        raise ConfigError(
            f"config file {path} sets both student.model ({in_file['model']}) and "
            f"student.{file_shape[0]} ({in_file[file_shape[0]]}); a pretrained student has its "
            f"own shape and weights: remove student.{file_shape[0]} to start from the model, or "
            "student.model to build the student from the teacher's config")
    set_model = named(student, ("model",)) if "student.model" in overridden else []
    set_shape = [k for k in named(student, _SHAPE_KEYS) if f"student.{k}" in overridden]
    if set_model and set_shape:
        raise ConfigError(
            f"--set student.model={student['model']} and --set student.{set_shape[0]}="
            f"{student[set_shape[0]]} name both a pretrained student and a shape; pass one")
    if set_model and file_shape:
        for key in _SHAPE_KEYS:
            student.pop(key, None)
        replaced = ", ".join(f"student.{k}={in_file[k]}" for k in file_shape)
        say(f"student.model {student['model']} (--set) replaces the config file's {replaced}: "
            "the pretrained model's own shape is used")
    elif set_shape and file_model:
        student["model"], student["revision"] = "", None
        say(f"--set student.{set_shape[0]}={student[set_shape[0]]} replaces the config file's "
            f"student.model {in_file['model']}: the student is built from the teacher's config")
    if named(student, ("model",)):
        student["preset"] = None  # the default preset is for students built at a shape


def _apply_override(raw: dict, item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {item!r} must look like key=value, e.g. --set teacher.k=32")
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        if node.get(part) is None:  # absent, or an empty section (`teacher:` in the YAML)
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
    except (yaml.YAMLError, ValueError, RecursionError):  # not YAML: the plain string
        node[parts[-1]] = value


def _build(raw: dict) -> Config:
    cfg = Config()
    for key, value in raw.items():
        if key in _SECTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{key} must be a mapping of fields, got {value!r}")
            setattr(cfg, key, _build_section(key, _SECTIONS[key], value))
        elif key == "output_dir":
            cfg.output_dir = _coerce("output_dir", str, value)
        else:
            known = sorted([*_SECTIONS, "output_dir"])
            raise ConfigError(f"unknown config key {key!r}; known top-level keys: {', '.join(known)}"
                              f"{_did_you_mean(key, known)}")
    return cfg


def _build_section(name: str, cls, values: dict):
    hints = get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(
                f"unknown config key {name}.{key}; valid keys in {name}: {', '.join(sorted(hints))}"
                f"{_did_you_mean(key, hints, prefix=name + '.')}")
        kwargs[key] = _coerce(f"{name}.{key}", hints[key], value)
    return cls(**kwargs)


def _did_you_mean(key, known, *, prefix: str = "") -> str:
    """` (did you mean teacher.k?)` when a known key is close to the unknown one, else ``."""
    import difflib

    close = difflib.get_close_matches(str(key), list(known), n=3, cutoff=0.6)
    swapped = [c for c in close if sorted(c) == sorted(str(key))]  # `modle` is `model`, not `mode`
    close = swapped or close
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def _coerce(name: str, tp, value):
    origin = get_origin(tp)
    args = get_args(tp)
    if origin is Literal:
        if value not in args:
            allowed = " | ".join(str(a) for a in args)
            raise ConfigError(f"{name} must be one of {allowed}, got {value!r}")
        return value
    if set(args) == {str, dict}:  # tune.space: a name or an inline mapping
        if isinstance(value, (str, dict)):
            return value
        raise ConfigError(f"{name} must be a space name or a mapping of config keys to "
                          f"distributions, got {value!r}")
    if origin is list and args == (float,):  # e.g. teacher.tail_temperatures: [2, 4]
        items = value if isinstance(value, list) else [value] if value is not None else None
        if items is None:
            raise ConfigError(f"{name} must be a list of numbers, got {value!r}")
        return [_coerce(f"{name}[{i}]", float, v) for i, v in enumerate(items)]
    if args and type(None) in args:  # X | None
        if value is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(name, inner, value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value.strip())
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value) if abs(value) < 1e308 else math.inf  # 10**400 has no float
            if not math.isfinite(number):
                raise ConfigError(f"{name} must be a finite number, got {str(value)[:40]}")
            return number
    elif tp is list:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    kind = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            list: "a list of names"}[tp]
    if value is None:
        raise ConfigError(f"{name} has no value (YAML null); set it to {kind}")
    raise ConfigError(f"{name} must be {kind}, got {value!r} ({type(value).__name__})")


def coerce_field(key: str, value):
    """`value` as the student/train field `key` (e.g. "train.lr") holds it; ConfigError if it
    cannot (a search space's values go through here, as a config file's do)."""
    section, _, name = key.partition(".")
    cls = {"student": StudentConfig, "train": TrainConfig, "on_policy": OnPolicyConfig}[section]
    return _coerce(key, get_type_hints(cls)[name], value)


def load_serve_config(path: str | Path | None, overrides: list[str] = ()) -> ServeConfig:
    """Only the `serve` section of a config file (plus `serve.*` overrides): serving needs no
    teacher or data."""
    raw = _read_yaml(path, fix="pass the path of a YAML config or omit --config")
    raw = {"serve": raw.get("serve") or {}}
    for item in overrides:
        if not item.partition("=")[0].strip().startswith("serve."):
            raise ConfigError(f"--set {item!r}: serving takes only serve.* settings, "
                              "e.g. --set serve.port=8001")
        _apply_override(raw, item)
    if not isinstance(raw["serve"], dict):
        raise ConfigError(f"serve must be a mapping of fields, got {raw['serve']!r}")
    cfg = _build_section("serve", ServeConfig, raw["serve"])
    validate_serve(cfg)
    return cfg
