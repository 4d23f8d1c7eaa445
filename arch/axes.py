"""The axis vocabulary: every logical axis name, its role and its default mesh placement.

Parameters and activations name their axes (`arch.layers.param`, `arch.layers.constrain`); this
table is the only place that says what a name means. Readers:
- `train.mesh` maps names to mesh axes with `Axis.mesh` (its rule table is built from here);
- `train.optim` decides weight decay and GaLore's matrix selection from `Axis.role` and
  `Axis.lowrank`, so a new part's matrices are decayed and projected by what their axes are.

A part that brings new axes declares them in its own file with `declare(Axis(...))`; a name
used by a parameter but never declared is an error (`check_declared`), not a silent replication.

Roles:
- "activation": names only activations (`constrain`), never a parameter.
- "stack": a leading axis indexing independent copies (scanned layers). Not part of a matrix;
  GaLore keeps one projector per copy.
- "model": the residual-stream width. A matrix that reads or writes the residual stream has one;
  GaLore splits the matrix at it.
- "feature": any other parameter axis (heads, MLP width, head size, vocabulary, ...).
  `lowrank=True` marks the features whose matrices GaLore projects by default (attention and
  MLP widths, as the paper does; not the vocabulary).
- "vector": the axis of a per-channel vector (norm scales, biases, decay rates): never a
  matrix, never weight-decayed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Literal

MeshRule = str | tuple[str, ...] | None
Role = Literal["activation", "stack", "model", "feature", "vector"]


@dataclasses.dataclass(frozen=True)
class Axis:
    """One logical axis name.

    name: the logical name used in `param(..., names)` / `constrain(x, names)`.
    role: see the module docstring.
    mesh: mesh axis (or axes, or None = replicated) this name is sharded over by default.
    lowrank: GaLore-style optimizers project matrices with this axis (role "feature" only).
    doc: what the axis is, in a few words.
    """

    name: str
    role: Role
    mesh: MeshRule
    lowrank: bool = False
    doc: str = ""


_AXES: dict[str, Axis] = {}


def declare(*axes: Axis) -> None:
    """Add axes to the vocabulary; re-declaring a name identically is a no-op, differently an
    error (two parts would disagree on how to shard it)."""
    for axis in axes:
        if axis.lowrank and axis.role != "feature":
            raise ValueError(f"axis '{axis.name}': only feature axes can be lowrank")
        old = _AXES.setdefault(axis.name, axis)
        if old != axis:
            raise ValueError(f"axis '{axis.name}' is declared twice, differently: {old} vs {axis}")


def get(name: str) -> Axis:
    """The declared axis `name`; KeyError naming the fix if it was never declared."""
    if name not in _AXES:
        raise KeyError(
            f"logical axis '{name}' is not declared; add declare(Axis('{name}', ...)) to the part "
            "that uses it (see arch/axes.py)"
        )
    return _AXES[name]


def all_axes() -> dict[str, Axis]:
    """Every declared axis by name."""
    return dict(_AXES)


def undeclared(names: Iterable[str | None]) -> list[str]:
    """The names (in order, without repeats) that no `declare` introduced."""
    return list(dict.fromkeys(n for n in names if n is not None and n not in _AXES))


def stack_prefix(names: tuple[str, ...]) -> int:
    """How many leading axes are "stack" axes (independent copies, e.g. scanned layers)."""
    n = 0
    while n < len(names) and get(names[n]).role == "stack":
        n += 1
    return n


def is_matrix(names: tuple[str, ...]) -> bool:
    """Two or more non-stack axes, none of them a vector axis: weight-decayed, projectable."""
    dims = names[stack_prefix(names) :]
    return len(dims) >= 2 and all(get(n).role != "vector" for n in dims)


def is_lowrank_by_role(names: tuple[str, ...]) -> bool:
    """A matrix with a "model" axis and a lowrank feature axis (attention and MLP kernels)."""
    dims = names[stack_prefix(names) :]
    roles = [get(n) for n in dims]
    return (
        is_matrix(names) and any(a.role == "model" for a in roles) and any(a.lowrank for a in roles)
    )


declare(
    # activations (arch.layers.constrain)
    Axis("batch", "activation", ("data", "fsdp"), doc="sequences of a batch"),
    Axis("seq", "activation", "sequence", doc="positions of a sequence"),
    Axis("act_embed", "activation", None, doc="residual-stream width of activations"),
    Axis("act_heads", "activation", "tensor", doc="query heads of activations"),
    Axis("act_kv_heads", "activation", "tensor", doc="key/value heads of activations"),
    Axis("act_mlp", "activation", "tensor", doc="FFN hidden width of activations"),
    Axis("act_vocab", "activation", "tensor", doc="vocabulary of logits"),
    # parameters every family has
    Axis("layers", "stack", None, doc="scanned blocks"),
    Axis("embed", "model", "fsdp", doc="residual-stream width"),
    Axis("vocab", "feature", "tensor", doc="vocabulary rows of the embedding and LM head"),
    Axis("norm", "vector", None, doc="a norm's scale"),
)
