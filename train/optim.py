"""Optimizers: one config class per optimizer (the `optim:` section, a choice on `name`), each
building its optax chain; the schedule; weight decay and low-rank selection by parameter role.

Which parameters are "matrices", and which matrices GaLore projects, is read from their logical
axis names and the roles `arch.axes` gives them, not from their rank: a scanned RMSNorm scale is
[layers, embed], rank 2, yet a vector per layer.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

import jax
import optax
import pydantic
from menagerie.arch import axes
from menagerie.arch.config import Choice

from . import lowrank
from .errors import ConfigError


class OptimConfig(Choice):
    """The `optim:` section: schedule, clipping and the fields every optimizer shares.
    Optimizers subclass it with a `name` (adamw, galore, apollo)."""

    key: ClassVar[str] = "name"
    choices: ClassVar[dict[str, type[Choice]]] = {}
    # Fields that fix the shapes of the optimizer state (a run folder refuses changes to them).
    state_fields: ClassVar[tuple[str, ...]] = ("name",)

    name: str
    """Optimizer: adamw; galore (low-rank projected Adam moments on the attention and MLP
    matrices, AdamW elsewhere; see `train.lowrank`); apollo (random projection, channel-wise
    scaling of the raw gradient)."""
    lr: float = 3e-3
    """Peak learning rate."""
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """Warmup then cosine decay, warmup-stable-decay, or warmup then constant."""
    warmup_steps: int = 50
    """Linear warmup from 0 to `lr` over this many steps (at most `train.steps`)."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of `lr` (cosine and wsd)."""
    decay_fraction: float = 0.2
    """wsd only: the fraction of `train.steps` spent in the final linear decay."""
    b1: float = 0.9
    """Adam first-moment decay."""
    b2: float = 0.95
    """Adam second-moment decay."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay, on the parameters `weight_decay_on` selects."""
    weight_decay_on: Literal["matrices", "all"] = "matrices"
    """Which parameters weight decay applies to: matrices (by axis roles, `arch.axes.is_matrix`;
    not norm scales, biases or other vectors) or all of them (plain torch AdamW on
    `model.parameters()`, as the official Megalodon code trains)."""
    clip_norm: float | None = 1.0
    """Global gradient-norm clipping threshold; null disables clipping."""

    @pydantic.model_validator(mode="after")
    def _check_common(self) -> OptimConfig:
        if self.lr <= 0:
            raise ValueError(f"optim.lr={self.lr} must be > 0")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"optim.decay_fraction={self.decay_fraction} must be in (0, 1]")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            raise ValueError("optim.b1 and optim.b2 must be in [0, 1)")
        if self.eps <= 0 or self.weight_decay < 0:
            raise ValueError("optim.eps must be > 0 and optim.weight_decay >= 0")
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ValueError(f"optim.clip_norm={self.clip_norm} must be > 0, or null to disable")
        return self

    def build(
        self, total_steps: int, logical_names: Any
    ) -> tuple[optax.GradientTransformation, optax.Schedule]:
        """(optimizer, schedule) for parameters named `logical_names` (a tree of tuples, as
        `train.mesh.logical_names` gives). Clipping is done in the train step, not here, so the
        pre-clip gradient norm is logged and checked for finiteness once."""
        raise NotImplementedError(f"optimizer {self.name!r} does not define build()")

    def state_logical_names(
        self, abstract_opt: Any, abstract_params: Any, logical_names: Any
    ) -> Any | None:
        """Logical names of every optimizer-state leaf, or None when each leaf that mirrors a
        parameter shards like it (the rest replicated)."""
        return None

    @property
    def uses_lapack(self) -> bool:
        """Whether its updates call LAPACK (an SVD): the trainer then limits LAPACK's CPU
        threads at start-up."""
        return False

    def state_signature(self) -> dict[str, Any]:
        """The values of `state_fields`: equal signatures give equal state shapes."""
        return {f: getattr(self, f) for f in self.state_fields}


class AdamWConfig(OptimConfig):
    """AdamW (Loshchilov & Hutter 2019), decay on `weight_decay_on` (default: matrices)."""

    name: Literal["adamw"] = "adamw"
    """Selects this optimizer."""

    def build(self, total_steps, logical_names):
        schedule = make_schedule(self, total_steps)
        opt = optax.adamw(
            learning_rate=schedule,
            b1=self.b1,
            b2=self.b2,
            eps=self.eps,
            weight_decay=self.weight_decay,
            mask=decay_mask(logical_names, self.weight_decay_on),
        )
        return opt, schedule


class LowRankConfig(OptimConfig):
    """Fields the GaLore family shares (`train.lowrank`)."""

    state_fields: ClassVar[tuple[str, ...]] = (
        "name",
        "rank",
        "proj_side",
        "stagger_refresh",
        "lowrank_params",
    )

    rank: int = 128
    """Rank r of the projection (paper: 128/256/256/512 at 60M/130M/350M/1B). A matrix whose
    smaller side is <= rank gets full-rank Adam instead."""
    update_proj_gap: int = 200
    """T, steps between projector refreshes."""
    scale: float = 0.25
    """alpha, scale of the low-rank update."""
    proj_side: Literal["std", "reverse_std", "left", "right"] = "std"
    """Which side is compressed. std: the smaller (official); reverse_std: the larger
    (optax.contrib.galore)."""
    moments_on_refresh: Literal["keep", "reproject"] = "keep"
    """Keep the Adam moments as they are when the projector changes (official) or rotate them
    into the new basis (GaLore issue #54)."""
    stagger_refresh: bool = False
    """Spread refreshes over the gap (matrix j at step j*T/J mod T), one SVD at a time, instead
    of all matrices at the same step."""
    proj_seed: int = 0
    """Seed of random projections."""
    lowrank_params: list[str] | None = None
    """Regular expressions on parameter paths (e.g. 'blocks/mixer/q/kernel') selecting the
    projected matrices; null: by role, every matrix with a model-width axis and a lowrank
    feature axis (the attention and MLP kernels, as the paper does; see arch/axes.py)."""

    @pydantic.model_validator(mode="after")
    def _check_lowrank(self) -> LowRankConfig:
        if self.rank <= 0:
            raise ValueError(f"optim.rank={self.rank} must be a positive integer (e.g. 128)")
        if self.update_proj_gap <= 0:
            raise ValueError(
                f"optim.update_proj_gap={self.update_proj_gap} must be >= 1 (paper: 200)"
            )
        if self.scale <= 0:
            raise ValueError(f"optim.scale={self.scale} must be > 0")
        for pattern in self.lowrank_params or ():
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(
                    f"optim.lowrank_params: {pattern!r} is not a regular expression ({e})"
                ) from None
        limit = getattr(self, "norm_growth_limit", None)
        if limit is not None and limit < 1:
            raise ValueError(f"optim.norm_growth_limit={limit} must be >= 1 (papers: 1.01)")
        return self

    def options(self) -> lowrank.LowRankOptions:
        """The `lowrank.LowRankOptions` this config selects."""
        return lowrank.LowRankOptions(
            rank=self.rank,
            update_proj_gap=self.update_proj_gap,
            scale=self.scale,
            b1=self.b1,
            b2=self.b2,
            eps=self.eps,
            side=self.proj_side,
            moments_on_refresh=self.moments_on_refresh,
            stagger=self.stagger_refresh,
            seed=self.proj_seed,
            **self.own_options(),
        )

    def own_options(self) -> dict[str, Any]:
        """The `LowRankOptions` fields particular to this optimizer."""
        raise NotImplementedError

    def build(self, total_steps, logical_names):
        schedule = make_schedule(self, total_steps)
        opt = lowrank.galore(
            schedule,
            matrix_dims(logical_names, self.lowrank_params),
            weight_decay=self.weight_decay,
            weight_decay_mask=decay_mask(logical_names, self.weight_decay_on),
            options=self.options(),
        )
        return opt, schedule

    def state_logical_names(self, abstract_opt, abstract_params, logical_names):
        """The projected moments and projectors do not have their parameter's shape; this names
        their layers and full-size axes so they shard with the parameter (see
        `lowrank.state_logical_names`)."""
        dims = matrix_dims(logical_names, self.lowrank_params)
        return lowrank.state_logical_names(
            abstract_opt, abstract_params, logical_names, dims, options=self.options()
        )


class GaLoreConfig(LowRankConfig):
    """GaLore (Zhao et al. 2024) and its successors Fira and Q-GaLore's lazy refresh."""

    name: Literal["galore"] = "galore"
    """Selects this optimizer."""
    state_fields: ClassVar[tuple[str, ...]] = LowRankConfig.state_fields + (
        "projection",
        "fira",
        "lazy_refresh",
    )

    projection: Literal["svd", "random"] = "svd"
    """Projector from the gradient's SVD, or a seeded random Gaussian (SVD-free)."""
    svd_method: Literal["qr", "default", "gram"] = "default"
    """How the projector is computed: fp32 SVD by jnp's default (divide and conquer, LAPACK
    gesdd, as torch uses; the faster on one LAPACK thread), by LAPACK gesvd (qr), or as the top
    eigenvectors of the smaller Gram matrix (gram: cheapest, sharding-friendly)."""
    fira: bool = False
    """Add Fira's norm-scaled residual (the part of the gradient outside the subspace)."""
    lazy_refresh: bool = False
    """Q-GaLore's adaptive gap (doubles when the subspace stops moving)."""
    norm_growth_limit: float | None = 1.01
    """Fira's norm-growth limiter gamma (with `fira` only); null disables it."""

    @property
    def uses_lapack(self) -> bool:
        return self.projection == "svd"

    def own_options(self) -> dict[str, Any]:
        return dict(
            projection=self.projection,
            fira=self.fira,
            svd_method=self.svd_method,
            lazy_refresh=self.lazy_refresh,
            norm_growth_limit=self.norm_growth_limit if self.fira else None,
        )


class ApolloConfig(LowRankConfig):
    """APOLLO (Zhu et al. 2024): random projection, channel-wise scaling of the raw gradient."""

    name: Literal["apollo"] = "apollo"
    """Selects this optimizer."""
    state_fields: ClassVar[tuple[str, ...]] = LowRankConfig.state_fields + ("norm_growth_limit",)

    scale: float = 1.0
    """alpha, scale of the update. The official APOLLO code's `scale` is alpha squared (it
    multiplies by its square root): its APOLLO-Mini scale 128 is 11.31 here."""
    apollo_scaling: Literal["channel", "tensor"] = "channel"
    """Channel-wise scaling (APOLLO) or one scale per matrix (APOLLO-Mini, rank 1)."""
    norm_growth_limit: float | None = 1.01
    """Norm-growth limiter gamma; null disables it."""

    def own_options(self) -> dict[str, Any]:
        return dict(
            projection="random",
            apollo_scaling=self.apollo_scaling,
            norm_growth_limit=self.norm_growth_limit,
        )


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


def decay_mask(logical_names: Any, on: Literal["matrices", "all"] = "matrices") -> Any:
    """Which parameters weight decay applies to (`optim.weight_decay_on`): with "matrices",
    True for matrices (`arch.axes.is_matrix`: two or more non-stack axes, no vector axis);
    with "all", True for every parameter.

    Args:
      logical_names: a pytree (same structure as the parameters) whose leaves are tuples of
        logical axis names, as `train.mesh.logical_names` returns.
      on: "matrices" or "all".
    """
    if on == "all":
        return jax.tree.map(lambda _: True, logical_names, is_leaf=_is_leaf)
    if on != "matrices":
        raise ValueError(f"weight decay on {on!r}; choose 'matrices' or 'all'")
    return jax.tree.map(axes.is_matrix, logical_names, is_leaf=_is_leaf)


def _is_leaf(x) -> bool:
    return isinstance(x, tuple)


def matrix_dims(logical_names: Any, patterns: list[str] | None = None) -> Any:
    """`lowrank.MatrixDims` (project) or None (full-rank Adam) per parameter, from its names.

    By role (patterns None): `arch.axes.is_lowrank_by_role`, i.e. the attention and MLP
    kernels; embeddings, head, norms and vectors get AdamW. The matrix splits its non-stack
    axes at the model-width axis: [embed | rest] or [rest | embed]; leading stack ("layers")
    axes are a batch of independent matrices (one projector per layer). With patterns, a
    parameter whose path ("blocks/mixer/q/kernel") matches any of them is projected; selecting a
    non-matrix raises ConfigError.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(logical_names, is_leaf=_is_leaf)
    paths = [lowrank.path_str(p) for p, _ in flat]
    for pattern in patterns or ():
        if not any(re.search(pattern, path) for path in paths):
            raise ConfigError(
                f"optim.lowrank_params: {pattern!r} matches no parameter (paths look like "
                f"'{paths[min(2, len(paths) - 1)]}'); fix the pattern or drop it"
            )
    out = [
        _matrix_dims_one(path, names, patterns)
        for path, (_, names) in zip(paths, flat, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)


def _matrix_dims_one(path: str, names: tuple, patterns: list[str] | None):
    if patterns is None:
        chosen = axes.is_lowrank_by_role(names)
    else:
        chosen = any(re.search(pat, path) for pat in patterns)
        if chosen and not axes.is_matrix(names):
            raise ConfigError(
                f"optim.lowrank_params selects '{path}' with axes {list(names)}, which is not"
                " a matrix; narrow the pattern to attention/MLP kernels"
            )
    if not chosen:
        return None
    b = axes.stack_prefix(names)
    dims = names[b:]
    model_last = axes.get(dims[-1]).role == "model" and axes.get(dims[0]).role != "model"
    return lowrank.MatrixDims(b, len(dims) - 1) if model_last else lowrank.MatrixDims(b, 1)


def make_optimizer(
    cfg: OptimConfig, total_steps: int, logical_names: Any
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns (optimizer, schedule): `cfg.build(total_steps, logical_names)`."""
    return cfg.build(total_steps, logical_names)


def opt_state_logical_names(
    cfg: OptimConfig, abstract_opt: Any, abstract_params: Any, logical_names: Any
) -> Any | None:
    """Logical names for every optimizer-state leaf (tuple leaves; `()` = replicated), or None
    when each leaf that mirrors a parameter shards like it (adamw)."""
    return cfg.state_logical_names(abstract_opt, abstract_params, logical_names)
