"""Modules with random parameters instead of their initialisation, for tests that compare two
implementations: random norm scales, imaginary parts and affines (not the initialisation's
zeros) make every parameter move the output, so a misplaced weight or a skipped +1 shows."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def spread(names: list, shape: tuple) -> float:
    """The spread of a random parameter: matrices ~ 1/sqrt(fan in), the embedding ~ 1/sqrt(D),
    the rest O(0.3..1)."""
    name = names[-1]
    if name == "kernel":
        return 1 / math.sqrt(shape[-2])
    if name == "table":
        return 1 / math.sqrt(shape[-1])
    if "cema" in names:
        return {"theta": 1.0, "gamma": 1.0}.get(name, 0.5)
    return 0.3  # biases, norm scales and shifts, q/k gamma and beta, the NFFN layer scale


def random_module(factory, seed: int):
    """`factory()`'s module (built abstractly, no initialisers run) with random parameters."""
    graphdef, state = nnx.split(nnx.eval_shape(factory))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        names = [getattr(k, "key", None) for k in path]
        return jnp.asarray(rng.standard_normal(leaf.shape) * spread(names, leaf.shape), leaf.dtype)

    pure = jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)
