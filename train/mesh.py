"""The device mesh and the one table that maps logical axis names to mesh axes.

Models name every parameter axis logically ("embed", "mlp", "heads", ...); nothing outside this
file knows which mesh axis a logical axis lands on. A dimension that a mesh axis does not divide
is replicated instead (reported once), so odd vocabularies or head counts never fail to shard.
`shardings_for` and `opt_state_shardings` are the one place that turns names into the shardings
of the parameters and of the optimizer state.

`make_mesh` builds the data x fsdp x tensor x sequence mesh; with `mesh.dcn_<axis>` > 1 it is a
hybrid mesh (`mesh_utils.create_hybrid_device_mesh`): each slice or process holds a contiguous
block of every axis, so only the axes with a DCN factor cross the slower network between them.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from menagerie.arch import axes as arch_axes

from .config import MESH_AXES, MeshConfig
from .errors import ConfigError


def logical_rules() -> dict[str, str | tuple[str, ...] | None]:
    """logical axis -> mesh axis (or tuple of mesh axes, or None = replicated), from the axis
    vocabulary `arch.axes` (a part that declares a new axis there gets its rule with it)."""
    return {name: axis.mesh for name, axis in arch_axes.all_axes().items()}


def axis_rules(mesh: Mesh):
    """Context that activates the rules for the models' activation constraints (inside jit
    tracing), dropping mesh axes of size 1 so single-device runs carry no constraints."""

    def live(rule):
        axes = (rule,) if isinstance(rule, str) else tuple(rule or ())
        axes = tuple(a for a in axes if mesh.shape[a] > 1)
        return axes[0] if len(axes) == 1 else (axes or None)

    return nnx.logical_axis_rules([(k, live(v)) for k, v in logical_rules().items()])


def mesh_shape(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
    """Axis sizes (dcn x inner per axis, the -1 axis filled) of a mesh of `num_devices` devices;
    ConfigError if they do not multiply to the devices."""
    outer = cfg.outer()
    granules = math.prod(outer.values())
    if num_devices % granules:
        raise ConfigError(
            f"mesh.dcn_* sizes {_nontrivial(outer)} make {granules} granules (slices or nodes), "
            f"which do not split {num_devices} devices evenly; use a device count that "
            f"{granules} divides"
        )
    inner = inner_shape(cfg, num_devices // granules, granules)
    return {axis: outer[axis] * inner[axis] for axis in MESH_AXES}


def inner_shape(cfg: MeshConfig, per_granule: int, granules: int = 1) -> dict[str, int]:
    """Axis sizes inside one granule of `per_granule` devices, the -1 axis filled."""
    sizes = cfg.inner()
    where = f"{per_granule} devices" + (" per granule" if granules > 1 else "")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    fill = [a for a, v in sizes.items() if v == -1]
    if fill:
        if per_granule % fixed:
            raise ConfigError(
                f"mesh sizes {sizes} leave {per_granule}/{fixed} devices for mesh.{fill[0]}, "
                f"not a whole number; make the fixed axes divide {where}"
            )
        sizes[fill[0]] = per_granule // fixed
    elif fixed != per_granule:
        raise ConfigError(
            f"mesh sizes {sizes} multiply to {fixed} but there are {where}; "
            "set one axis to -1 to fill"
        )
    return sizes


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """The mesh of `cfg` over `devices` (default: all of them, every process's). Without a DCN
    split, one topology-aware grid; with one, `hybrid_grid`: each granule (slice or process)
    holds a contiguous block along every axis, so axes with dcn_<axis> = 1 stay inside one."""
    devices = jax.devices() if devices is None else list(devices)
    outer = cfg.outer()
    if math.prod(outer.values()) == 1:
        sizes = mesh_shape(cfg, len(devices))
        shape = tuple(sizes[a] for a in MESH_AXES)
        try:
            grid = mesh_utils.create_device_mesh(shape, devices=devices)
        except Exception:  # noqa: BLE001 - CPU and odd topologies: plain reshape is fine
            grid = np.asarray(devices).reshape(shape)
        return Mesh(grid, MESH_AXES)
    unit, granules = device_granules(devices, outer)
    inner = inner_shape(cfg, len(granules[0]), len(granules))
    inner_t, outer_t = tuple(inner.values()), tuple(outer.values())
    grid = None
    if unit in ("slice", "process"):  # real slices or processes: JAX picks their topology
        try:
            grid = mesh_utils.create_hybrid_device_mesh(
                inner_t, outer_t, devices, process_is_granule=unit == "process"
            )
        except Exception:  # noqa: BLE001 - a granule shape its topology cannot take: reshape
            grid = None
    if grid is None:
        grid = hybrid_grid(granules, inner_t, outer_t)
    return Mesh(grid, MESH_AXES)


def device_granules(devices: list, outer: dict[str, int]) -> tuple[str, list[list]]:
    """The devices grouped by what the DCN joins: ("slice", ...) by `slice_index` on TPU (or
    where devices name several slices), else ("process", ...) by `process_index`. On CPU with a
    single process, ("pseudo", ...): the simulated devices in as many contiguous blocks (by id)
    as the dcn_* sizes ask for, so a hybrid layout is built and tested on one machine. With a
    multiple of that many processes (one per GPU), ("node", ...): consecutive processes grouped.
    ConfigError, one line saying what to set, when the granules do not match the dcn_* product
    or differ in size."""
    count = math.prod(outer.values())
    slices = {getattr(d, "slice_index", None) for d in devices}
    # CPU devices of a multi-process run carry slice_index 0 too: slices only where they are
    # TPU slices, or where there are several (say, NVLink domains).
    tpu = devices[0].platform == "tpu"
    unit = "slice" if None not in slices and (tpu or len(slices) > 1) else "process"
    by_key: dict[int, list] = {}
    for d in devices:
        by_key.setdefault(getattr(d, f"{unit}_index"), []).append(d)
    granules = [by_key[k] for k in sorted(by_key)]
    if len(granules) == 1 and devices[0].platform == "cpu" and unit == "process":
        n = len(devices)
        if n % count:
            raise ConfigError(
                f"mesh.dcn_* sizes {_nontrivial(outer)} multiply to {count} but this run has 1 "
                f"process, and its {n} simulated CPU devices do not split into {count} equal "
                f"blocks to stand in for processes; set the mesh.dcn_* sizes to 1 (one process), "
                f"or simulate a multiple of {count} devices "
                "(XLA_FLAGS=--xla_force_host_platform_device_count=N)"
            )
        ordered = sorted(devices, key=lambda d: d.id)
        return "pseudo", [ordered[i * n // count : (i + 1) * n // count] for i in range(count)]
    if unit == "process" and len(granules) > count and len(granules) % count == 0:
        return "node", _processes_per_node(granules, count)
    if len(granules) != count:
        k = len(granules)
        raise ConfigError(
            f"mesh.dcn_* sizes {_nontrivial(outer)} multiply to {count} but this run has {k} "
            f"{_PLURAL[unit] if k != 1 else unit}; set them to multiply to {k} (e.g. "
            f"mesh.dcn_data={k}), or all to 1 for no DCN split"
        )
    if len({len(g) for g in granules}) > 1:
        raise ConfigError(
            f"the {_PLURAL[unit]} hold different numbers of devices "
            f"({[len(g) for g in granules]}); a hybrid mesh needs equal ones: give each the "
            "same devices, or set the mesh.dcn_* sizes to 1"
        )
    return unit, granules


def _processes_per_node(granules: list[list], nodes: int) -> list[list]:
    """One process per GPU (SLURM's `srun --ntasks-per-node=G`, what `MENAGERIE_DISTRIBUTED=auto`
    expects): `nodes` blocks of consecutive processes, the processes of one node (schedulers
    number a node's tasks consecutively, SLURM's default block distribution)."""
    per = len(granules) // nodes
    return [[d for g in granules[i * per : (i + 1) * per] for d in g] for i in range(nodes)]


def hybrid_grid(granules: list[list], inner: tuple[int, ...], outer: tuple[int, ...]):
    """Device grid of shape outer * inner (per axis) in which granule g, at position `outer_idx`
    of the outer grid (row-major), fills the block [outer_idx * inner, (outer_idx + 1) * inner)
    in the order of its device list: the layout of `mesh_utils.create_hybrid_device_mesh`
    (np.block of per-granule meshes), as a plain reshape for devices without a topology."""
    flat = np.empty(sum(len(g) for g in granules), dtype=object)
    flat[:] = [d for g in granules for d in g]
    k = len(inner)
    index_OI = np.arange(flat.size).reshape(*outer, *inner)  # [o_0 .. o_k, i_0 .. i_k]
    interleaved = index_OI.transpose([j for a in range(k) for j in (a, k + a)])  # o_0 i_0 o_1 ..
    return flat[interleaved.reshape([o * i for o, i in zip(outer, inner, strict=True)])]


_PLURAL = {"slice": "slices", "process": "processes"}


def _nontrivial(outer: dict[str, int]) -> str:
    """'dcn_data=4, dcn_fsdp=2' (the axes that cross the DCN)."""
    return ", ".join(f"dcn_{a}={v}" for a, v in outer.items() if v > 1) or "all 1"


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


_reported: set[tuple] = set()


def logical_to_spec(names: tuple, shape: tuple[int, ...], mesh: Mesh) -> P:
    """PartitionSpec for one array from its logical axis names, through `arch.axes`."""
    used: set[str] = set()
    out: list = []
    for dim, name in zip(shape, names, strict=True):
        rule = arch_axes.get(name).mesh if name is not None else None
        axes = (rule,) if isinstance(rule, str) else tuple(rule or ())
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        size = math.prod(mesh.shape[a] for a in axes)
        if axes and dim % size:
            key = (name, dim, axes)
            if key not in _reported:
                _reported.add(key)
                warnings.warn(
                    f"logical axis '{name}' of size {dim} is not divisible by mesh axes "
                    f"{axes} ({size}); replicating it",
                    stacklevel=2,
                )
            axes = ()
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else (axes or None))
    return P(*out)


def logical_names(state: nnx.State) -> dict:
    """Pure-dict tree of tuples of logical axis names, one per parameter (from its metadata).
    ConfigError if a parameter uses a name that `arch.axes` does not declare: it would have no
    sharding rule and no role."""
    specs = nnx.to_pure_dict(nnx.get_partition_spec(state))
    names = jax.tree.map(
        lambda p: tuple(p) if p is not None else (),
        specs,
        is_leaf=lambda x: isinstance(x, P) or x is None,
    )
    for path, leaf in jax.tree_util.tree_leaves_with_path(names, is_leaf=_is_names):
        missing = arch_axes.undeclared(leaf)
        if missing:
            raise ConfigError(
                f"parameter '{_path_str(path)}' has undeclared logical axis '{missing[0]}'; "
                f"declare it with arch.axes.declare(Axis('{missing[0]}', ...)) in its part's file"
            )
    return names


def _is_names(x) -> bool:
    return isinstance(x, tuple)


def shardings_for(names_tree: Any, shapes_tree: Any, mesh: Mesh) -> Any:
    """NamedSharding tree with `shapes_tree`'s structure, from its shaped arrays and their names.

    `names_tree` has the same structure down to one tuple of logical names per array (it is
    flattened up to `shapes_tree`'s leaves, so the tuples are never taken apart). Names shorter
    than the array's rank leave its trailing dimensions replicated; `()` replicates it.
    """
    shape_leaves, treedef = jax.tree.flatten(shapes_tree)
    name_leaves = treedef.flatten_up_to(names_tree)
    out = []
    for names, x in zip(name_leaves, shape_leaves, strict=True):
        names = tuple(names) + (None,) * (len(x.shape) - len(names))
        out.append(NamedSharding(mesh, logical_to_spec(names, tuple(x.shape), mesh)))
    return jax.tree.unflatten(treedef, out)


def opt_state_shardings(
    abstract_opt: Any,
    abstract_params: Any,
    param_shardings: Any,
    mesh: Mesh,
    opt_names: Any | None = None,
) -> Any:
    """NamedSharding tree for the optimizer state `abstract_opt` (a tree of shaped arrays).

    `opt_names`, when given, names every state leaf's axes (the low-rank optimizers: their
    projected moments and projectors do not have their parameter's shape); the state is then
    sharded by those names like the parameters. Otherwise (optax states such as Adam's mu/nu
    hold subtrees with the parameters' structure) a leaf whose path ends with a parameter's
    path and that has its shape gets that parameter's sharding; the rest is replicated.
    """
    if opt_names is not None:
        return shardings_for(opt_names, abstract_opt, mesh)
    param_by_path = {
        _path_str(path): (tuple(x.shape), s)
        for (path, x), s in zip(
            jax.tree_util.tree_leaves_with_path(abstract_params),
            jax.tree.leaves(param_shardings),
            strict=True,
        )
    }
    repl = replicated(mesh)

    def pick(path, x):
        parts = _path_str(path).split("/")
        for n in range(len(parts)):  # the longest path suffix that names a parameter
            hit = param_by_path.get("/".join(parts[n:]))
            if hit is not None and hit[0] == tuple(x.shape):
                return hit[1]
        return repl

    return jax.tree_util.tree_map_with_path(pick, abstract_opt)


def _path_str(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a [batch, seq, ...] input array."""
    spec = logical_to_spec(("batch", "seq") + (None,) * (ndim - 2), (0,) * ndim, mesh)
    return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
