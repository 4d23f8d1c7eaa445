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

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .megalodon import SENSITIVE, official_config, official_state_dict
from .mirror import load_mirror, mirror_logits, require_torch

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
    """The folder's own copy of the mirror (`export.mirror.load_mirror`)."""
    return load_mirror(out_dir, MODULE_FILE)


def reference_logits(out_dir: Path):
    """tokens [B,T] -> logits [B,T,V] of the folder's mirror on CPU (`--verify`)."""
    return mirror_logits(out_dir, MODULE_FILE)


def verify_requirements() -> None:
    """ConfigError unless torch is installed."""
    require_torch("--format torch writes a PyTorch model")
