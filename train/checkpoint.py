"""Run directories and Orbax checkpoints.

A run directory holds:

    <run_dir>/config.yaml          the resolved config of the run (written once, at its start)
    <run_dir>/checkpoints/<step>/  Orbax: "state" (params + optimizer state, sharded arrays) and
                                   "meta" (JSON: data position, layout, config)
    <run_dir>/metrics.jsonl        one JSON object per logged step / evaluation
    <run_dir>/tensorboard/         TensorBoard event files

Rerunning the same command resumes from the newest readable checkpoint. A run directory that
holds another model (or tokenizer) is refused; `start_over` moves it aside (nothing is deleted).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
import yaml
from menagerie.arch import ModelConfig

from .config import RunConfig, upgrade_saved
from .distributed import barrier
from .errors import CheckpointError
from .optim import OptimConfig

FORMAT_VERSION = 1
CONFIG_FILE = "config.yaml"


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


def prepare_run_dir(cfg: RunConfig, *, start_over: bool = False) -> Path:
    """Create or check `cfg.run_dir`; returns it. Never deletes anything.

    - new or empty folder: created, the resolved config written;
    - folder of the same model: reused (resume);
    - folder of another model: CheckpointError, unless `start_over`, which renames the old
      folder to `<run_dir>.old-<timestamp>` and starts afresh.
    """
    run_dir = Path(cfg.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(
            f"run_dir '{run_dir}' is a file, not a folder; choose another run_dir"
        )
    saved_path = run_dir / CONFIG_FILE
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not saved_path.is_file():
            if not start_over:
                raise CheckpointError(
                    f"run_dir '{run_dir}' is not empty and holds no {CONFIG_FILE}: not a menagerie "
                    "run; choose another run_dir (or pass --start-over to move it aside)"
                )
        else:
            try:
                saved = yaml.safe_load(saved_path.read_text())
                diffs = _diff(_shape_defining(saved), _shape_defining(cfg.model_dump(mode="json")))
            except Exception:  # noqa: BLE001 - any unreadable saved config is the same problem
                diffs = ["its config.yaml is unreadable"]
            if diffs and not start_over:
                raise CheckpointError(
                    f"run_dir '{run_dir}' holds a run of a different model or optimizer state "
                    f"({'; '.join(diffs[:3])}); "
                    "choose another run_dir, or pass --start-over to move the old run aside"
                )
            if not diffs:
                start_over = False  # same model: resume, keep everything
    move_aside = bool(start_over and run_dir.is_dir() and any(run_dir.iterdir()))
    # Multi-process: every process has checked the folder before process 0 changes it, and
    # only process 0 changes it.
    barrier("run_dir checked")
    try:
        if jax.process_index() == 0:
            if move_aside:
                stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
                backup = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
                os.replace(run_dir, backup)
                print(f"moved the previous run to {backup}")
            run_dir.mkdir(parents=True, exist_ok=True)
        if jax.process_index() == 0 and not saved_path.exists():
            tmp = saved_path.with_suffix(".yaml.tmp")
            tmp.write_text(cfg.to_yaml())
            os.replace(tmp, saved_path)
    except OSError as e:
        raise CheckpointError(
            f"cannot write to run_dir '{run_dir}' ({e.strerror}); choose a writable folder"
        ) from None
    barrier("run_dir ready")
    return run_dir


class Checkpointer:
    """Orbax `CheckpointManager` with fall-back restore and the metadata we need to resume."""

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
            create=True,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        if not force and (self.every == 0 or step % self.every):
            return False
        if step in self.manager.all_steps():
            return False
        meta = {**meta, "format_version": FORMAT_VERSION, "step": step}
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )

    def restore_latest(
        self, abstract_state: Any, warn: Callable[[str], None] = print
    ) -> tuple[Any, dict] | None:
        """Newest readable checkpoint as (state, meta); None if the run has none.

        An unreadable checkpoint (truncated, corrupted) is reported and the previous one used.
        If checkpoints exist but none is readable, CheckpointError: nothing is overwritten.
        """
        steps = self.steps()
        if not steps:
            return None
        failures = []
        for step in reversed(steps):
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
                meta = dict(restored["meta"])
            except Exception as e:  # noqa: BLE001 - any failure means "unreadable"
                reason = (
                    str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
                )
                failures.append(step)
                warn(f"checkpoint at step {step} is unreadable ({reason}); trying an older one")
                continue
            if meta.get("format_version") != FORMAT_VERSION:
                raise CheckpointError(
                    f"checkpoint {self.directory / str(step)} has format "
                    f"{meta.get('format_version')}, this menagerie reads {FORMAT_VERSION}; "
                    "use a matching menagerie version"
                )
            if failures:
                warn(f"resuming from step {step}; unreadable newer checkpoints: {failures}")
            return state, meta
        raise CheckpointError(
            f"no readable checkpoint in '{self.directory}' (tried steps {failures}); "
            "inspect or move that folder, or pass --start-over to move the run aside"
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
