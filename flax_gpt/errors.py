"""The errors a user can cause. The CLI's one error boundary prints any of them as one line
`error: ...` and exits 2 (a `TrainError` exits 1): the message names the problem and the fix.

Everything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; the message is one line: what is wrong, and what to do."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A configuration or argument problem (unknown key, bad value, mesh that does not fit)."""


class DataError(UserError, ValueError):
    """A data problem: bad path, wrong column, corrupt shard, vocab mismatch..."""


class HFError(UserError, ValueError):
    """A Hugging Face import/export/Hub problem (bad folder, not GPT-2, shape mismatch...)."""


class CheckpointError(UserError, ValueError):
    """No usable checkpoint where one was expected, or one that cannot be read."""


class OutputError(UserError, ValueError):
    """An output location that is not ours to write: a foreign folder, a run directory, a file."""


class StorageError(UserError, OSError):
    """A file or bucket operation failed (unreachable, missing, permission, no space)."""


class ResourceError(UserError, RuntimeError):
    """The run needs more memory than the host or accelerator has; the message names what to change."""


class TrainError(UserError, RuntimeError):
    """Training cannot go on (e.g. non-finite loss); the message names the step and what to do."""

    exit_code = 1
