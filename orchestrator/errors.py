"""The one exception type users see: a message that names the problem and the fix."""


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
