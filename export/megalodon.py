"""Megalodon parameters in the official format (XuezheMax/megalodon, world size 1).

`official_state_dict` maps a menagerie Megalodon's parameters to the flat state dict that the
official `Mega` module holds (`torch.save` of it is what its consolidated checkpoints contain):
the official module names and shapes, torch `Linear` weights as [out, in], the TimestepNorm
buffers (prior_count 0, prior_mean 0, prior_logv 0) and the RoPE `freqs` buffer. Arrays are
numpy here; `save_official` writes them with torch (an optional dependency, imported there).
`official_config` is the official `ModelConf` of the config, by its field names.

The folder is what the official `megalodon.reloading.reload_model(dir)` reads: `consolidated.pth`,
`config.json` ({"model": ModelConf fields, "tokenizer": TokenizerConf fields}) and
`consolidate_config.json` ({"model_parallel_size": 1, "dtype": "fp32" | "bf16"}). The official
code tokenizes with a SentencePiece model whose size must equal `vocab_size`: the tokenizer
path is left null (pass `tokenizer_path=` to `reload_model`), and a byte-level run's table
(384 rows) has no SentencePiece counterpart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from menagerie.arch.megalodon import MegalodonConfig

FAMILIES = ("megalodon",)
SENSITIVE = ("timenorm", "cema", "norm", "rmsnorm", ".gamma", ".beta", ".alpha")


def official_config(cfg: MegalodonConfig) -> dict[str, Any]:
    """The official `ModelConf` fields of `cfg` (vocab_size is the padded table size)."""
    return {
        "num_layers": cfg.n_layers,
        "model_dim": cfg.d_model,
        "z_dim": cfg.z_dim,
        "value_dim": cfg.value_dim,
        "num_heads": cfg.num_heads,
        "ffn_hidden_dim": cfg.ffn_hidden_dim,
        "cema_ndim": cfg.cema_ndim,
        "chunk_size": cfg.chunk_size,
        "vocab_size": cfg.padded_vocab,
        "output_size": -1,
        "norm_num_groups": cfg.norm_num_groups,
        "norm_affine": True,
        "norm_eps": cfg.norm_eps,
        "rope_base": cfg.rope_base,
        "swiglu": cfg.swiglu,
        "rescale_nffn": cfg.rescale_nffn,
        "scale_emb": cfg.scale_emb,
        "share_emb": cfg.tie_embeddings,
        "init_mode": "he",
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
        "efficient_attn": None,
    }


def _layer(params: dict, i: int, stacked: bool) -> dict:
    """Layer i's parameter subtree (scanned stacks hold every layer in a leading axis)."""
    blocks = params["blocks"]
    if not stacked:
        return blocks[i]
    return _index_tree(blocks, i)


def _index_tree(tree: Any, i: int) -> Any:
    if isinstance(tree, dict):
        return {k: _index_tree(v, i) for k, v in tree.items()}
    return tree[i]


def _timenorm(prefix: str, tn: dict, groups: int) -> dict[str, np.ndarray]:
    return {
        f"{prefix}.prior_count": np.asarray(0, np.int64),
        f"{prefix}.prior_mean": np.zeros(groups, np.float32),
        f"{prefix}.prior_logv": np.zeros(groups, np.float32),
        f"{prefix}.weight": tn["weight"],
        f"{prefix}.bias": tn["bias"],
    }


def _mega(prefix: str, m: dict, cfg: MegalodonConfig) -> dict[str, np.ndarray]:
    d, n = cfg.d_model, cfg.cema_ndim
    cema = m["cema"]
    out = _timenorm(f"{prefix}.timenorm", m["timenorm"], cfg.norm_num_groups)
    out |= {
        f"{prefix}.cema.alpha": cema["alpha"].reshape(d, n, 1),
        f"{prefix}.cema.delta": cema["delta"].reshape(d, n, 1),
        f"{prefix}.cema.theta": cema["theta"].reshape(d, 1, 1),
        f"{prefix}.cema.gamma": cema["gamma"],
        f"{prefix}.cema.omega": cema["omega"].reshape(d, 1),
        f"{prefix}.rmsnorm.weight": m["rmsnorm"],
        f"{prefix}.gamma": m["gamma"],
        f"{prefix}.beta": m["beta"],
    }
    for name in ("wz", "wv", "wr", "wh1", "wh2"):
        out[f"{prefix}.{name}.weight"] = m[name]["kernel"].T
        if "bias" in m[name]:
            out[f"{prefix}.{name}.bias"] = m[name]["bias"]
    return out


def _nffn(prefix: str, f: dict) -> dict[str, np.ndarray]:
    out = {f"{prefix}.norm.weight": f["norm_weight"], f"{prefix}.norm.bias": f["norm_bias"]}
    for name in ("fc1", "fc2", "fc3"):
        if name in f:
            out[f"{prefix}.{name}.weight"] = f[name]["kernel"].T
    if "alpha" in f:
        out[f"{prefix}.alpha"] = f["alpha"]
    return out


def official_state_dict(cfg: MegalodonConfig, params: dict) -> dict[str, np.ndarray]:
    """The official `Mega.state_dict()` (world size 1) of `params`, a nested dict of arrays
    (`nnx.state(model, nnx.Param)` as pure dict). float32 numpy arrays, int64 prior counts."""
    params = _to_numpy(params)
    hz = cfg.z_dim // cfg.num_heads
    out = {
        "embed.weight": params["embed"]["table"],
        "rope.freqs": (1.0 / cfg.rope_base ** (np.arange(0, hz, 2) / hz)).astype(np.float32),
    }
    for i in range(cfg.n_layers):
        layer = _layer(params, i, cfg.scan_layers)
        out |= _mega(f"layers.{i}.mega", layer["mega"], cfg)
        out |= _nffn(f"layers.{i}.nffn", layer["nffn"])
    out |= _timenorm("output.final_norm", params["final_norm"], cfg.norm_num_groups)
    table = params["embed"]["table"] if cfg.tie_embeddings else params["output"]["kernel"].T
    out["output.output.weight"] = np.array(table)
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _to_numpy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree, dtype=np.float32)


def save_official(cfg: MegalodonConfig, params: dict, out_dir: Path, *, dtype: str = "float32"):
    """Write `consolidated.pth` (torch.save of the official state dict; matrices in `dtype`,
    norms, CEMA and q/k affines kept float32 as the official code keeps them),
    `config.json` and `consolidate_config.json` into `out_dir` (see the module docstring)."""
    import torch  # optional dependency: `pip install menagerie[export]`

    out_dir.mkdir(parents=True, exist_ok=True)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    state = {}
    for name, value in official_state_dict(cfg, params).items():
        t = torch.from_numpy(np.array(value))
        if t.is_floating_point() and not any(s in name for s in SENSITIVE):
            t = t.to(torch_dtype)
        state[name] = t
    torch.save(state, out_dir / "consolidated.pth")
    conf = {"model": official_config(cfg), "tokenizer": {"path": None}}
    official_dtype = {"float32": "fp32", "bfloat16": "bf16"}[dtype]
    consolidate = {"model_parallel_size": 1, "dtype": official_dtype}
    for name, value in (("config.json", conf), ("consolidate_config.json", consolidate)):
        (out_dir / name).write_text(json.dumps(value, indent=2) + "\n")


def write(run, out_dir: Path, dtype: str) -> None:
    """The `--format megalodon` export of a loaded run (`export.run.LoadedRun`)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        from menagerie.train.errors import ConfigError

        raise ConfigError(
            "--format megalodon writes a torch checkpoint; install torch first "
            "(pip install torch, or pip install 'menagerie[export]')"
        ) from None
    save_official(run.cfg.model, run.params, out_dir, dtype=dtype)
