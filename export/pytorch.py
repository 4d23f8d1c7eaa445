"""`--format torch`: a Megalodon run as a folder that needs only PyTorch.

    menagerie export runs/mega-tiny --format torch --out exports/mega-tiny-torch

The folder: `model.pt` (`torch.save` of the official `Mega.state_dict()` names and shapes, from
`export.megalodon.official_state_dict`), `config.json` (the official `ModelConf` fields,
`export.megalodon.official_config`; vocab_size is the padded table size) and
`modeling_megalodon.py`, a copy of `export/torch_megalodon.py`: a plain `torch.nn` Megalodon
and its `load(folder) -> (model, config)`. With `--dtype bfloat16` the matrices are stored in
bfloat16 and the CEMA, norm and q/k affine parameters stay float32 (as `--format megalodon`);
`load` runs in float32. The folder holds no tokenizer: use the run's (`load_run(run).tokenizer`).

Megalodon only: it is the one family here without a Hugging Face class, and the transformer
family goes to `--format hf` (LlamaForCausalLM). Other architectures get their own mirror
module as they land.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from menagerie.train.errors import ConfigError

from .megalodon import SENSITIVE, official_config, official_state_dict

FAMILIES = ("megalodon",)
MIRROR = Path(__file__).with_name("torch_megalodon.py")
MODULE_FILE = "modeling_megalodon.py"


def write(run: Any, out_dir: Path, dtype: str) -> None:
    """The `--format torch` export of a loaded run (`export.run.LoadedRun`) into `out_dir`."""
    verify_requirements()
    import torch

    cfg = run.cfg.model
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    state = {}
    for name, value in official_state_dict(cfg, run.params).items():
        t = torch.from_numpy(np.array(value))
        if t.is_floating_point() and not any(s in name for s in SENSITIVE):
            t = t.to(torch_dtype)
        state[name] = t
    torch.save(state, out_dir / "model.pt")
    (out_dir / "config.json").write_text(json.dumps(official_config(cfg), indent=2) + "\n")
    shutil.copyfile(MIRROR, out_dir / MODULE_FILE)


def load_module(out_dir: Path):
    """The folder's own copy of the mirror, imported from its file (not from menagerie) under a
    name of its own (registered, as dataclasses need while the module runs)."""
    path = Path(out_dir).absolute() / MODULE_FILE
    name = f"modeling_megalodon_{abs(hash(str(path))):x}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def reference_logits(out_dir: Path) -> Callable[[np.ndarray], np.ndarray]:
    """tokens [B,T] int -> logits [B,T,V] float32 numpy of the folder loaded by its own
    `modeling_megalodon.load` on CPU (`--verify`)."""
    import torch

    model, _ = load_module(out_dir).load(out_dir)

    def logits(tokens_BT: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(np.asarray(tokens_BT, np.int64))).numpy()

    return logits


def verify_requirements() -> None:
    """ConfigError unless torch is installed."""
    if importlib.util.find_spec("torch") is None:
        raise ConfigError(
            "--format torch writes a PyTorch model; install torch first "
            "(pip install torch, or pip install 'menagerie[export]')"
        )
