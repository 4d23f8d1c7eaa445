"""`--format torch`: a Megalodon or transformer run as a folder that needs only PyTorch.

    menagerie export runs/mega-tiny --format torch --out exports/mega-tiny-torch [--verify]

The folder: `model.pt` (`torch.save` of the mirror's state dict), `config.json` (the mirror's
config) and the mirror itself, a plain `torch.nn` module with `load(folder) -> (model,
config)` that imports only torch. Per family (`MIRRORS`):

- megalodon: `modeling_megalodon.py`, a copy of `export/torch_megalodon.py`, with the official
  `Mega.state_dict()` names and shapes (`export.megalodon.official_state_dict`) and the official
  `ModelConf` fields (`official_config`; vocab_size is the padded table size).
- transformer: `modeling_transformer.py`, a copy of `export/torch_transformer.py`, with
  `export.transformer`'s `mirror_state_dict` and `mirror_config`. It takes the attention mixer,
  the swiglu, mlp and lte FFNs (LTE over swiglu or mlp, any routing, computed as our model
  does at inference) and the LM head, tied or not, or a lookahead head as at inference (a
  conditioning planner's plan, then the LM head; the training-only modules left out); a run
  with another part is refused in one
  line before anything is written (`export.transformer.check`). A Llama (attention, swiglu,
  lm) also goes to `--format hf`; this format is for the parts Llama lacks.

With `--dtype bfloat16` the matrices are stored in bfloat16 and the parameters a family lists
as sensitive stay float32 (Megalodon: CEMA, norms and q/k affines, as `--format megalodon`;
transformer: norm scales and LTE routers); `load` runs in float32. The folder holds no
tokenizer: use the run's (`load_run(run).tokenizer`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from menagerie.train.errors import ConfigError

from . import megalodon, transformer
from .mirror import load_mirror, mirror_logits, require_torch


class Mirror(NamedTuple):
    """A family's plain-torch mirror and how our config and parameters become its folder."""

    source: Path  # the mirror module, copied into the folder as `module_file`
    module_file: str
    state_dict: Callable[[Any, dict], dict[str, np.ndarray]]  # (model cfg, params) -> arrays
    config: Callable[[Any], dict[str, Any]]  # model cfg -> config.json
    sensitive: tuple[str, ...]  # name parts kept float32 under --dtype bfloat16
    check: Callable[[Any], None] | None = None  # ConfigError for a part it lacks


HERE = Path(__file__).parent
MIRRORS = {
    "megalodon": Mirror(
        HERE / "torch_megalodon.py",
        "modeling_megalodon.py",
        megalodon.official_state_dict,
        megalodon.official_config,
        megalodon.SENSITIVE,
    ),
    "transformer": Mirror(
        HERE / "torch_transformer.py",
        "modeling_transformer.py",
        transformer.mirror_state_dict,
        transformer.mirror_config,
        transformer.SENSITIVE,
        transformer.check,
    ),
}
FAMILIES = tuple(MIRRORS)


def check(model_cfg: Any) -> None:
    """ConfigError (one line) for a part the family's mirror does not have."""
    mirror = MIRRORS[model_cfg.family]
    if mirror.check is not None:
        mirror.check(model_cfg)


def write(run: Any, out_dir: Path, dtype: str) -> None:
    """The `--format torch` export of a loaded run (`export.run.LoadedRun`) into `out_dir`."""
    verify_requirements()
    import torch

    cfg = run.cfg.model
    mirror = MIRRORS[cfg.family]
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    state = {}
    for name, value in mirror.state_dict(cfg, run.params).items():
        t = torch.from_numpy(np.array(value))
        if t.is_floating_point() and not any(s in name for s in mirror.sensitive):
            t = t.to(torch_dtype)
        state[name] = t
    torch.save(state, out_dir / "model.pt")
    (out_dir / "config.json").write_text(json.dumps(mirror.config(cfg), indent=2) + "\n")
    shutil.copyfile(mirror.source, out_dir / mirror.module_file)


def module_file(out_dir: Path) -> str:
    """The name of the mirror module in the folder `out_dir`."""
    for mirror in MIRRORS.values():
        if (Path(out_dir) / mirror.module_file).is_file():
            return mirror.module_file
    names = " or ".join(m.module_file for m in MIRRORS.values())
    raise ConfigError(f"'{out_dir}' holds no {names}; it is not a --format torch export")


def load_module(out_dir: Path):
    """The folder's own copy of the mirror (`export.mirror.load_mirror`)."""
    return load_mirror(out_dir, module_file(out_dir))


def reference_logits(out_dir: Path):
    """tokens [B,T] -> logits [B,T,V] of the folder's mirror on CPU (`--verify`)."""
    return mirror_logits(out_dir, module_file(out_dir))


def verify_requirements() -> None:
    """ConfigError unless torch is installed."""
    require_torch("--format torch writes a PyTorch model")
