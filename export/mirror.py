"""A plain-torch mirror module copied into an export folder (`--format torch`, `--format
mosaics`): imported from the folder's own file, and run for `--verify`."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
from menagerie.train.errors import ConfigError


def load_mirror(out_dir: Path, module_file: str) -> ModuleType:
    """The folder's own copy of the mirror, imported from its file (not from menagerie) under a
    name of its own (registered, as dataclasses need while the module runs)."""
    path = Path(out_dir).absolute() / module_file
    name = f"{Path(module_file).stem}_{abs(hash(str(path))):x}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def mirror_logits(out_dir: Path, module_file: str) -> Callable[[np.ndarray], np.ndarray]:
    """tokens [B,T] int -> logits [B,T,V] float32 numpy of the folder loaded by its mirror's
    `load(folder)` on CPU (`--verify`)."""
    import torch

    model, _ = load_mirror(out_dir, module_file).load(out_dir)

    def logits(tokens_BT: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(np.asarray(tokens_BT, np.int64))).numpy()

    return logits


def require_torch(what: str) -> None:
    """ConfigError "`what`; install torch first ..." unless torch is installed."""
    if importlib.util.find_spec("torch") is None:
        raise ConfigError(
            f"{what}; install torch first (pip install torch, or pip install 'menagerie[export]')"
        )
