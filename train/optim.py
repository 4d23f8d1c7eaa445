"""The optax chain: schedule, clipping and AdamW, with weight decay on matrices only.

Which parameters are "matrices" is read from their logical axis names (see `train.mesh`), not
from their rank: a scanned RMSNorm scale is [layers, embed], rank 2, yet a vector per layer.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from .config import OptimConfig

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
    else:  # pragma: no cover - config validation restricts the names
        raise ValueError(f"unknown optimizer {cfg.name!r}")
    return opt, schedule
