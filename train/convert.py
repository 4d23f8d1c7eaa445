"""`menagerie convert-lte RUN_DIR --out NEW_RUN [--step N] [key=value ...]`: a trained dense run
as the start of an LTE run (arch/lte.py), the paper's flow: group each FFN's neurons into experts
by balanced k-means on the L2-normalised gate-weight rows (`arch.lte_grouping`), permute the FFN
so each expert is a contiguous block, and add fresh routers.

The new run folder is what training writes: config.yaml (the dense run's config with
`model.ffn` = {kind: lte, inner: the dense FFN}, then the caller's overrides, e.g.
model.ffn.hard_from_step=200 train.steps=400) and checkpoint 0 holding the converted
parameters with a fresh optimizer state. `menagerie train -c NEW_RUN/config.yaml` runs both
stages from it. With every gate forced on (`model.ffn.all_experts=true`) the converted model is
the dense one (its FFN sums in another neuron order: equal up to float rounding).

The checks that need no writing run first; NEW_RUN must be new or empty, and a failure after
that removes what was written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from .errors import ConfigError, removed_on_failure, run_folder_io


def convert_to_lte(
    run_dir: str | Path, out: str | Path, *, step: int | None = None, overrides: list[str] = ()
) -> Path:
    """Make the run folder `out` (new or empty) of the dense run `run_dir`'s checkpoint `step`
    (None: the newest) converted to LTE; `overrides` are dotted config overrides. Returns out."""
    from menagerie.export.run import load_run

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out '{out}' exists and is not an empty folder; choose a new one")
    dense = load_run(run_dir, step)
    cfg = lte_config(dense.cfg, out, overrides)
    params = convert_params(dense.params, dense.cfg.model, cfg.model)
    with removed_on_failure(out):
        _write_run(cfg, params, out)
    return out


def lte_config(dense_cfg: Any, out: Path, overrides: list[str]) -> Any:
    """The run config of the converted run: the dense one's with its FFN wrapped in LTE."""
    from menagerie.train.config import build_config

    raw = dense_cfg.model_dump(mode="json")
    ffn = raw["model"].get("ffn")
    if ffn is None or ffn.get("kind") not in ("swiglu", "mlp"):
        kind = ffn.get("kind") if ffn else f"family {raw['model']['family']}"
        raise ConfigError(
            f"the run's FFN ({kind}) has no neurons to group into experts: convert-lte takes a "
            "run whose model.ffn.kind is swiglu or mlp"
        )
    raw["model"]["ffn"] = {"kind": "lte", "inner": ffn}
    raw["model"]["vocab_size"] = dense_cfg.model.vocab_size
    cfg = build_config(raw, [*overrides, f"run_dir={out}"])
    if cfg.model.ffn.kind != "lte" or cfg.model.ffn.inner != dense_cfg.model.ffn:
        raise ConfigError("overrides may set model.ffn's LTE fields, not replace the dense FFN")
    return cfg


def convert_params(dense: dict, dense_model: Any, lte_model: Any) -> dict:
    """The LTE model's parameters: the dense ones, each FFN permuted into expert blocks, and
    fresh routers (the LTE model's own init)."""
    from menagerie import arch

    fresh = nnx.to_pure_dict(nnx.state(arch.build(lte_model, rngs=nnx.Rngs(0)), nnx.Param))
    params = jax.tree.map(np.asarray, dense)
    for ffn_dense, ffn_fresh in zip(
        _ffns(params, dense_model), _ffns(fresh, lte_model), strict=True
    ):
        inner = _permuted(ffn_dense, lte_model.ffn, stacked=dense_model.scan_layers)
        ffn_dense.clear()
        ffn_dense.update({k: v for k, v in ffn_fresh.items() if k != "inner"}, inner=inner)
    return params


def _ffns(params: dict, model: Any) -> list[dict]:
    """The FFN parameter dicts of a model: one stacked over layers, or one per layer."""
    blocks = params["blocks"]
    return [blocks["ffn"]] if model.scan_layers else [blocks[i]["ffn"] for i in sorted(blocks)]


def _permuted(ffn: dict, lte: Any, *, stacked: bool) -> dict:
    """One dense FFN's parameters with the neurons of each expert made contiguous."""
    from menagerie.arch.lte_grouping import expert_permutation, permute_ffn

    ins = ("gate", "up") if lte.inner.kind == "swiglu" else ("up",)
    kernel_DF = ffn[ins[0]]["kernel"]
    layers = kernel_DF if stacked else kernel_DF[None]
    perms = np.stack([expert_permutation(k.T, lte.expert_size) for k in layers])
    return permute_ffn(ffn, perms if stacked else perms[0], in_names=ins, out_names=("down",))


def _write_run(cfg: Any, params: dict, out: Path) -> None:
    from menagerie.train.checkpoint import CONFIG_FILE
    from menagerie.train.trainer import Trainer

    with run_folder_io("write the converted run", out):
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_FILE).write_text(cfg.to_yaml())
    Trainer(cfg).save_initial(params)


def describe(out: Path) -> str:
    """The CLI's closing line: where the run is and how to go on."""
    return (
        f"converted into {out} (checkpoint 0, FFNs grouped into experts); train both stages with "
        f"`menagerie train -c {out / 'config.yaml'}`"
    )
