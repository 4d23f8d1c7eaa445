"""`mesh`: the shardings of the parameters and of the optimizer state, from logical names.

An `AbstractMesh` of 2 x 2 x 2 stands in for the devices: shardings only need the axis sizes.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P
from menagerie.train import mesh as mesh_lib

MESH = AbstractMesh((2, 2, 2, 1), mesh_lib.MESH_AXES)
PARAMS = {
    "embed": {"table": jax.ShapeDtypeStruct((8, 4), jnp.float32)},
    "blocks": {
        "w": jax.ShapeDtypeStruct((2, 4, 6), jnp.float32),
        "scale": jax.ShapeDtypeStruct((2, 4), jnp.float32),
    },
}
NAMES = {
    "embed": {"table": ("vocab", "embed")},
    "blocks": {"w": ("layers", "embed", "mlp"), "scale": ("layers", "norm")},
}


def sharding(names: tuple, shape: tuple) -> NamedSharding:
    return NamedSharding(MESH, mesh_lib.logical_to_spec(names, shape, MESH))


def test_param_shardings_follow_names_and_short_names_replicate_the_rest():
    sh = mesh_lib.shardings_for(NAMES, PARAMS, MESH)
    assert sh["blocks"]["w"] == sharding(("layers", "embed", "mlp"), (2, 4, 6))
    assert sh["blocks"]["w"].spec != P(None, None, None)  # the rules do shard it
    short = mesh_lib.shardings_for({"x": ("embed",)}, {"x": PARAMS["blocks"]["w"]}, MESH)
    assert short["x"] == sharding(("embed", None, None), (2, 4, 6))


def test_adam_moments_take_their_parameters_shardings_and_the_rest_is_replicated():
    param_sh = mesh_lib.shardings_for(NAMES, PARAMS, MESH)
    opt = jax.eval_shape(optax.adamw(1e-3).init, PARAMS)
    sh = mesh_lib.opt_state_shardings(opt, PARAMS, param_sh, MESH)
    assert jax.tree.structure(sh) == jax.tree.structure(opt)
    for moments in (sh[0].mu, sh[0].nu):
        assert moments == param_sh
    assert sh[0].count == mesh_lib.replicated(MESH)
    # A leaf at a parameter's path but of another shape is not that parameter's mirror.
    other = {"stats": {"blocks": {"w": jax.ShapeDtypeStruct((2, 4), jnp.float32)}}}
    sh = mesh_lib.opt_state_shardings(other, PARAMS, param_sh, MESH)
    assert sh["stats"]["blocks"]["w"] == mesh_lib.replicated(MESH)


class _LowRankLike(NamedTuple):
    count: jax.ShapeDtypeStruct
    mu: dict


def test_named_optimizer_state_is_sharded_by_its_names():
    """Names are a tree with the state's structure and one tuple per leaf (never split)."""
    param_sh = mesh_lib.shardings_for(NAMES, PARAMS, MESH)
    state = _LowRankLike(
        count=jax.ShapeDtypeStruct((), jnp.int32),
        mu={"w": jax.ShapeDtypeStruct((2, 3, 6), jnp.float32)},  # [layers, rank, mlp]
    )
    names = _LowRankLike(count=(), mu={"w": ("layers", None, "mlp")})
    sh = mesh_lib.opt_state_shardings(state, PARAMS, param_sh, MESH, opt_names=names)
    assert jax.tree.structure(sh) == jax.tree.structure(state)
    assert sh.mu["w"] == sharding(("layers", None, "mlp"), (2, 3, 6))
    assert sh.mu["w"].spec != P(None, None, None)
    assert sh.count == NamedSharding(MESH, P())
