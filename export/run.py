"""Loading a trained run from Python: the entry point of every export and evaluation.

run = load_run("runs/tiny")            # newest readable checkpoint; step=N for another
out = run.model(tokens_BT)             # the built NNX model with the checkpoint's parameters
run.tokenizer.encode("text"); run.cfg  # its tokenizer and resolved RunConfig; run.step
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from flax import nnx
from menagerie.train.checkpoint import CONFIG_FILE, Checkpointer
from menagerie.train.config import RunConfig, build_config, read_yaml, upgrade_saved
from menagerie.train.errors import CheckpointError


@dataclasses.dataclass
class LoadedRun:
    """A run's model (parameters of checkpoint `step`), tokenizer, resolved config, folder."""

    model: Any
    tokenizer: Any
    cfg: RunConfig
    step: int
    run_dir: Path

    @property
    def params(self) -> dict:
        """The parameters as a nested dict of arrays (`nnx.to_pure_dict`)."""
        return nnx.to_pure_dict(nnx.state(self.model, nnx.Param))


def run_config(run_dir: str | Path, overrides: list[str] = ()) -> RunConfig:
    """The saved config of `run_dir` (upgraded from older menagerie versions)."""
    saved = Path(run_dir) / CONFIG_FILE
    if not saved.is_file():
        raise CheckpointError(
            f"'{run_dir}' holds no run ({CONFIG_FILE} missing); pass the run_dir of a trained run"
        )
    return build_config(upgrade_saved(read_yaml(saved)), [f"run_dir={run_dir}", *overrides])


def load_run(run_dir: str | Path, step: int | None = None, overrides: list[str] = ()) -> LoadedRun:
    """The model of `run_dir` with the parameters of checkpoint `step` (None: the newest
    readable one), its tokenizer and its resolved config. Reads the run's data source for the
    tokenizer, as training did; writes nothing into the run folder."""
    from menagerie.train.trainer import Trainer

    trainer = Trainer(run_config(run_dir, overrides))
    abstract = trainer.abstract_state()
    keep = trainer.cfg.checkpoint
    with Checkpointer(
        trainer.run_dir,
        every=0,
        keep_last=keep.keep_last,
        keep_every=keep.keep_every,
        async_save=False,
    ) as ckpt:
        if step is None:
            restored = ckpt.restore_latest(abstract)
            if restored is None:
                raise CheckpointError(f"'{run_dir}' has no checkpoint yet; train first")
        else:
            restored = ckpt.restore_step(step, abstract)
    state, meta = restored
    model = nnx.merge(trainer.graphdef, state["params"])
    return LoadedRun(model, trainer.tokenizer, trainer.cfg, int(meta["step"]), trainer.run_dir)
