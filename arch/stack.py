"""The layer stack every family uses: n identical layers, scanned or looped, with remat.

    self.blocks = stack_layers(lambda rngs: Block(cfg, rngs=rngs), cfg, rngs=rngs)
    x_BTD, aux = run_layers(self.blocks, x_BTD, ctx, cfg)        # aux stacked over layers [L]

A layer is an nnx.Module called `layer(x, ctx) -> (x, aux)` (see `arch.parts`). Scanned layers
are one module whose parameters have a leading "layers" axis (`nnx.vmap` at build, `nnx.scan` at
call), so compile time does not grow with depth; looped layers are an `nnx.List` (per-layer
parameters, easier to debug). Either way the aux dicts come back stacked over layers, ready for
`parts.reduce_aux(aux, stacked=True)`.

Incremental decoding goes through `decode_layers`: each layer's `decode(x, cache, start) -> (x,
cache)`, with the caches stacked over layers like scanned parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from .config import ModelConfig
from .parts import Aux, Ctx

REMAT_POLICIES = {
    "full": None,  # save nothing but the layer input
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def stack_layers(
    make_layer: Callable[[nnx.Rngs], nnx.Module], model: ModelConfig, *, rngs: nnx.Rngs
) -> Any:
    """`model.n_layers` layers from `make_layer(rngs)`: one vmapped module (scan_layers) or an
    nnx.List."""
    if not model.scan_layers:
        return nnx.List([make_layer(rngs) for _ in range(model.n_layers)])

    @nnx.split_rngs(splits=model.n_layers)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_stacked(rngs: nnx.Rngs) -> nnx.Module:
        return make_layer(rngs)

    return make_stacked(rngs)


def _apply_layer(layer: nnx.Module, x: jax.Array, ctx: Ctx) -> tuple[jax.Array, Aux]:
    return layer(x, ctx)


def run_layers(layers: Any, x: jax.Array, ctx: Ctx, model: ModelConfig) -> tuple[jax.Array, Aux]:
    """Apply every layer in order; aux values come back stacked over layers [L]."""
    layer_fn = _apply_layer
    if model.remat != "none":
        # prevent_cse=False is safe (and faster) inside scan, which already stops CSE.
        layer_fn = nnx.remat(
            layer_fn, policy=REMAT_POLICIES[model.remat], prevent_cse=not model.scan_layers
        )
    if model.scan_layers:

        @nnx.scan(
            in_axes=(0, nnx.Carry, None),
            out_axes=(nnx.Carry, 0),
            transform_metadata={nnx.PARTITION_NAME: "layers"},
        )
        def scan_fn(layer, x, ctx):
            return layer_fn(layer, x, ctx)

        return scan_fn(layers, x, ctx)
    auxes = []
    for layer in layers:
        x, aux = layer_fn(layer, x, ctx)
        auxes.append(aux)
    return x, jax.tree.map(lambda *a: jnp.stack(a), *auxes)


def decode_layers(layers: Any, x: jax.Array, caches: Any, start: jax.Array, model: ModelConfig):
    """Every layer's `decode(x, cache, start)` in order: (x, the caches after, stacked [L])."""
    if model.scan_layers:

        @nnx.scan(
            in_axes=(0, nnx.Carry, 0, None),
            out_axes=(nnx.Carry, 0),
            transform_metadata={nnx.PARTITION_NAME: "layers"},
        )
        def scan_fn(layer, x, cache, start):
            return layer.decode(x, cache, start)

        return scan_fn(layers, x, caches, start)
    out = []
    for i, layer in enumerate(layers):
        x, cache = layer.decode(x, jax.tree.map(lambda a, i=i: a[i], caches), start)
        out.append(cache)
    return x, jax.tree.map(lambda *a: jnp.stack(a), *out)


def stacked(cache: Any, model: ModelConfig) -> Any:
    """One layer's cache repeated for each of the model's layers (leading axis [L])."""
    return jax.tree.map(lambda a: jnp.stack([a] * model.n_layers), cache)


@struct.dataclass
class DecodeState:
    """Incremental decoding state of a layer stack: each layer's cache stacked over layers
    [n_layers, ...], the number of tokens seen (int32 scalar) and the head's own state (None
    for a head that reads only the current tokens)."""

    layers: Any
    position: jax.Array
    head: Any = None
