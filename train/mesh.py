"""The device mesh and the one table that maps logical axis names to mesh axes.

Models name every parameter axis logically ("embed", "mlp", "heads", ...); nothing outside this
file knows which mesh axis a logical axis lands on. A dimension that a mesh axis does not divide
is replicated instead (reported once), so odd vocabularies or head counts never fail to shard.
`shardings_for` and `opt_state_shardings` are the one place that turns names into the shardings
of the parameters and of the optimizer state.
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

from .config import MeshConfig
from .errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor", "sequence")


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
    """Axis sizes with the -1 axis filled; ConfigError if they do not multiply to the devices."""
    sizes = {axis: getattr(cfg, axis) for axis in MESH_AXES}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    fill = [a for a, v in sizes.items() if v == -1]
    if fill:
        if num_devices % fixed:
            raise ConfigError(
                f"mesh sizes {sizes} leave {num_devices}/{fixed} devices for mesh.{fill[0]}, "
                f"not a whole number; make the fixed axes divide {num_devices}"
            )
        sizes[fill[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(
            f"mesh sizes {sizes} multiply to {fixed} but there are {num_devices} devices; "
            "set one axis to -1 to fill"
        )
    return sizes


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    sizes = mesh_shape(cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # noqa: BLE001 - CPU and odd topologies: plain reshape is fine
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


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
