"""The few error types a user can meet. Each carries one line: what is wrong and how to fix it.

The CLI prints ``str(error)`` and exits 2, with no traceback unless ``--debug``.
"""

from menagerie.data.errors import DataError

__all__ = ["MenagerieError", "ConfigError", "CheckpointError", "DataError", "TrainingError"]


class MenagerieError(Exception):
    """Base class of the errors the CLI reports as one line."""


class ConfigError(MenagerieError, ValueError):
    """A run config that is malformed, mistyped or inconsistent."""


class CheckpointError(MenagerieError):
    """A run directory or checkpoint that cannot be used as asked."""


class TrainingError(MenagerieError):
    """Training cannot go on (for example, too many non-finite steps in a row)."""


USER_ERRORS = (MenagerieError, DataError)
