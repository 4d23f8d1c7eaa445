"""Primitives every part builds on: parameters with logical names, sharding constraints, RMSNorm,
linear maps, the embedding table.

Conventions
- Parameters are stored in `param_dtype` and cast to `compute_dtype` where they are used; in
  float32 mode every cast is a no-op and XLA sees none.
- Every parameter carries logical axis names in its `out_sharding` metadata (flax 0.12), set
  through `param(...)`; the names and their roles are declared in `arch.axes`. nnx.vmap/scan
  add "layers" in front for stacked blocks. Only train/mesh.py maps names to mesh axes.
- Activations are named through `constrain(x, names)`; it is a no-op unless a mesh is active
  and logical-axis rules are set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd as core_spmd

from .config import ModelConfig

# Logical names of activation axes (distinct from parameter names so FSDP can shard
# parameters on "embed" without sharding activations the same way; see arch.axes).
BATCH, SEQ = "batch", "seq"
ACT_EMBED, ACT_HEADS, ACT_KV_HEADS, ACT_MLP, ACT_VOCAB = (
    "act_embed",
    "act_heads",
    "act_kv_heads",
    "act_mlp",
    "act_vocab",
)

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dtype_of(name: str) -> jnp.dtype:
    """`"float32" | "bfloat16"` -> jnp dtype."""
    return _DTYPES[name]


def param(
    rngs: nnx.Rngs,
    shape: Sequence[int],
    names: Sequence[str],
    *,
    std: float | None,
    dtype: jnp.dtype,
    init: jax.nn.initializers.Initializer | None = None,
) -> nnx.Param:
    """A parameter initialised N(0, std) (or ones when std is None, or by `init` when given)
    with logical axis names.

    eager_sharding=False: the trainer initialises under jit with out_shardings derived from
    the names, so the variable must not try to shard itself at creation (that would need a
    mesh and rules inside every test).
    """
    if init is None:
        init = jax.nn.initializers.ones if std is None else jax.nn.initializers.normal(std)
    init = nnx.with_partitioning(init, tuple(names), eager_sharding=False)
    return nnx.Param(init(rngs.params(), tuple(shape), dtype))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical axis names.

    No-op unless a mesh is active (`jax.set_mesh`) and logical-axis rules are set
    (`flax.core.spmd.set_logical_axis_rules` / `nnx.logical_axis_rules`). Names missing
    from the rules are left unconstrained (None).
    """
    table = _active_rules()
    if table is None:
        return x
    spec = jax.sharding.PartitionSpec(*(table.get(n) if n else None for n in names))
    return jax.lax.with_sharding_constraint(x, spec)


def _active_rules() -> dict | None:
    """Logical name -> mesh axes under the active mesh and logical-axis rules, without the
    mesh axes a shard_map made manual; None when no mesh or no rules are active."""
    rules = core_spmd.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh is None or mesh.empty:
        return None
    table: dict = {}
    manual = set(mesh.manual_axes)  # inside shard_map: those axes are the code's, not XLA's
    for logical, mesh_axes in rules:  # first match wins, as in flax's rule lookup
        table.setdefault(logical, _without(mesh_axes, manual))
    return table


def _without(mesh_axes, manual: set):
    """A rule's mesh axes minus the manual ones (None when nothing is left)."""
    if mesh_axes is None or not manual:
        return mesh_axes
    kept = tuple(a for a in ((mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes))
    kept = tuple(a for a in kept if a not in manual)
    return kept[0] if len(kept) == 1 else (kept or None)


class RMSNorm(nnx.Module):
    """RMSNorm (Zhang & Sennrich 2019) with statistics in float32; scale named ("norm",)."""

    def __init__(self, dim: int, *, eps: float, param_dtype, compute_dtype, rngs: nnx.Rngs):
        self.scale = param(rngs, (dim,), ("norm",), std=None, dtype=param_dtype)
        self.eps = eps
        self.compute_dtype = compute_dtype

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        x = x_BTD.astype(jnp.float32)
        ms = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        y = x * jax.lax.rsqrt(ms + self.eps) * self.scale[...].astype(jnp.float32)
        return y.astype(self.compute_dtype)


class Linear(nnx.Module):
    """y = x @ W contracting the trailing `len(in_shape)` axes of x with W[*in_shape, *out_shape].

    `names` are the logical names of W's axes, e.g. ("embed", "heads", "head_dim") for a query
    projection [D,H,Dh]. The output has x's leading axes followed by out_shape, in
    `compute_dtype` (or `out_dtype`). With `bias`, b[*out_shape] (zeros, named like W's output
    axes) is added; `init` replaces the N(0, std) init of W.
    """

    def __init__(
        self,
        in_shape: int | Sequence[int],
        out_shape: int | Sequence[int],
        names: Sequence[str],
        *,
        std: float | None,
        param_dtype,
        compute_dtype,
        rngs: nnx.Rngs,
        bias: bool = False,
        init: jax.nn.initializers.Initializer | None = None,
    ):
        in_shape = (in_shape,) if isinstance(in_shape, int) else tuple(in_shape)
        out_shape = (out_shape,) if isinstance(out_shape, int) else tuple(out_shape)
        assert len(names) == len(in_shape) + len(out_shape), (names, in_shape, out_shape)
        shape = in_shape + out_shape
        self.kernel = param(rngs, shape, names, std=std, dtype=param_dtype, init=init)
        zeros = jax.nn.initializers.zeros
        out_names = names[len(in_shape) :]
        self.bias = (
            param(rngs, out_shape, out_names, std=None, dtype=param_dtype, init=zeros)
            if bias
            else None
        )
        self.n_in = len(in_shape)
        self.compute_dtype = compute_dtype

    def __call__(self, x: jax.Array, *, out_dtype=None) -> jax.Array:
        w = self.kernel[...].astype(self.compute_dtype)
        y = matmul_2d(x.astype(self.compute_dtype), w, self.n_in, out_dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


class Embed(nnx.Module):
    """Token embedding table [V, D] named ("vocab", "embed"); `attend` is the tied LM head."""

    def __init__(
        self, vocab: int, dim: int, *, std: float, param_dtype, compute_dtype, rngs, init=None
    ):
        names = ("vocab", "embed")
        self.table = param(rngs, (vocab, dim), names, std=std, dtype=param_dtype, init=init)
        self.compute_dtype = compute_dtype

    def __call__(self, tokens_BT: jax.Array) -> jax.Array:
        """int32 [B,T] -> [B,T,D] compute_dtype."""
        return jnp.take(self.table[...], tokens_BT, axis=0).astype(self.compute_dtype)

    def attend(self, x_BTD: jax.Array) -> jax.Array:
        """[B,T,D] -> logits [B,T,V] float32 (x @ table^T)."""
        table = self.table[...].astype(self.compute_dtype).T
        return matmul_2d(x_BTD.astype(self.compute_dtype), table, 1, jnp.float32)


def matmul_2d(x: jax.Array, w: jax.Array, n_in: int, out_dtype=None) -> jax.Array:
    """x [..., *in] @ w [*in, *out] -> [..., *out], computed as one [N, K] @ [K, M] matmul.

    The same numbers as a dot_general over the trailing axes, but XLA:CPU differentiates the
    flattened form about twice as fast: the weight gradient of a dot_general that contracts
    two leading axes ([B,T] of x and of the cotangent) gets a transposed copy of a [B*T, F]
    operand, which took a tenth of a Megalodon train step (2026-12-01, 4096 x 8; an FFN's
    forward and backward alone: 1.07 s as [B,T,D], 0.55 s flattened). Not for activations
    whose sequence axis is sharded: merging it into the batch axis would all-gather them
    (then the dot_general contracts the trailing axes as they are)."""
    if x.ndim - n_in > 1 and _sequence_sharded():
        dims = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        return jax.lax.dot_general(x, w, (dims, ((), ())), preferred_element_type=out_dtype)
    lead, k_in = x.shape[: x.ndim - n_in], w.shape[:n_in]
    out = w.shape[n_in:]
    w2 = w.reshape(math.prod(k_in), math.prod(out))
    y = jax.lax.dot_general(
        x.reshape(math.prod(lead), w2.shape[0]),
        w2,
        (((1,), (0,)), ((), ())),
        preferred_element_type=out_dtype,
    )
    return y.reshape(*lead, *out)


def linear(
    model: ModelConfig,
    in_shape: int | Sequence[int],
    out_shape: int | Sequence[int],
    names: Sequence[str],
    *,
    rngs: nnx.Rngs,
) -> Linear:
    """A `Linear` with the model's init std and dtypes."""
    return Linear(
        in_shape,
        out_shape,
        names,
        std=model.init_std,
        param_dtype=dtype_of(model.param_dtype),
        compute_dtype=dtype_of(model.compute_dtype),
        rngs=rngs,
    )


def rms_norm(model: ModelConfig, dim: int | None = None, *, rngs: nnx.Rngs) -> RMSNorm:
    """An `RMSNorm` over `dim` (default d_model) with the model's eps and dtypes."""
    return RMSNorm(
        model.d_model if dim is None else dim,
        eps=model.norm_eps,
        param_dtype=dtype_of(model.param_dtype),
        compute_dtype=dtype_of(model.compute_dtype),
        rngs=rngs,
    )


def _sequence_sharded() -> bool:
    """Whether the active mesh shards activations' "seq" axis (outside a shard_map that
    already made those mesh axes manual)."""
    table = _active_rules()
    rule = None if table is None else table.get("seq")
    names = (rule,) if isinstance(rule, str) else tuple(rule or ())
    mesh = jax.sharding.get_abstract_mesh()
    return math.prod(mesh.shape[a] for a in names if a in mesh.axis_names) > 1
