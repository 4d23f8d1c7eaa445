"""`--format mosaics`: a Memory Mosaics run in the official format (facebookresearch/
MemoryMosaics, the naive `StackAssoMem` of `Library/memory_mosaics/models/memory_mosaics.py`).

    menagerie export runs/mosaics-tiny --format mosaics --out exports/mosaics-tiny [--verify]

The folder: `model.pt` (`torch.save` of `official_state_dict`: the official
`StackAssoMem.state_dict()` names, shapes and order, torch Linear/Conv1d weights as [out, in]
(the key maps as Conv1d weights [C, C, 1]), the memories as `M_k{j}`/`M_v{j}` [1, H, P, hs];
tied, `head.weight` is the very tensor `emb.weight`, as in the official state dict),
`config.json` (`official_config`: the `StackAssoMem` keyword arguments) and
`modeling_mosaics.py`, a copy of `export/torch_mosaics.py`: a plain `torch.nn` mirror and its
`load(folder) -> (model, config)`, which `--verify` runs. With the official code:

    model = StackAssoMem(**json.load(open("config.json")), config=SimpleNamespace(skip_tokens=0))
    model.load_state_dict(torch.load("model.pt"))   # strict
    logits = model(tokens, logits_only=True)         # every position (needs config.skip_tokens)

With `--dtype bfloat16` the matrices, the embedding and the memories are stored in bfloat16;
the per-head scalars (which enter as exp(10 p)) and the LayerNorm scales stay float32.

What maps to the official model: the family `mosaics` with the mixer `context_memory` and the
FFN `persistent_memory`, both with the same n_heads (the official `n_head` serves both),
norm_eps 1e-5 (the official LayerNorm's, fixed), and every other field of the parts and the
family at its default (the official v1 model has no other options; `FREE_FIELDS` lists what a
part may set); `check` refuses the rest in one line. The official logits are
`head(x) / sqrt(n_embd)`, as ours: nothing is folded into the head. Our model has no dropout,
so config.json says ic_dropout = hd_dropout = 0 (the official recipe trains with 0.05);
block_size, which sizes the official masks and caps the length the official model runs, is
the run's train.seq_len.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from menagerie.arch.config import ModelConfig
from menagerie.train.errors import ConfigError

from .mirror import load_mirror, mirror_logits, require_torch

FAMILIES = ("mosaics",)
MIRROR = Path(__file__).with_name("torch_mosaics.py")
MODULE_FILE = "modeling_mosaics.py"
NORM_EPS = 1e-5  # the official LayerNorm's, not configurable there


# Fields a part may set freely: the rest must keep their defaults (the official v1 model).
FREE_FIELDS = {
    "context_memory": ("kind", "n_heads", "impl"),
    "persistent_memory": ("kind", "n_heads", "size", "copies"),
}


def check(cfg) -> None:
    """ConfigError (one line) for a mosaics config the official StackAssoMem cannot express:
    other parts, head counts that differ, norm_eps not 1e-5, or any other part or family
    field away from its default (options the official v1 model does not have)."""
    mixer, ffn = cfg.mixer.kind, cfg.ffn.kind
    if mixer != "context_memory" or ffn != "persistent_memory":
        raise ConfigError(
            f"--format mosaics writes the official StackAssoMem, whose blocks are "
            f"context_memory + persistent_memory; this run has model.mixer.kind={mixer} and "
            f"model.ffn.kind={ffn} (no official counterpart: export another run)"
        )
    for where, part in (("model.mixer", cfg.mixer), ("model.ffn", cfg.ffn)):
        _check_defaults(where, part, FREE_FIELDS[part.kind])
    _check_defaults("model", cfg, (*ModelConfig.model_fields, "mixer", "ffn"))
    if cfg.mixer.n_heads != cfg.ffn.n_heads:
        raise ConfigError(
            f"--format mosaics: the official StackAssoMem has one n_head for both memories; "
            f"this run has model.mixer.n_heads={cfg.mixer.n_heads} and "
            f"model.ffn.n_heads={cfg.ffn.n_heads} (train with equal head counts to export it)"
        )
    if cfg.norm_eps != NORM_EPS:
        raise ConfigError(
            f"--format mosaics: the official StackAssoMem's LayerNorms use eps {NORM_EPS:g}; "
            f"this run has model.norm_eps={cfg.norm_eps:g} (train with the default to export it)"
        )


def _check_defaults(where: str, config, free: tuple) -> None:
    for name, field in type(config).model_fields.items():
        value = getattr(config, name)
        if name not in free and value != field.default:
            raise ConfigError(
                f"--format mosaics: {where}.{name}={value!r} has no counterpart in the official "
                f"StackAssoMem (v1), which is {where}.{name}={field.default!r}; export a run "
                "trained without it"
            )


def official_config(cfg, block_size: int = 512) -> dict[str, Any]:
    """The official `StackAssoMem` keyword arguments of `cfg` (vocab_size is the padded table
    size; `block_size` the longest input the official model will take)."""
    check(cfg)
    return {
        "vocab_size": cfg.padded_vocab,
        "n_head": cfg.mixer.n_heads,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layers,
        "v_shift": 1,
        "block_size": block_size,
        "k_fe_type": "linearconv",
        "v_fe_type": "lowrlinearconv",
        "k_kernel_size": 1,
        "v_kernel_size": 2,
        "ic_dropout": 0.0,
        "hd_dropout": 0.0,
        "bias": False,
        "pmem_count": cfg.ffn.copies,
        "pmem_size": cfg.ffn.slots(cfg),
        "pre_ln": True,
        "weight_tying": cfg.tie_embeddings,
        "skip_tokens": 0,
        "attn_only": False,
    }


def _layer(params: dict, i: int, stacked: bool) -> dict:
    """Layer i's parameter subtree (scanned stacks hold every layer in a leading axis)."""
    blocks = params["blocks"]
    return _index_tree(blocks, i) if stacked else blocks[i]


def _index_tree(tree: Any, i: int) -> Any:
    if isinstance(tree, dict):
        return {k: _index_tree(v, i) for k, v in tree.items()}
    return tree[i]


def _in_heads(kernel_DHK: np.ndarray) -> np.ndarray:
    """[out, in] of a key or value map [D, H, hs]."""
    d = kernel_DHK.shape[0]
    return kernel_DHK.reshape(d, -1).T


def _conv(kernel_DHK: np.ndarray) -> np.ndarray:
    """The official Conv1d weight [out, in, 1] of a key map [D, H, hs] (kernel size 1)."""
    return _in_heads(kernel_DHK)[..., None]


def _out_heads(kernel_HKD: np.ndarray) -> np.ndarray:
    """[out, in] of an output map c_proj [H, hs, D]."""
    return kernel_HKD.reshape(-1, kernel_HKD.shape[-1]).T


def _memory_keys(prefix: str, m: dict) -> dict[str, np.ndarray]:
    keys = m["keys"]
    return {
        f"{prefix}.leaky_key_beta": keys["leaky_key_beta"],
        f"{prefix}.kernel_beta": keys["kernel_beta"],
        f"{prefix}.value_beta": m["value_beta"],
    }


def _block(prefix: str, b: dict) -> dict[str, np.ndarray]:
    """One official `AttnOnlyBlock`, in its state-dict order."""
    mixer, ffn = b["mixer"], b["ffn"]
    out = {f"{prefix}.ln1.weight": b["ln1"]["scale"]}
    out |= _memory_keys(f"{prefix}.attn", mixer)
    out |= {
        f"{prefix}.attn.k_featurizer.conv.weight": _conv(mixer["keys"]["wk"]["kernel"]),
        f"{prefix}.attn.v_featurizer.coef": mixer["coef"],
        f"{prefix}.attn.v_featurizer.linear.weight": _in_heads(mixer["wv"]["kernel"]),
        f"{prefix}.attn.c_proj.weight": _out_heads(mixer["c_proj"]["kernel"]),
        f"{prefix}.ln2.weight": b["ln2"]["scale"],
    }
    out |= _memory_keys(f"{prefix}.pmem", ffn)
    for j in range(ffn["mem_k"].shape[0]):
        out[f"{prefix}.pmem.pmem.M_k{j}"] = ffn["mem_k"][j][None]
        out[f"{prefix}.pmem.pmem.M_v{j}"] = ffn["mem_v"][j][None]
    out |= {
        f"{prefix}.pmem.k_featurizer.conv.weight": _conv(ffn["keys"]["wk"]["kernel"]),
        f"{prefix}.pmem.c_proj.weight": _out_heads(ffn["c_proj"]["kernel"]),
    }
    return out


def official_state_dict(cfg, params: dict) -> dict[str, np.ndarray]:
    """The official `StackAssoMem.state_dict()` of `params` (`nnx.state(model, nnx.Param)` as a
    pure dict), in its order: float32 numpy arrays. Tied, `head.weight` is `emb.weight` (the
    same array)."""
    check(cfg)
    params = _to_numpy(params)
    out = {"emb.weight": params["embed"]["table"]}
    for i in range(cfg.n_layers):
        out |= _block(f"blocks.{i}", _layer(params, i, cfg.scan_layers))
    out["ln_out.weight"] = params["ln_out"]["scale"]
    out = {k: np.ascontiguousarray(v) for k, v in out.items()}
    if cfg.tie_embeddings:
        out["head.weight"] = out["emb.weight"]
    else:
        out["head.weight"] = np.ascontiguousarray(params["head"]["kernel"].T)
    return out


def _to_numpy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree, dtype=np.float32)


def write(run: Any, out_dir: Path, dtype: str) -> None:
    """The `--format mosaics` export of a loaded run (`export.run.LoadedRun`) into `out_dir`."""
    verify_requirements()
    import torch

    cfg = run.cfg.model
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    state: dict[str, torch.Tensor] = {}
    for name, value in official_state_dict(cfg, run.params).items():
        if name == "head.weight" and cfg.tie_embeddings:
            state[name] = state["emb.weight"]  # one tensor, as the official tied state dict
            continue
        t = torch.from_numpy(np.array(value))
        state[name] = t if t.ndim < 2 else t.to(torch_dtype)  # 1-D: scalars, LN scales
    torch.save(state, out_dir / "model.pt")
    conf = official_config(cfg, block_size=run.cfg.train.seq_len)
    (out_dir / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
    shutil.copyfile(MIRROR, out_dir / MODULE_FILE)


def load_module(out_dir: Path):
    """The folder's own copy of the mirror (`export.mirror.load_mirror`)."""
    return load_mirror(out_dir, MODULE_FILE)


def reference_logits(out_dir: Path):
    """tokens [B,T] -> logits [B,T,V] of the folder's mirror on CPU (`--verify`)."""
    return mirror_logits(out_dir, MODULE_FILE)


def verify_requirements() -> None:
    """ConfigError unless torch is installed."""
    require_torch("--format mosaics writes a PyTorch checkpoint")
