"""`mesh`: the shardings of the parameters and of the optimizer state, from logical names; the
hybrid (DCN x ICI) layout and the mesh config checks.

An `AbstractMesh` of 2 x 2 x 2 stands in for the devices: shardings only need the axis sizes.
Frozen dataclasses with ids and process / slice indices stand in for the devices of a hybrid mesh
(tests/train/test_hybrid_mesh.py builds it on simulated and multi-process devices).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pydantic
import pytest
from jax.experimental import mesh_utils
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P
from menagerie.train import mesh as mesh_lib
from menagerie.train.config import MeshConfig, build_config, check_mesh_fits
from menagerie.train.errors import ConfigError

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


# ---- hybrid (DCN x ICI) meshes, on stand-in devices: only ids, process and slice indices matter


@dataclass(frozen=True)
class FakeDevice:
    id: int
    process_index: int
    platform: str = "gpu"
    device_kind: str = "fake"  # no topology handler in mesh_utils: plain reshapes per granule


@dataclass(frozen=True)
class FakeSliceDevice(FakeDevice):
    platform: str = "tpu"
    slice_index: int = 0


def _ids(grid) -> np.ndarray:
    return np.vectorize(lambda d: d.id)(np.asarray(grid))


@pytest.mark.parametrize(
    "inner, outer",
    [((1, 2, 2, 1), (2, 1, 1, 1)), ((2, 1, 2, 1), (2, 2, 1, 1)), ((1, 1, 2, 2), (1, 2, 1, 2))],
)
def test_hybrid_grid_lays_devices_out_as_jax_does(inner, outer):
    """The CPU reshape is the layout of mesh_utils.create_hybrid_device_mesh (process granules):
    a swapped outer/inner interleave would put one granule's devices on every stride."""
    per, count = math.prod(inner), math.prod(outer)
    devices = [FakeDevice(i, i // per, "cpu") for i in range(per * count)]
    granules = [devices[g * per : (g + 1) * per] for g in range(count)]
    want = mesh_utils.create_hybrid_device_mesh(inner, outer, devices, process_is_granule=True)
    got = mesh_lib.hybrid_grid(granules, inner, outer)
    assert got.shape == tuple(o * i for o, i in zip(outer, inner, strict=True))
    np.testing.assert_array_equal(_ids(got), _ids(want))


def test_each_axis_is_dcn_times_inner_and_the_fill_is_per_granule():
    cfg = MeshConfig(data=-1, fsdp=2, dcn_data=4)
    assert mesh_lib.mesh_shape(cfg, 64) == {"data": 32, "fsdp": 2, "tensor": 1, "sequence": 1}
    cfg = MeshConfig(data=1, fsdp=-1, tensor=2, dcn_data=2, dcn_fsdp=2)
    assert mesh_lib.mesh_shape(cfg, 32) == {"data": 2, "fsdp": 8, "tensor": 2, "sequence": 1}
    with pytest.raises(ConfigError, match="4 granules .* do not split 6 devices"):
        mesh_lib.mesh_shape(MeshConfig(dcn_data=2, dcn_fsdp=2), 6)
    with pytest.raises(ConfigError, match="leave 4/3 devices for mesh.data.* per granule"):
        mesh_lib.mesh_shape(MeshConfig(tensor=3, dcn_data=2), 8)


def test_processes_are_the_granules_and_a_dcn_shape_of_another_count_is_refused():
    """Two processes of two devices: data crosses the DCN, fsdp stays inside each process; a
    DCN shape for 4 processes names the 2 there are and the setting that fits."""
    devices = [FakeDevice(i, i // 2) for i in range(4)]
    mesh = mesh_lib.make_mesh(MeshConfig(data=1, fsdp=2, dcn_data=2), devices)
    procs = np.vectorize(lambda d: d.process_index)(mesh.devices)
    np.testing.assert_array_equal(procs[:, :, 0, 0], [[0, 0], [1, 1]])
    with pytest.raises(ConfigError, match=r"multiply to 4 but this run has 2 processes; .*=2"):
        mesh_lib.make_mesh(MeshConfig(dcn_data=4), devices)
    uneven = [FakeDevice(i, min(i, 1)) for i in range(3)]
    with pytest.raises(ConfigError, match=r"processes hold different numbers of devices"):
        mesh_lib.make_mesh(MeshConfig(dcn_data=2), uneven)


def test_one_process_per_gpu_groups_consecutive_processes_into_nodes():
    """SLURM with one task per GPU: 8 processes of one device on 2 nodes (dcn_data=2) are 2
    granules of 4 consecutive processes, so fsdp stays inside a node. Catches: each process
    taken as a granule (the DCN shape refused, or fsdp spread across nodes)."""
    devices = [FakeDevice(i, i) for i in range(8)]
    mesh = mesh_lib.make_mesh(MeshConfig(data=1, fsdp=4, dcn_data=2), devices)
    procs = np.vectorize(lambda d: d.process_index)(mesh.devices)
    np.testing.assert_array_equal(procs[:, :, 0, 0], [[0, 1, 2, 3], [4, 5, 6, 7]])


def test_slices_are_the_granules_where_devices_have_one():
    """TPU: slices, not hosts, are what the DCN joins (4 hosts in 2 slices: 2 granules)."""
    devices = [FakeSliceDevice(i, i // 2, slice_index=i // 4) for i in range(8)]
    unit, granules = mesh_lib.device_granules(devices, {"data": 2})
    assert unit == "slice" and [[d.id for d in g] for g in granules] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ConfigError, match="but this run has 2 slices"):
        mesh_lib.device_granules(devices, {"data": 4})


def test_mesh_config_checks():
    with pytest.raises(pydantic.ValidationError, match=r"mesh.dcn_data=0 must be >= 1"):
        MeshConfig(dcn_data=0)
    with pytest.raises(pydantic.ValidationError, match=r"mesh.dcn_fsdp=-1 must be >= 1"):
        MeshConfig(dcn_fsdp=-1)
    with pytest.raises(ConfigError, match=r"dcn_sequence=2: 4 devices\) does not divide .*=66"):
        build_config({}, ["mesh.sequence=2", "mesh.dcn_sequence=2", "train.seq_len=66"])
    # ring attention cuts the sequence into 2 x 4 zigzag chunks: 68 is not enough, 72 is
    with pytest.raises(ConfigError, match=r"2 x 4 zigzag chunks .*\(e.g. train.seq_len=72\)"):
        build_config({}, ["mesh.sequence=2", "mesh.dcn_sequence=2", "train.seq_len=68"])
    build_config({}, ["mesh.sequence=2", "mesh.dcn_sequence=2", "train.seq_len=72"])
    cfg = build_config(
        {}, ["mesh.data=1", "mesh.sequence=-1", "train.seq_len=66"]
    )  # size known on the mesh
    with pytest.raises(ConfigError, match=r"\(mesh.sequence=-1: 4 devices\) does not divide"):
        check_mesh_fits(cfg, 1, sequence=4)
