"""The optax chain: schedule and AdamW or a low-rank (GaLore, APOLLO) optimizer, with weight
decay on matrices only.

Which parameters are "matrices" is read from their logical axis names (see `train.mesh`), not
from their rank: a scanned RMSNorm scale is [layers, embed], rank 2, yet a vector per layer.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import optax

from . import lowrank
from .config import OptimConfig
from .errors import ConfigError

# Logical axes that do not count towards a parameter's "matrix-ness".
_STACK_AXES = ("layers",)


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Warmup (linear from 0) followed by cosine, constant, or stable-then-linear-decay (WSD)."""
    warmup = min(cfg.warmup_steps, total_steps)
    rest = max(total_steps - warmup, 1)
    final = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=cfg.lr,
            warmup_steps=warmup,
            decay_steps=warmup + rest,
            end_value=final,
        )
    if cfg.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.lr, warmup), optax.constant_schedule(cfg.lr)],
            [warmup],
        )
    # Warmup-stable-decay (Hu et al. 2024, MiniCPM): hold the peak, then decay linearly over the
    # last `decay_fraction` of training.
    decay = max(int(round(cfg.decay_fraction * total_steps)), 1)
    stable = max(total_steps - warmup - decay, 0)
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, cfg.lr, warmup),
            optax.constant_schedule(cfg.lr),
            optax.linear_schedule(cfg.lr, final, decay),
        ],
        [warmup, warmup + stable],
    )


def decay_mask(logical_names: Any) -> Any:
    """True for parameters with two or more non-stack logical axes, none of them "norm".

    Args:
      logical_names: a pytree (same structure as the parameters) whose leaves are tuples of
        logical axis names, as `train.mesh.logical_names` returns.
    """

    def is_matrix(names: tuple) -> bool:
        dims = [n for n in names if n not in _STACK_AXES]
        return len(dims) >= 2 and "norm" not in dims

    return jax.tree.map(is_matrix, logical_names, is_leaf=lambda x: isinstance(x, tuple))


_ROLE_AXES = ("heads", "kv_heads", "mlp")


def _is_leaf(x) -> bool:
    return isinstance(x, tuple)


def matrix_dims(logical_names: Any, patterns: list[str] | None = None) -> Any:
    """`lowrank.MatrixDims` (project) or None (full-rank Adam) per parameter, from its names.

    By role (patterns None): a parameter with an "embed" axis and a heads/kv_heads/mlp axis,
    i.e. the attention and MLP kernels; embeddings, head, norms and vectors get AdamW. The
    matrix splits its non-"layers" axes at the embed boundary: [embed | rest] or [rest | embed];
    leading "layers" axes are a batch of independent matrices (one projector per layer).
    With patterns, a parameter whose path ("blocks/mixer/q/kernel") matches any of them is
    projected; selecting a non-matrix raises ConfigError.
    """
    paths = [
        lowrank._path_str(p)
        for p, _ in jax.tree_util.tree_leaves_with_path(logical_names, is_leaf=_is_leaf)
    ]
    leaves = jax.tree.leaves(logical_names, is_leaf=_is_leaf)
    out = []
    for path, names in zip(paths, leaves, strict=True):
        b = 0
        while b < len(names) and names[b] in _STACK_AXES:
            b += 1
        dims = names[b:]
        if patterns is None:
            chosen = "embed" in dims and any(a in dims for a in _ROLE_AXES)
        else:
            chosen = any(re.search(pat, path) for pat in patterns)
            if chosen and (len(dims) < 2 or "norm" in dims):
                raise ConfigError(
                    f"optim.lowrank_params selects '{path}' with axes {list(names)}, which is not"
                    " a matrix; narrow the pattern to attention/MLP kernels"
                )
        if not chosen:
            out.append(None)
        elif dims[-1] == "embed" and dims[0] != "embed":
            out.append(lowrank.MatrixDims(b, len(dims) - 1))
        else:
            out.append(lowrank.MatrixDims(b, 1))
    return jax.tree.unflatten(jax.tree.structure(logical_names, is_leaf=_is_leaf), out)


def _lowrank_kwargs(cfg: OptimConfig) -> dict:
    common = dict(
        rank=cfg.rank,
        update_proj_gap=cfg.update_proj_gap,
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        moments_on_refresh=cfg.moments_on_refresh,
        stagger=cfg.stagger_refresh,
        side=cfg.proj_side,
        seed=cfg.proj_seed,
    )
    if cfg.name == "apollo":
        return dict(
            common,
            scale=1.0 if cfg.scale is None else cfg.scale,
            scaling=cfg.apollo_scaling,
            norm_growth_limit=cfg.norm_growth_limit,
        )
    return dict(
        common,
        scale=0.25 if cfg.scale is None else cfg.scale,
        projection=cfg.projection,
        fira=cfg.fira,
        svd_method=cfg.svd_method,
        lazy_refresh=cfg.lazy_refresh,
        norm_growth_limit=cfg.norm_growth_limit if cfg.fira else None,
    )


def make_optimizer(
    cfg: OptimConfig, total_steps: int, logical_names: Any
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns (optimizer, schedule). Clipping is done in the train step, not here, so the
    pre-clip gradient norm is logged and checked for finiteness once."""
    schedule = make_schedule(cfg, total_steps)
    if cfg.name == "adamw":
        opt = optax.adamw(
            learning_rate=schedule,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask(logical_names),
        )
    elif cfg.name in ("galore", "apollo"):
        build = lowrank.galore if cfg.name == "galore" else lowrank.apollo
        opt = build(
            schedule,
            matrix_dims(logical_names, cfg.lowrank_params),
            weight_decay_mask=decay_mask(logical_names),
            **_lowrank_kwargs(cfg),
        )
    else:  # pragma: no cover - config validation restricts the names
        raise ValueError(f"unknown optimizer {cfg.name!r}")
    return opt, schedule


def opt_state_logical_names(
    cfg: OptimConfig, abstract_opt: Any, abstract_params: Any, logical_names: Any
) -> Any | None:
    """Logical names for every optimizer-state leaf (tuple leaves; `()` = replicated), or None
    when the parameter-path matching in the trainer suffices (adamw). For galore/apollo the
    projected moments and projectors do not have their parameter's shape; this names their
    layers and full-size axes so they shard with the parameter (see `lowrank.state_logical_names`).
    """
    if cfg.name == "adamw":
        return None
    kw = _lowrank_kwargs(cfg)
    dims = matrix_dims(logical_names, cfg.lowrank_params)
    return lowrank.state_logical_names(
        abstract_opt, abstract_params, logical_names, dims, rank=kw["rank"], side=kw["side"]
    )


def opt_state_shardings(
    cfg: OptimConfig, abstract_opt: Any, abstract_params: Any, logical_names: Any, mesh
) -> Any | None:
    """NamedShardings for the optimizer state from `opt_state_logical_names`, or None (adamw)."""
    from . import mesh as mesh_lib

    names = opt_state_logical_names(cfg, abstract_opt, abstract_params, logical_names)
    if names is None:
        return None
    shape_leaves, treedef = jax.tree.flatten(abstract_opt)
    name_leaves = treedef.flatten_up_to(names)  # names are tuples: stop at the state's leaves
    out = []
    for nm, x in zip(name_leaves, shape_leaves, strict=True):
        nm = tuple(nm) + (None,) * (len(x.shape) - len(nm))
        spec = mesh_lib.logical_to_spec(nm, tuple(x.shape), mesh)
        out.append(jax.sharding.NamedSharding(mesh, spec))
    return jax.tree.unflatten(treedef, out)
