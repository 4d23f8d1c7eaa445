"""The few error types a user can meet. Each carries one line: what is wrong and how to fix it.

The CLI prints ``str(error)`` and exits 2, with no traceback unless ``--debug``. A Ctrl-C that
saved the run is an `Interrupted` (a KeyboardInterrupt: exit 130).

OS errors on the run folder (its config, lock, metrics and checkpoints) become one
CheckpointError line in one place, `run_folder_error`: what was being done, the file, the
system's reason and the fix for that errno.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from pathlib import Path

from menagerie.data.errors import DataError

__all__ = [
    "MenagerieError",
    "ConfigError",
    "CheckpointError",
    "DataError",
    "TrainingError",
    "Interrupted",
    "run_folder_error",
    "run_folder_io",
    "shown",
]


class MenagerieError(Exception):
    """Base class of the errors the CLI reports as one line."""


class ConfigError(MenagerieError, ValueError):
    """A run config that is malformed, mistyped or inconsistent."""


class CheckpointError(MenagerieError):
    """A run directory or checkpoint that cannot be used as asked."""


class TrainingError(MenagerieError):
    """Training cannot go on (for example, too many non-finite steps in a row)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped the run after saving it; the message says where (the CLI exits 130)."""


USER_ERRORS = (MenagerieError, DataError)

_RESUME = "rerun the same command to resume from the last saved checkpoint"
_FIXES = {
    errno.EACCES: "make it writable or choose another run_dir",
    errno.EPERM: "make it writable or choose another run_dir",
    errno.EROFS: "choose a run_dir on a writable file system",
    errno.ENOSPC: f"free space (or lower checkpoint.keep_last), then {_RESUME}",
    errno.EDQUOT: f"free space under your quota (or lower checkpoint.keep_last), then {_RESUME}",
    errno.EFBIG: f"raise the file size limit (ulimit -f) or choose another run_dir, then {_RESUME}",
    errno.ENAMETOOLONG: "choose a shorter run_dir",
    errno.ENOTDIR: "a part of that path is a file: choose another run_dir",
    errno.ELOOP: "a symbolic link in that path loops: choose another run_dir",
    errno.EIO: f"check the disk, then {_RESUME}",
}


def shown(path: str | Path) -> str:
    """A path as text that prints anywhere: bytes that are not UTF-8 appear as \\xNN."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def run_folder_error(e: OSError, doing: str, path: str | Path | None = None) -> CheckpointError:
    """The one line for an OS error while `doing` something in a run folder: the file, the
    system's reason, and the fix for that errno."""
    where = e.filename if e.filename is not None else path
    where = f" '{shown(where)}'" if where is not None else ""
    reason = e.strerror or type(e).__name__
    fix = _FIXES.get(e.errno, "check that path and its file system")
    return CheckpointError(f"cannot {doing}:{where}: {reason}; {fix}")


@contextlib.contextmanager
def run_folder_io(doing: str, path: str | Path | None = None):
    """Turns an OSError raised inside into `run_folder_error`'s CheckpointError."""
    try:
        yield
    except OSError as e:
        raise run_folder_error(e, doing, path) from e


@contextlib.contextmanager
def removed_on_failure(out: Path):
    """Undo a failed write of the new run folder `out` (absent or empty on entry): the folder
    if this made it, else what went into it. The exception goes on."""
    created = not out.exists()
    try:
        yield
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        elif out.is_dir():
            for p in out.iterdir():
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        raise


class ClosedOnExit:
    """`with obj:` calls `obj.close()` on the way out; an error already on its way out wins
    over one from closing (it would otherwise be replaced by the closing error)."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            with contextlib.suppress(Exception):
                self.close()
