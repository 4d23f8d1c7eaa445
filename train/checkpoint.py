"""Run directories and Orbax checkpoints.

A run directory holds:

    <run_dir>/config.yaml          the resolved config of the run (written at its start)
    <run_dir>/config.<time>.yaml   the config before a resume that read other data (kept)
    <run_dir>/.lock                while a run trains in it: its host, pid, start and command
    <run_dir>/checkpoints/<step>/  Orbax: "state" (params + optimizer state, sharded arrays) and
                                   "meta" (JSON: data position, layout, config)
    <run_dir>/checkpoints/<step>.unreadable-<time>/   an unreadable checkpoint, moved aside
    <run_dir>/metrics.jsonl        one JSON object per logged step / evaluation
    <run_dir>/tensorboard/         TensorBoard event files

Rerunning the same command resumes from the newest readable checkpoint. A run directory that
holds another model (or tokenizer) is refused; `start_over` moves it aside. Nothing is ever
deleted but Orbax's unfinished saves and the checkpoints past `keep_last`.

One training run at a time: `RunLock`. OS errors on any of these files become one line
(`errors.run_folder_error`).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
import yaml
from menagerie.arch import ModelConfig

from .config import RunConfig, upgrade_saved
from .distributed import barrier
from .errors import (
    CheckpointError,
    ClosedOnExit,
    TrainingError,
    run_folder_error,
    run_folder_io,
    shown,
)
from .optim import OptimConfig
from .step import all_finite

FORMAT_VERSION = 1
CONFIG_FILE = "config.yaml"
LOCK_FILE = ".lock"
# Data fields that do not change which tokens are read (a resume may change them silently).
DATA_FIELDS_NOT_READ = ("cache_dir", "num_workers", "prefetch")


def _stamp() -> str:
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def _shape_defining(cfg_dict: dict) -> dict:
    """The parts of a config that fix the shapes and meaning of saved state: the whole model,
    the tokenizer, and the optimizer fields that shape its state (`state_fields`). A config
    saved by an older menagerie is read in today's shape first (`upgrade_saved`)."""
    cfg_dict = upgrade_saved(cfg_dict)
    model = ModelConfig.model_validate(cfg_dict["model"])
    optim = OptimConfig.model_validate(cfg_dict["optim"])
    return {
        "model": model.model_dump(mode="json"),
        "tokenizer": cfg_dict["data"]["tokenizer"],
        "bpe_vocab_size": cfg_dict["data"].get("bpe_vocab_size"),
        "optim": optim.state_signature(),
    }


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: {a!r} -> {b!r}"]


def _check_path(run_dir: Path, start_over: bool) -> None:
    """Refuses a run_dir that checkpoints cannot be written under, or whose --start-over would
    move the current folder aside."""
    absolute = run_dir.absolute()
    try:
        str(absolute).encode("utf-8")
    except UnicodeEncodeError:
        raise CheckpointError(
            f"run_dir '{shown(absolute)}' has a name that is not UTF-8, which checkpoints "
            "cannot be written under; choose a run_dir with a UTF-8 name"
        ) from None
    cwd = Path.cwd().resolve()
    if start_over and (run_dir.resolve() == cwd or run_dir.resolve() in cwd.parents):
        raise CheckpointError(
            f"--start-over would move run_dir '{shown(run_dir)}' aside, and with it the current "
            "folder; run from outside it or name another run_dir"
        )


def prepare_run_dir(cfg: RunConfig, *, start_over: bool = False) -> Path:
    """Create or check `cfg.run_dir`; returns it. Never deletes anything.

    - new or empty folder: created, the resolved config written;
    - folder of the same model: reused (resume);
    - folder of another model: CheckpointError, unless `start_over`, which renames the old
      folder to `<run_dir>.old-<timestamp>` and starts afresh (not while a run holds it).
    """
    run_dir = Path(cfg.run_dir)
    with run_folder_io("use run_dir", run_dir):
        _check_path(run_dir, start_over)
        move_aside = _check_contents(run_dir, cfg, start_over)
        if move_aside and (holder := RunLock(run_dir).holder()) is not None:
            raise RunLock.in_use(run_dir, holder)
    # Multi-process: every process has checked the folder before process 0 changes it, and
    # only process 0 changes it.
    barrier("run_dir checked")
    if jax.process_index() == 0:
        with run_folder_io("write run_dir", run_dir):
            if move_aside:
                backup = run_dir.with_name(f"{run_dir.name}.old-{_stamp()}")
                os.replace(run_dir, backup)
                print(f"moved the previous run to {shown(backup)}")
            run_dir.mkdir(parents=True, exist_ok=True)
            saved_path = run_dir / CONFIG_FILE
            if not saved_path.exists():
                _write_atomic(saved_path, cfg.to_yaml())
    barrier("run_dir ready")
    return run_dir


def _check_contents(run_dir: Path, cfg: RunConfig, start_over: bool) -> bool:
    """Whether the folder must be moved aside (start_over of another run); CheckpointError if
    it holds something else and start_over was not asked."""
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(
            f"run_dir '{shown(run_dir)}' is a file, not a folder; choose another run_dir"
        )
    if not (run_dir.is_dir() and any(run_dir.iterdir())):
        return False
    saved_path = run_dir / CONFIG_FILE
    if not saved_path.is_file():
        if not start_over:
            raise CheckpointError(
                f"run_dir '{shown(run_dir)}' is not empty and holds no {CONFIG_FILE}: not a "
                "menagerie run; choose another run_dir (or pass --start-over to move it aside)"
            )
        return True
    try:
        saved = yaml.safe_load(saved_path.read_text())
        diffs = _diff(_shape_defining(saved), _shape_defining(cfg.model_dump(mode="json")))
    except Exception:  # noqa: BLE001 - any unreadable saved config is the same problem
        diffs = ["its config.yaml is unreadable"]
    if diffs and not start_over:
        raise CheckpointError(
            f"run_dir '{shown(run_dir)}' holds a run of a different model or optimizer state "
            f"({'; '.join(diffs[:3])}); "
            "choose another run_dir, or pass --start-over to move the old run aside"
        )
    return bool(diffs)  # same model: resume, keep everything


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _unused(path: Path) -> Path:
    """`path`, or `<stem>-1<suffix>`, `-2`, ... if it exists."""
    n, out = 0, path
    while out.exists():
        n += 1
        out = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return out


def record_data_change(run_dir: Path, cfg: RunConfig, start: int, warn: Callable[[str], None]):
    """On a run that reads other data than its config.yaml says (data.source, text_field,
    tokenizer, split, ...): one warning line, the old config kept as `config.<time>.yaml` and
    the new one written as config.yaml. Process 0, under the run's lock."""
    saved_path = Path(run_dir) / CONFIG_FILE
    with run_folder_io("record the run's config", saved_path):
        old_text = saved_path.read_text()
        try:
            old = upgrade_saved(yaml.safe_load(old_text))["data"]
        except Exception:  # noqa: BLE001 - prepare_run_dir read it; a damaged one is kept
            old = {}
        new = cfg.data.model_dump(mode="json")
        changed = [
            f"data.{k}: {old.get(k)!r} -> {new.get(k)!r}"
            for k in sorted(set(old) | set(new))
            if k not in DATA_FIELDS_NOT_READ and old.get(k) != new.get(k)
        ]
        if not changed:
            return
        kept = _unused(saved_path.with_name(f"config.{_stamp()}.yaml"))
        _write_atomic(kept, old_text)
        _write_atomic(saved_path, cfg.to_yaml())
    warn(
        f"the data differ from this run's config ({'; '.join(changed)}): batches from step "
        f"{start + 1} on come from the new data; config.yaml now says so, the previous one is "
        f"kept as {kept.name}"
    )


class RunLock:
    """`<run_dir>/.lock`: one training run at a time in a run folder.

    The lock is flock(2) on that file, so the kernel drops it when its process ends, even by
    SIGKILL (on NFS the server does, across hosts); the file says who holds it (JSON: host,
    pid, start time, command) for the message a second run gets. A file left by a run that
    died is taken over with a warning. `release` removes it. On a file system without flock
    the run goes on unlocked, with a warning.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    @staticmethod
    def in_use(run_dir: Path, holder: dict) -> CheckpointError:
        return CheckpointError(
            f"run_dir '{shown(run_dir)}' is in use by another run: {_describe(holder)}; wait "
            "for it to end (or stop it), or choose another run_dir"
        )

    def holder(self) -> dict | None:
        """The holder of a held lock; None if nobody holds it."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd)
        except OSError:  # no flock on this file system
            return None
        finally:
            os.close(fd)
        return None

    def acquire(self, warn: Callable[[str], None] = print) -> None:
        """Takes the lock or raises CheckpointError naming its holder."""
        with run_folder_io("lock run_dir", self.path):
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _read_holder(fd)
                    os.close(fd)
                    raise self.in_use(self.run_dir, holder) from None
                except OSError as e:
                    os.close(fd)
                    if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                        raise
                    warn(
                        f"the file system of {shown(self.run_dir)} does not support locks "
                        f"({e.strerror}): make sure only one run uses it at a time"
                    )
                    return
                if _is_file_at(fd, self.path):
                    break
                os.close(fd)  # its holder removed it between our open and flock: again
            left = _read_holder(fd)
            if left:
                warn(
                    f"{shown(self.path)} was left by {_describe(left)}, which no longer holds "
                    "it (it ended without releasing it); taking it over"
                )
            holder = {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started": datetime.datetime.now().isoformat(timespec="seconds"),
                "command": " ".join(sys.argv),
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder).encode(), 0)
            self._fd = fd

    def release(self) -> None:
        """Removes the file and drops the lock (removed first: nobody takes a lock on a file
        about to vanish, see `acquire`)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):  # a file left behind is taken over next time
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 65536, 0) or b"{}")
    except (OSError, ValueError):
        return {"unreadable": True}
    return holder if isinstance(holder, dict) else {"unreadable": True}


def _describe(holder: dict) -> str:
    if not holder or "pid" not in holder:
        return "a run that has not said who it is"
    return (
        f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')} "
        f"({holder.get('command')})"
    )


def _is_file_at(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    here = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino)


_all_finite = jax.jit(all_finite)


def _quiet_failed_saves() -> None:
    """A failed Orbax save prints tracebacks from its threads (absl records), from TensorStore
    writes that finish after Orbax closed their event loop (unraisable "Event loop is closed")
    and from its abandoned futures (asyncio records); a failed restore leaves Orbax coroutines
    that raise when collected (unraisable, "Encountered error while reading array index"). The
    Checkpointer reports each failure as one line, so these are dropped. MENAGERIE_ORBAX_LOGS=1
    keeps them. Idempotent."""
    if os.environ.get("MENAGERIE_ORBAX_LOGS") or getattr(sys.unraisablehook, "_menagerie", 0):
        return
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_not_from_orbax)
    previous = sys.unraisablehook

    def hook(unraisable):
        exc = unraisable.exc_value
        closed_loop = isinstance(exc, RuntimeError) and "loop is closed" in str(exc)
        if not (closed_loop or _from_orbax(exc, unraisable.exc_traceback)):
            previous(unraisable)

    hook._menagerie = 1
    sys.unraisablehook = hook


def _not_from_orbax(record: logging.LogRecord) -> bool:
    """False for a record Orbax logged, or one about an exception that went through Orbax or
    came from TensorStore."""
    if f"{os.sep}orbax{os.sep}" in record.pathname:
        return False
    if not record.exc_info or record.exc_info[1] is None:
        return True
    return not _from_orbax(record.exc_info[1], record.exc_info[2])


def _from_orbax(exc: BaseException | None, tb) -> bool:
    """Whether an exception came from TensorStore (its errors name the OCDBT database or
    TensorStore) or its traceback `tb` went through Orbax."""
    text = str(exc).lower()
    if "ocdbt" in text or "tensorstore" in text:
        return True
    inside = f"{os.sep}orbax{os.sep}"
    while tb is not None:
        if inside in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


class Checkpointer(ClosedOnExit):
    """Orbax `CheckpointManager` with fall-back restore and the metadata we need to resume.

    Every failure to write (also one that an async save reports later, at the next `save`,
    `wait` or `close`) is one CheckpointError line; a state that is not finite is never saved.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        every: int,
        keep_last: int,
        keep_every: int | None,
        async_save: bool = True,
    ):
        self.every = every
        self.directory = Path(run_dir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep_last,
            keep_period=keep_every,
            enable_async_checkpointing=async_save,
            create=False,  # `prepare_writes`: a reader (eval) writes nothing
            cleanup_tmp_directories=False,
        )
        _quiet_failed_saves()
        with self._io("open checkpoints"):
            self.manager = ocp.CheckpointManager(
                self.directory, options=options, item_names=("state", "meta")
            )

    def prepare_writes(self) -> None:
        """Before a run's first save (process 0 holds the run's lock): the folder exists, and
        the unfinished saves of a run that was killed are removed."""
        if jax.process_index() == 0:
            with run_folder_io("prepare checkpoints", self.directory):
                self.directory.mkdir(exist_ok=True)
                for p in self.directory.iterdir():
                    if (
                        p.name.endswith(".orbax-checkpoint-tmp")
                        or ".orbax-checkpoint-tmp-" in p.name
                    ):
                        shutil.rmtree(p)
        barrier("checkpoints ready")

    @contextlib.contextmanager
    def _io(self, doing: str):
        """Orbax and TensorStore report OS errors as OSError or as text with an error code:
        either becomes `run_folder_error`'s line. (An async save's error surfaces at the next
        `save`, `wait` or `close`, whichever step it was.)"""
        try:
            yield
        except OSError as e:
            raise run_folder_error(e, doing, self.directory) from e
        except (ValueError, RuntimeError) as e:
            raise _checkpoint_error(e, doing, self.directory) from e

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        """Saves `state` at `step` if it is a saving step (or `force`); first reports a failed
        earlier async save. TrainingError if the state is not finite."""
        with self._io("save a checkpoint"):
            self.manager.check_for_errors()
        if not force and (self.every == 0 or step % self.every):
            return False
        if step in self.manager.all_steps():
            return False
        if not bool(jax.device_get(_all_finite(state))):
            raise TrainingError(
                f"refusing to save step {step}: its parameters or optimizer state are not "
                f"finite; {self.resume_point()}"
            )
        meta = {**meta, "format_version": FORMAT_VERSION, "step": step}
        with self._io("save a checkpoint"):
            return self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
                force=True,
            )

    def resume_point(self) -> str:
        """Where a rerun resumes from, in words (after `wait`)."""
        steps = self.steps()
        if not steps:
            return "no checkpoint was saved, a rerun starts afresh"
        return f"a rerun resumes from {self.directory / str(steps[-1])}"

    def restore_latest(
        self,
        abstract_state: Any,
        warn: Callable[[str], None] = print,
        *,
        training: bool = False,
    ) -> tuple[Any, dict] | None:
        """Newest readable checkpoint as (state, meta); None if the run has none.

        An unreadable checkpoint (truncated, corrupted) is reported and the previous one used.
        `training` (the caller holds the run's lock and will save again): each unreadable newer
        checkpoint is moved aside to `<step>.unreadable-<time>`, so that its step can be saved
        again. If checkpoints exist but none is readable, CheckpointError: nothing is moved.
        """
        steps = self.steps()
        if not steps:
            return None
        failures = []
        for step in reversed(steps):
            restored = self._restore(step, abstract_state, warn)
            if restored is None:
                failures.append(step)
                continue
            state, meta = restored
            if meta.get("format_version") != FORMAT_VERSION:
                raise CheckpointError(
                    f"checkpoint {self.directory / str(step)} has format "
                    f"{meta.get('format_version')}, this menagerie reads {FORMAT_VERSION}; "
                    "use a matching menagerie version"
                )
            if failures and training:
                moved = self._move_aside(failures)
                warn(f"resuming from step {step}; moved the unreadable newer ones aside: {moved}")
            elif failures:
                warn(f"using step {step}; unreadable newer checkpoints: {failures}")
            return state, meta
        advice = (
            "move that folder aside, or pass --start-over to move the run aside"
            if training
            else "move that folder aside and train again"
        )
        raise CheckpointError(
            f"no readable checkpoint in '{self.directory}' (tried steps {failures}); {advice}"
        )

    def restore_step(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """The checkpoint of `step` as (state, meta); CheckpointError naming the saved steps if
        there is none, or if it cannot be read."""
        steps = self.steps()
        if step not in steps:
            raise CheckpointError(
                f"'{self.directory}' has no checkpoint of step {step}; saved steps: "
                f"{', '.join(map(str, steps)) or 'none'}"
            )
        reasons: list[str] = []
        restored = self._restore(step, abstract_state, reasons.append)
        if restored is None:
            raise CheckpointError(f"{reasons[0].split('; trying')[0]}; pick another --step")
        return restored

    def _restore(self, step: int, abstract_state: Any, warn) -> tuple[Any, dict] | None:
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    meta=ocp.args.JsonRestore(),
                ),
            )
            state = restored["state"]
            # Touch every array: a truncated file may only fail when it is read.
            jax.block_until_ready(state)
            return state, dict(restored["meta"])
        except Exception as e:  # noqa: BLE001 - any failure means "unreadable"
            reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            warn(f"checkpoint at step {step} is unreadable ({reason}); trying an older one")
            return None

    def _move_aside(self, steps: list[int]) -> str:
        """Renames unreadable step folders (process 0), so that those steps save again."""
        stamp, moved = _stamp(), []
        for step in steps:
            src = self.directory / str(step)
            dst = _unused(self.directory / f"{step}.unreadable-{stamp}")
            if jax.process_index() == 0:
                with run_folder_io("move an unreadable checkpoint aside", src):
                    os.replace(src, dst)
            moved.append(f"{step} -> {dst.name}")
        barrier("unreadable checkpoints moved")
        self.manager.reload()
        return ", ".join(moved)

    def wait(self) -> None:
        with self._io("save a checkpoint"):
            self.manager.wait_until_finished()
            self.manager.check_for_errors()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()


def _checkpoint_error(e: Exception, doing: str, directory: Path) -> CheckpointError:
    """TensorStore's write errors carry the file and an OS error code in their text."""
    text = str(e)
    code = re.search(r"os_error_code='?(\d+)", text)
    path = next(
        (
            m
            for key in ("Failed writing", "Error opening file", "local file")
            if (m := re.search(key + r'[: ]*"([^"]+)"', text))
        ),
        None,
    )
    if code:
        n = int(code.group(1))
        err = OSError(n, os.strerror(n), path.group(1) if path else str(directory))
        return run_folder_error(err, doing, directory)
    first = text.strip().splitlines()[0][:200] if text.strip() else type(e).__name__
    return CheckpointError(f"cannot {doing} in '{directory}': {first}")
