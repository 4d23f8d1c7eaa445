"""Memory planning: per-device bytes of a run's state, gradients and activations, before anything
is allocated (`menagerie plan -c CONFIG [overrides]`).

Everything comes from the trainer's own layout (`Trainer.layout_only`: the abstract model, the
optimizer and the shardings that training uses) through `jax.eval_shape`:
- parameters and optimizer state: the bytes of each array's shard on one device (exact);
- gradients: one more copy of the parameters (two with gradient accumulation: the running sum
  and one microbatch's);
- activations saved for the backward pass: the residuals of the loss's VJP on one microbatch
  (`jax.vjp` under `eval_shape`), so the remat policy counts as JAX applies it; divided over
  the devices that split a batch (data x fsdp x sequence). Tensor parallelism also splits head
  and MLP activations; that is not counted, so with `mesh.tensor > 1` this is an upper bound;
- backward working set: what a remat policy recomputes for one layer (the residuals it did not
  save, per layer) plus the float32 gradient of the logits;
- FSDP's gathered unit: the largest piece (one layer's weights, or one parameter outside the
  stack) gathered whole over `fsdp`, with its gradient before the reduce-scatter.
On devices that are here (real, or simulated with
XLA_FLAGS=--xla_force_host_platform_device_count=N) the real train step is also compiled and XLA's
memory analysis printed beside the estimate; `--devices N` plans for N devices that are not
here (an `AbstractMesh`: no compilation).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh
from menagerie import arch
from menagerie.arch import axes as arch_axes

from . import mesh as mesh_lib
from .config import RunConfig
from .step import _forward, token_losses
from .trainer import Trainer

BATCH_KEYS = {
    "tokens": jnp.int32,
    "targets": jnp.int32,
    "positions": jnp.int32,
    "segment_ids": jnp.int32,
    "loss_mask": jnp.float32,
}


@dataclasses.dataclass
class Group:
    """Parameters that share a path once layer indices are dropped, and how they are sharded."""

    path: str
    shape: tuple[int, ...]
    names: tuple
    spec: tuple
    count: int
    bytes_per_device: int


@dataclasses.dataclass
class Plan:
    """Per-device bytes of one training step, estimated, and XLA's numbers when compiled."""

    mesh: dict[str, int]
    devices: int
    n_params: int
    platform: str
    params: int
    opt_state: int
    gradients: int
    activations: int
    backward: int
    gathered: int
    inputs: int
    groups: list[Group]
    warnings: list[str]
    compiled: dict[str, int] | None = None

    @property
    def total(self) -> int:
        return (
            self.params
            + self.opt_state
            + self.gradients
            + self.activations
            + self.backward
            + self.gathered
            + self.inputs
        )


# ----------------------------------------------------------------------------- the layout


def plan_mesh(cfg: RunConfig, devices: int | None):
    """The config's mesh on the devices here, or an AbstractMesh of `devices` devices (ConfigError,
    one line, when the sizes do not fit the device count)."""
    if devices is None:
        return mesh_lib.make_mesh(cfg.mesh)
    sizes = mesh_lib.mesh_shape(cfg.mesh, devices)
    return AbstractMesh(tuple(sizes.values()), tuple(sizes))


def tokenizer_vocab(data) -> int:
    """The vocabulary size of the tokenizer `data` (a DataConfig) gives, without preparing data:
    a synthetic task's, a prepared folder's own (`data.source`: what training reads), bytes', a
    tokenizer.json's, or for a BPE still to be trained its target size."""
    from menagerie.data import TaskTokenizer, load_tokenizer
    from menagerie.data.tokenizers import tokenizer_from_meta

    if data.is_synthetic:
        return TaskTokenizer(data.task).vocab_size
    folder = Path(data.source).expanduser()
    if data.source != "stdlib" and (folder / "meta.json").is_file():
        meta = json.loads((folder / "meta.json").read_text())
        return tokenizer_from_meta(meta, folder).vocab_size
    if data.tokenizer == "bpe":
        return data.bpe_vocab_size
    return load_tokenizer(data.tokenizer).vocab_size


def abstract_batch(trainer: Trainer, rows: int) -> dict[str, jax.ShapeDtypeStruct]:
    """A [rows, seq_len] batch as the train step receives it, sharded like a real one."""
    shape = (rows, trainer.cfg.train.seq_len)
    return {
        k: jax.ShapeDtypeStruct(shape, dt, sharding=trainer.batch_sharding)
        for k, dt in BATCH_KEYS.items()
    }


def shard_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard: no
    dimension is split unevenly, `mesh.logical_to_spec` replicates those)."""
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)
    )


# ----------------------------------------------------------------------------- activations


def _graphdef(trainer: Trainer, remat: str) -> nnx.GraphDef:
    """The model's graph with another remat policy (same parameters)."""
    model_cfg = trainer.cfg.model.model_copy(update={"remat": remat})
    return nnx.split(nnx.eval_shape(lambda: arch.build(model_cfg, rngs=nnx.Rngs(0))))[0]


def saved_residuals(graphdef, params: Any, batch: dict) -> list[jax.ShapeDtypeStruct]:
    """Arrays the loss's VJP keeps for the backward pass (not the parameters themselves), each
    once, global shapes. Traced abstractly: call it under `jax.eval_shape`."""

    def loss(p):
        out = _forward(graphdef, p, batch, jnp.int32(0), training=True)
        return jnp.sum(token_losses(out.logits, batch["targets"])[0])

    vjp_fn = jax.vjp(loss, params)[1]
    own = {id(x) for x in jax.tree.leaves(params)}
    seen: dict[int, Any] = {}
    for x in jax.tree.leaves(vjp_fn):
        if id(x) not in own:
            seen.setdefault(id(x), x)
    return list(seen.values())


@contextlib.contextmanager
def _context(trainer: Trainer):
    """`trainer.context()`, or for an AbstractMesh the same with the abstract mesh."""
    if not isinstance(trainer.mesh, AbstractMesh):
        with trainer.context():
            yield
        return
    with jax.sharding.use_abstract_mesh(trainer.mesh), mesh_lib.axis_rules(trainer.mesh):
        yield


def _global_bytes(xs) -> int:
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in xs)


def activation_bytes(trainer: Trainer, params: Any, batch: dict) -> tuple[int, int]:
    """(saved activations, backward working set) per device for one microbatch `batch`."""

    def saved(remat):
        fn = lambda p, b: saved_residuals(_graphdef(trainer, remat), p, b)  # noqa: E731
        with _context(trainer):
            return _global_bytes(jax.eval_shape(fn, params, batch))

    model = trainer.cfg.model
    kept = saved(model.remat)
    recomputed = 0 if model.remat == "none" else (saved("none") - kept) // model.n_layers
    rows, seq = batch["tokens"].shape
    logits_grad = rows * seq * model.padded_vocab * 4  # float32 d loss / d logits
    x = batch["tokens"]
    split = math.prod(x.shape) // math.prod(x.sharding.shard_shape(x.shape))
    return kept // split, (recomputed + logits_grad) // split


# ----------------------------------------------------------------------------- shardings


def _spec_text(spec: tuple) -> str:
    parts = []
    for entry in spec:
        axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
        parts.append("x".join(axes) or "-")
    return ",".join(parts) or "-"


def param_groups(trainer: Trainer, params: Any) -> list[Group]:
    """One `Group` per parameter path with layer indices dropped (a looped stack's copies)."""
    names = jax.tree.leaves(trainer.param_names, is_leaf=lambda x: isinstance(x, tuple))
    groups: dict[str, Group] = {}
    for (path, x), n in zip(jax.tree_util.tree_leaves_with_path(params), names, strict=True):
        key = re.sub(r"/\d+(?=/|$)", "/*", jax.tree_util.keystr(path, simple=True, separator="/"))
        size = math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
        if key in groups:
            groups[key].count += 1
            groups[key].bytes_per_device += size
        else:
            groups[key] = Group(key, tuple(x.shape), n, tuple(x.sharding.spec), 1, size)
    return list(groups.values())


def gathered_bytes(groups: list[Group], mesh, n_layers: int) -> int:
    """FSDP's working set: the largest unit the step gathers whole over `fsdp` (one layer's
    weights, or one parameter outside the stack), twice: its weights and their gradient before
    the reduce-scatter."""
    fsdp = mesh.shape["fsdp"]
    if fsdp == 1:
        return 0
    layer, largest = 0, 0
    for g in groups:
        flat = [a for e in g.spec for a in ((e,) if isinstance(e, str) else (e or ()))]
        whole = g.bytes_per_device * (fsdp if "fsdp" in flat else 1)
        if "layers" in g.names or g.count == n_layers > 1:
            layer += whole // n_layers
        else:
            largest = max(largest, whole)
    return 2 * max(layer, largest)


def replication_warnings(groups: list[Group], mesh) -> list[str]:
    """One line per parameter dimension whose rule names a mesh axis (of size > 1) that the
    sharding does not use because that axis does not divide the dimension."""
    out = []
    for g in groups:
        spec = g.spec + (None,) * (len(g.shape) - len(g.spec))
        for dim, name, entry in zip(g.shape, g.names, spec, strict=False):
            rule = arch_axes.get(name).mesh if name is not None else None
            axes = (rule,) if isinstance(rule, str) else tuple(rule or ())
            size = math.prod(mesh.shape[a] for a in axes if mesh.shape[a] > 1)
            if entry is None and size > 1 and dim % size:
                live = "x".join(a for a in axes if mesh.shape[a] > 1)
                out.append(
                    f"{g.path}: '{name}' ({dim}) is replicated: mesh axis {live} ({size}) "
                    "does not divide it"
                )
    return out


# ----------------------------------------------------------------------------- the plan


def compiled_memory(trainer: Trainer, state: Any, batch: dict) -> dict[str, int]:
    """XLA's memory analysis of the real (jitted, donated) train step, per device."""
    with trainer.context():
        m = trainer.jit_train_step().lower(state, batch).compile().memory_analysis()
    out = {
        "arguments": m.argument_size_in_bytes,
        "outputs": m.output_size_in_bytes,
        "aliased": m.alias_size_in_bytes,
        "temporaries": m.temp_size_in_bytes,
    }
    out["total"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
    return out


def make_plan(cfg: RunConfig, devices: int | None = None, compile: bool = True) -> Plan:
    """The plan of `cfg` on this host's devices, or on `devices` abstract ones (no compile)."""
    mesh = plan_mesh(cfg, devices)
    trainer = Trainer.layout_only(cfg, mesh, tokenizer_vocab(cfg.data))
    state = trainer.abstract_state()
    t = trainer.cfg.train
    params = state["params"]
    activations, backward = activation_bytes(
        trainer, params, abstract_batch(trainer, t.batch_size // t.microbatches)
    )
    batch = abstract_batch(trainer, t.batch_size)
    counters = {k: v for k, v in state.items() if k not in ("params", "opt_state")}
    groups = param_groups(trainer, params)
    plan = Plan(
        mesh=dict(mesh.shape),
        devices=math.prod(mesh.shape.values()),
        n_params=trainer.cfg.model.num_params(),
        platform="abstract" if devices is not None else jax.devices()[0].platform,
        params=shard_bytes(params),
        opt_state=shard_bytes(state["opt_state"]),
        gradients=shard_bytes(params) * (2 if t.microbatches > 1 else 1),
        activations=activations,
        backward=backward,
        gathered=gathered_bytes(groups, mesh, trainer.cfg.model.n_layers),
        inputs=shard_bytes(batch) + shard_bytes(counters),
        groups=groups,
        warnings=replication_warnings(groups, mesh),
    )
    if compile and devices is None:
        plan.compiled = compiled_memory(trainer, state, batch)
    return plan


# ----------------------------------------------------------------------------- output


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def format_plan(plan: Plan, cfg: RunConfig, device_memory: float | None = None) -> str:
    """The plan as a table: totals per device, then which mesh axis shards each group."""
    m, t = cfg.model, cfg.train
    outer = cfg.mesh.outer()  # a hybrid mesh: dcn x inner per axis
    mesh = " ".join(
        f"{k}={v}" + (f" ({outer[k]} dcn x {v // outer[k]})" if outer[k] > 1 else "")
        for k, v in plan.mesh.items()
    )
    lines = [
        f"mesh {mesh} on {plan.devices} {plan.platform} device(s); {m.family} "
        f"{m.d_model}x{m.n_layers} ({plan.n_params / 1e6:,.2f}M params), remat {m.remat}, "
        f"batch {t.batch_size} x {t.seq_len} in "
        f"{t.microbatches} microbatch(es), optimizer {cfg.optim.name}",
        "",
        f"{'per device':<44}{'estimate':>14}",
    ]
    rows = [
        ("parameters", plan.params),
        (f"optimizer state ({cfg.optim.name})", plan.opt_state),
        ("gradients" + (" (sum + one microbatch)" if t.microbatches > 1 else ""), plan.gradients),
        (f"activations saved for backward (remat {m.remat})", plan.activations),
        ("backward working set (recompute, d logits)", plan.backward),
        ("fsdp: one layer gathered (weights, grads)", plan.gathered),
        ("batch and counters", plan.inputs),
        ("total", plan.total),
    ]
    lines += [f"  {name:<42}{human(v):>14}" for name, v in rows]
    if plan.compiled:
        c = plan.compiled
        lines += [
            "",
            f"XLA compiled train step: {human(c['total'])} per device "
            f"({c['total'] / plan.total:.2f} x estimate): arguments {human(c['arguments'])}, "
            f"temporaries {human(c['temporaries'])}, "
            f"outputs not aliased {human(c['outputs'] - c['aliased'])}",
        ]
    if device_memory:
        lines.append(
            f"{plan.total / device_memory:.0%} of {device_memory / 1e9:.0f} GB per device"
            + ("" if plan.total <= device_memory else ": does NOT fit")
        )
    if plan.mesh["tensor"] > 1:
        lines.append("(activations: tensor-parallel splits not counted, an upper bound)")
    lines += ["", _groups_table(plan.groups)]
    lines += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(lines)


def _groups_table(groups: list[Group]) -> str:
    lines = [
        f"{'parameter group':<36}{'shape':<22}{'logical axes':<34}{'mesh axes':<18}{'/device':>11}"
    ]
    for g in groups:
        names = ",".join(n or "-" for n in g.names)
        shape = "x".join(map(str, g.shape)) + (f" (x{g.count})" if g.count > 1 else "")
        spec = _spec_text(g.spec + (None,) * (len(g.shape) - len(g.spec)))
        lines.append(f"{g.path:<36}{shape:<22}{names:<34}{spec:<18}{human(g.bytes_per_device):>11}")
    return "\n".join(lines)


def plan_json(plan: Plan) -> str:
    d = dataclasses.asdict(plan)
    d["total"] = plan.total
    d["groups"] = [
        {**g, "spec": [list(e) if isinstance(e, tuple) else e for e in g["spec"]]}
        for g in d["groups"]
    ]
    return json.dumps(d, default=lambda x: int(x) if isinstance(x, np.integer) else str(x))


def parse_memory(text: str) -> float:
    """'80GB' / '80GiB' / '80' (GB) -> bytes."""
    from .errors import ConfigError

    found = re.fullmatch(r"\s*([0-9.]+)\s*(GB|GiB|G)?\s*", text, re.IGNORECASE)
    if not found:
        raise ConfigError(f"--device-memory {text!r}: write a size such as 80GB or 96GiB")
    unit = 2**30 if (found.group(2) or "").lower() == "gib" else 1e9
    return float(found.group(1)) * unit


def cmd_plan(args) -> int:
    from .config import build_config, read_yaml
    from .errors import ConfigError

    if args.devices is not None and args.devices < 1:
        raise ConfigError(f"--devices {args.devices} must be >= 1")
    memory = parse_memory(args.device_memory) if args.device_memory else None
    cfg = build_config(read_yaml(args.config) if args.config else {}, args.overrides)
    with warnings.catch_warnings():  # the plan lists replicated dimensions itself
        warnings.filterwarnings("ignore", message="logical axis .* not divisible")
        plan = make_plan(cfg, args.devices, compile=not args.no_compile)
    print(plan_json(plan) if args.json else format_plan(plan, cfg, memory))
    return 0
