"""The exception types users see: one message that names the problem and the fix. Errors raised
inside Ray workers reach the driver as `RemoteError` (type, text and traceback as plain strings)."""

from __future__ import annotations

import contextlib


class RaydistillError(Exception):
    """A user-facing error: the CLI prints its message (no traceback unless --debug) and exits 2."""


class ConfigError(RaydistillError):
    """A config field holds a value that is not allowed; raised before any Ray work starts."""


class DataError(RaydistillError):
    """The dataset cannot be read as configured (missing, empty, malformed lines)."""


class ShardError(RaydistillError):
    """A shard or manifest is missing, truncated, corrupt, or belongs to another run."""


class DivergedError(RaydistillError):
    """A student's loss became NaN or infinite; training stops before the NaN is checkpointed."""


class RemoteError(RaydistillError):
    """An exception raised inside a Ray worker (teacher actor, Train worker, Tune trial), carried to
    the driver as plain text: its qualified type name, its message and a short traceback.

    Ray pickles a worker's exception and unpickles it on the driver by calling its constructor
    with `args`; a type whose constructor needs more (huggingface_hub's
    `StrictDataclassClassValidationError` needs a keyword argument) fails there, and the user sees
    `TypeError: __init__() missing ... argument` instead of the cause. This type holds only plain
    values and always round-trips. `transient`: whether rerunning may succeed (`is_transient`)."""

    def __init__(self, type_name: str, message: str, traceback: str = "",
                 transient: bool = False):
        super().__init__(type_name, message, traceback, transient)
        self.type_name, self.message = type_name, message
        self.traceback, self.transient = traceback, transient

    def __str__(self) -> str:
        return f"{self.type_name}: {self.message}" if self.message else self.type_name

    def __reduce__(self):
        return type(self), (self.type_name, self.message, self.traceback, self.transient)

    @classmethod
    def of(cls, error: BaseException) -> RemoteError:
        import traceback

        kind = type(error)
        name = kind.__qualname__ if kind.__module__ == "builtins" else \
            f"{kind.__module__}.{kind.__qualname__}"
        try:
            message = str(error).strip()
        except Exception:  # noqa: BLE001 — a broken __str__ must not hide the type
            message = ""
        lines = traceback.format_exception(error)
        text = "".join(lines[-TRACEBACK_LINES:])[-TRACEBACK_CHARS:]
        return cls(name, message, text, is_transient(error))


TRACEBACK_LINES = 40
TRACEBACK_CHARS = 6000

# What a rerun can fix: the process, node or connection went away (a killed or preempted worker,
# a lost node, a dropped connection, a timeout). Matched by name on the type and its bases, so the
# driver classifies errors of libraries it never imports. Everything else that code raises (config
# validation, ValueError / TypeError in model code, a failed save, a diverged loss) is
# deterministic: the same inputs raise it again, so no `--resume` advice is given for it.
TRANSIENT_TYPES = frozenset({
    "builtins.ConnectionError", "builtins.TimeoutError", "builtins.BrokenPipeError",
    "ray.exceptions.RayActorError", "ray.exceptions.ActorDiedError",
    "ray.exceptions.ActorUnavailableError", "ray.exceptions.WorkerCrashedError",
    "ray.exceptions.NodeDiedError", "ray.exceptions.ObjectLostError",
    "ray.exceptions.OwnerDiedError", "ray.exceptions.OutOfMemoryError",
    "ray.exceptions.GetTimeoutError", "ray.exceptions.RaySystemError",
    "ray.train.v2._internal.exceptions.WorkerHealthCheckFailedError",
    "ray.train.v2._internal.exceptions.WorkerHealthCheckTimeoutError",
    "torch.distributed.DistNetworkError", "torch.distributed.DistStoreError",
})


def is_transient(error: BaseException) -> bool:
    """Whether rerunning (resuming) may get past `error` — see TRANSIENT_TYPES."""
    if isinstance(error, RemoteError):
        return error.transient
    names = {f"{k.__module__}.{k.__qualname__}" for k in type(error).__mro__}
    return bool(names & TRANSIENT_TYPES)


def carried(error: BaseException) -> BaseException:
    """What to raise across a Ray boundary instead of `error`: one of our own errors as it is when
    it survives a pickle round trip (DivergedError, ShardError …), anything else as a
    RemoteError."""
    import pickle

    if isinstance(error, RaydistillError):
        try:
            pickle.loads(pickle.dumps(error))
            return error
        except Exception:  # noqa: BLE001 — e.g. a subclass with keyword-only arguments
            pass
    return RemoteError.of(error)


@contextlib.contextmanager
def remote_errors(where: str):
    """`with remote_errors("train"):` — the code inside raises only errors that unpickle on the
    driver (`carried`). Used where work is handed to Ray: teacher actor methods (actors/pool.py),
    the Train worker function (orchestrator/train/launch.py), a Tune trial (tune_spaces/sweep.py).
    KeyboardInterrupt / SystemExit pass through untouched."""
    try:
        _test_fault(where)
        yield
    except Exception as e:  # noqa: BLE001 — every error crosses Ray, as itself or as text
        replacement = carried(e)
        if replacement is e:
            raise
        raise replacement from None


def remote_cause(error: BaseException) -> BaseException:
    """The error a worker raised, found in Ray's wrappers (RayTaskError.cause, Train's
    WorkerGroupError.worker_failures, Tune's TuneError chain): the first of our own errors on the
    way, else the innermost one."""
    seen: set[int] = set()
    todo = [error]
    innermost = error
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, RaydistillError):
            return _unwrapped(e)
        innermost = e
        todo += [c for c in (getattr(e, "cause", None), e.__cause__)
                 if isinstance(c, BaseException)]
        todo += [c for c in (getattr(e, "worker_failures", None) or {}).values()
                 if isinstance(c, BaseException)]
    return innermost


def _unwrapped(error: RaydistillError) -> RaydistillError:
    """Ray re-raises a task's error as a class deriving from both RayTaskError and the error's
    class; its `cause` is the error itself."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, RaydistillError) else error


def _test_fault(where: str) -> None:
    """HACK (test hook): RAYDISTILL_TEST_FAULT=`WHERE=module:function` calls that function on
    entering a `remote_errors(WHERE)` block (where: teacher, train, trial), inside the Ray worker,
    so tests can raise an exception of any type there through the real CLI, Ray and boundary.
    Unset, it costs one environment lookup."""
    import os

    spec = os.environ.get("RAYDISTILL_TEST_FAULT", "")
    if spec.startswith(f"{where}="):
        import importlib

        module, _, function = spec.split("=", 1)[1].partition(":")
        getattr(importlib.import_module(module), function)()
