"""Named search spaces, kept as data: `tune_spaces/<name>.yaml` (or any YAML file, or a mapping
inlined in the run config's `tune.space`).

A space file:

    description: Student depth and width.
    include: [temperature]          # optional: product with other named spaces
    params:
      student:                      # a whole student shape per grid point
        grid: [{layers: 1, hidden: 128, heads: 2}, {layers: 2, hidden: 256, heads: 4}]
      train.temperature: {grid: [1.0, 2.0]}
      train.alpha: {uniform: [0.3, 0.9]}

Keys are `student.<field>` / `train.<field>` / `on_policy.<field>` (the fields a trial may change,
below) or `student` with mappings as values. Distributions: `grid` (every value, in every trial combination), `choice`
(one at random per sample), `uniform`, `loguniform` ([low, high]), `randint` ([low, high)). Each
grid point is repeated `tune.num_samples` times with fresh draws of the random axes.

`python -c "from tune_spaces import load_space; print(load_space('default'))"` shows one.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from orchestrator.config import coerce_field
from orchestrator.errors import ConfigError
from orchestrator.paths import expand

SPACES_DIR = Path(__file__).parent
STUDENT_KEYS = ("preset", "layers", "hidden", "heads", "intermediate", "init_from_teacher",
                "model", "revision")
"""Student fields a trial may change: a shape, or a pretrained `model` (categorical: `grid` or
`choice` over model directories / cached hub ids that share the teacher's tokenizer)."""
SHAPE_KEYS = ("preset", "layers", "hidden", "heads", "intermediate", "init_from_teacher")
"""The fields of a student built from the teacher's config (a pretrained model has its own)."""
TRAIN_KEYS = ("loss", "temperature", "alpha", "beta", "tail", "lr", "warmup_steps", "batch_size",
              "grad_accum", "seed", "on_policy")
"""Training fields a trial may change (the step budget and evaluation stay the sweep's);
`on_policy` is the share λ of the student's own samples."""
ON_POLICY_KEYS = ("loss", "beta", "temperature", "max_new_tokens", "sync_every")
"""On-policy fields a trial may change (`on_policy.<field>`: the divergence on the student's
samples, its JSD mix, the rollout temperature and length, the weight refresh period)."""
KINDS = ("grid", "choice", "uniform", "loguniform", "randint")


@dataclass(frozen=True)
class Axis:
    key: str
    kind: str
    values: tuple
    """grid/choice: the values; uniform/loguniform/randint: (low, high)."""


@dataclass(frozen=True)
class Space:
    name: str
    axes: tuple[Axis, ...]
    description: str = ""
    sources: tuple[str, ...] = field(default=())

    def grid_size(self) -> int:
        n = 1
        for a in self.axes:
            if a.kind == "grid":
                n *= len(a.values)
        return n

    def corners(self) -> list[dict]:
        """Every combination of discrete values and of the random axes' bounds: what validation
        must accept before any trial starts (randint's upper bound is exclusive)."""
        choices = []
        for a in self.axes:
            if a.kind in ("grid", "choice"):
                choices.append([(a.key, v) for v in a.values])
            elif a.kind == "randint":
                choices.append([(a.key, a.values[0]), (a.key, a.values[1] - 1)])
            else:
                choices.append([(a.key, a.values[0]), (a.key, a.values[1])])
        return [dict(combo) for combo in itertools.product(*choices)]

    def to_tune(self, *, grid: bool = True) -> dict:
        """Tune's param_space (`grid=False`: grid axes become choices, for searchers such as
        Optuna that sample instead of enumerating)."""
        from ray import tune

        out = {}
        for a in self.axes:
            if a.kind == "grid":
                out[a.key] = tune.grid_search(list(a.values)) if grid else tune.choice(list(a.values))
            elif a.kind == "choice":
                out[a.key] = tune.choice(list(a.values))
            elif a.kind == "uniform":
                out[a.key] = tune.uniform(*a.values)
            elif a.kind == "loguniform":
                out[a.key] = tune.loguniform(*a.values)
            else:
                out[a.key] = tune.randint(*a.values)
        return out

    def describe(self) -> str:
        parts = []
        for a in self.axes:
            if a.kind in ("grid", "choice"):
                parts.append(f"{a.key} {a.kind} {[_short(v) for v in a.values]}")
            else:
                parts.append(f"{a.key} {a.kind}[{a.values[0]}, {a.values[1]}]")
        return f"{self.name}: " + "; ".join(parts)


def _short(value) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def available() -> list[str]:
    """Names of the spaces shipped in tune_spaces/."""
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def load_space(spec: str | dict) -> Space:
    """A space by name (`tune_spaces/<name>.yaml`), by YAML file path, or from an inline mapping
    (`{params: {...}}`, or the params mapping itself)."""
    if isinstance(spec, dict):
        return _parse("inline", spec, seen=())
    return _load_named(spec, seen=())


def _load_named(spec: str, *, seen: tuple[str, ...]) -> Space:
    path = Path(os.path.expanduser(spec))
    if not (spec.endswith((".yaml", ".yml")) and path.is_file()):
        path = SPACES_DIR / f"{spec}.yaml"
    if not path.is_file():
        raise ConfigError(f"tune.space {spec!r} is neither a space in tune_spaces/ "
                          f"({', '.join(available())}) nor a YAML file; pick one of those, "
                          "give a path, or inline a mapping")
    if str(path) in seen:
        raise ConfigError(f"space {path} includes itself (via {' → '.join(seen)})")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"space file {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"space file {path} must hold a mapping with `params:`")
    return _parse(path.stem, raw, seen=(*seen, str(path)))


def _parse(name: str, raw: dict, *, seen: tuple[str, ...]) -> Space:
    if "params" not in raw and "include" not in raw:
        raw = {"params": raw}  # an inline mapping of keys to distributions
    unknown = set(raw) - {"params", "include", "description"}
    if unknown:
        raise ConfigError(f"space {name}: unknown keys {sorted(unknown)}; a space has "
                          "`description`, `include` and `params`")
    axes: dict[str, Axis] = {}
    include = raw.get("include") or []
    if isinstance(include, str):
        include = [include]
    for other in include:
        for a in _load_named(str(other), seen=seen).axes:
            axes[a.key] = a
    params = raw.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"space {name}: params must map keys to distributions, got {params!r}")
    for key, dist in params.items():
        axes[key] = _axis(name, str(key), dist)  # a space's own params override included ones
    if not axes:
        raise ConfigError(f"space {name} has no params; add e.g. "
                          "`train.temperature: {grid: [1, 2]}`")
    return Space(name=name, axes=tuple(axes.values()), description=str(raw.get("description", "")),
                 sources=seen)


def _axis(space: str, key: str, dist) -> Axis:
    section, _, fname = key.partition(".")
    if key != "student" and not ((section == "student" and fname in STUDENT_KEYS)
                                 or (section == "train" and fname in TRAIN_KEYS)
                                 or (section == "on_policy" and fname in ON_POLICY_KEYS)):
        allowed = ([f"student.{k}" for k in STUDENT_KEYS] + [f"train.{k}" for k in TRAIN_KEYS]
                   + [f"on_policy.{k}" for k in ON_POLICY_KEYS])
        raise ConfigError(f"space {space}: {key!r} cannot vary between trials; searchable keys: "
                          f"student (a shape mapping), {', '.join(allowed)}")
    if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in KINDS:
        raise ConfigError(f"space {space}: {key} must be one distribution, e.g. "
                          f"{{grid: [1, 2]}}; kinds: {', '.join(KINDS)}; got {dist!r}")
    kind, values = next(iter(dist.items()))
    if not isinstance(values, list) or not values:
        raise ConfigError(f"space {space}: {key} {kind} needs a non-empty list, got {values!r}")
    if key in ("student.model", "student.revision") and kind not in ("grid", "choice"):
        raise ConfigError(f"space {space}: {key} is categorical (model directories or hub ids); "
                          f"use {{grid: [...]}} or {{choice: [...]}}, not {kind}")
    if kind in ("uniform", "loguniform", "randint"):
        if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                        for v in values) or not values[0] < values[1]:
            raise ConfigError(f"space {space}: {key} {kind} needs [low, high] numbers with "
                              f"low < high, got {values!r}")
        if kind == "loguniform" and values[0] <= 0:
            raise ConfigError(f"space {space}: {key} loguniform needs low > 0, got {values[0]}")
        if kind == "randint" and not all(isinstance(v, int) for v in values):
            raise ConfigError(f"space {space}: {key} randint needs integers, got {values!r}")
    if key == "student":
        for v in values:
            if not isinstance(v, dict) or set(v) - set(STUDENT_KEYS):
                raise ConfigError(f"space {space}: every student value must map student fields "
                                  f"({', '.join(STUDENT_KEYS)}) to values, got {v!r}")
        values = [{f: _typed(space, f"student.{f}", x) for f, x in v.items()} for v in values]
    elif kind in ("grid", "choice"):
        values = [_typed(space, key, v) for v in values]
    return Axis(key=key, kind=kind, values=tuple(values))


def _typed(space: str, key: str, value):
    """A value as the config field holds it (`1e-3`, a string in YAML 1.1, becomes 0.001; a
    student.model path with `~` or `$VAR` expanded, as in the config)."""
    try:
        value = coerce_field(key, value)
        return expand(key, value, absolute=False) if key == "student.model" else value
    except ConfigError as e:
        raise ConfigError(f"space {space}: {e}") from None


def trial_student(base: dict, fields: dict) -> dict:
    """A trial's student fields: the base config's, with the trial's `fields` over them. A trial
    naming a pretrained model drops the base's shape; one naming a shape drops the base's model
    (as `--set` does over a config file)."""
    merged = dict(base)
    if fields.get("model"):
        merged.update(dict.fromkeys(SHAPE_KEYS), init_from_teacher=False, revision=None)
    elif any(fields.get(k) is not None for k in SHAPE_KEYS if k != "init_from_teacher"):
        merged.update(model="", revision=None)
    merged.update(fields)
    return merged


def on_policy_params(params: dict) -> dict:
    """A trial's sampled `on_policy.<field>` params → {field: value}."""
    return {k.removeprefix("on_policy."): v for k, v in params.items()
            if k.startswith("on_policy.")}


def split_params(params: dict) -> tuple[dict, dict]:
    """A trial's sampled params → (student fields, train fields); `on_policy_params` has the
    rest."""
    student, train = {}, {}
    for key, value in params.items():
        if key == "student":
            student.update(value)
        elif key.startswith("student."):
            student[key.removeprefix("student.")] = value
        elif key.startswith("train."):
            train[key.removeprefix("train.")] = value
    return student, train
