"""The part contract: the three part slots (mixer, FFN, head), the call context and aux outputs.

A part is one file holding its config class and its module:

    class MyFFNConfig(FFNConfig):            # subclassing the slot registers the part
        kind: Literal["my_ffn"] = "my_ffn"   # the YAML name: model.ffn.kind=my_ffn
        width: int = 512                     # its own fields, each with a docstring
        def build(self, model, *, rngs): return MyFFN(self, model, rngs=rngs)
        def num_params(self, model): ...     # exact: a test compares it with the built model
        def flops_per_token(self, model, seq_len): ...

The module is called `part(x_BTD, ctx) -> (y, aux)` (a head also gets `embed=`), where `ctx` is
the `Ctx` below and `aux` a dict (nested dicts allowed) of float32 scalars: every leaf named
"aux_loss" is added to the training loss, every other leaf is a logged metric. Aux dicts are
pytrees, so they pass through the layer scan stacked over layers and `reduce_aux` reduces them.
New logical axis names are declared in the part's file (`arch.axes.declare`).

Incremental decoding: a part whose output at a position reads earlier positions (attention, the
memories) has `init_cache(batch, max_len)` and `decode(x_BTD, cache, start) -> (y, cache)` for
T tokens at positions start..start+T-1; a per-token part has neither and is called as usual.
A block decodes its parts with `init_part_cache` / `decode_part`; a mixer without `decode`
makes the model non-decoding (generation then recomputes a window per token).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from .config import Choice, ModelConfig

Aux = dict[str, Any]


@struct.dataclass
class Ctx:
    """What every part may read besides its input; one struct, so signatures never grow.

    positions:     [B,T] int32 position of each token in its document (packed rows restart).
    segment_ids:   [B,T] int32 document id of each token; tokens attend within their segment.
    step:          int32 scalar, the optimizer step (None outside training).
    targets:       [B,T] int32 next tokens (None when not known, e.g. generation).
    loss_mask:     [B,T] float32, 1 where the target counts in the loss (None with targets).
    deterministic: static; False while training (dropout and other train-only behaviour).
    """

    positions: jax.Array
    segment_ids: jax.Array
    step: jax.Array | None = None
    targets: jax.Array | None = None
    loss_mask: jax.Array | None = None
    deterministic: bool = struct.field(pytree_node=False, default=True)

    @classmethod
    def make(cls, tokens_BT: jax.Array, *, positions=None, segment_ids=None, **rest) -> Ctx:
        """A context for `tokens_BT`: positions default to arange(T), segment ids to ones (one
        document per row)."""
        b, t = tokens_BT.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        return cls(positions=positions, segment_ids=segment_ids, **rest)


@dataclasses.dataclass(frozen=True)
class UpdateRule:
    """Updates of some parameters times `scale` (a learning-rate multiplier, weight decay
    included), and zero from train step `frozen_from` on (a later training stage)."""

    scale: float = 1.0
    frozen_from: int | None = None


@struct.dataclass
class Output:
    """What every model returns (a pytree).

    logits: [B,T,V] float32. aux_loss: float32 scalar the trainer adds to the LM loss (0 for
    the baseline). metrics: dict of float32 scalars to log (empty for the baseline).
    """

    logits: jax.Array
    aux_loss: jax.Array
    metrics: dict[str, jax.Array]


class PartConfig(Choice):
    """Base of every part config: builds its module and states its counts."""

    key: ClassVar[str] = "kind"
    kind: str
    """Which registered part fills the slot."""

    def build(self, model: ModelConfig, *, rngs: Any) -> Any:
        """The part's NNX module for a model of config `model`."""
        raise NotImplementedError(f"{type(self).__name__} does not define build()")

    def check(self, model: ModelConfig) -> None:
        """Raise ValueError (one line naming the keys) if this part cannot serve `model`."""

    def num_params(self, model: ModelConfig) -> int:
        """Exact number of parameters of one built part."""
        raise NotImplementedError(f"{type(self).__name__} does not define num_params()")

    def embedding_params(self, model: ModelConfig) -> int:
        """How many of `num_params` are vocabulary-sized matrices (left out of the
        non-embedding count of scaling laws)."""
        return 0

    def flops_per_token(self, model: ModelConfig, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token of one part at context `seq_len`."""
        raise NotImplementedError(f"{type(self).__name__} does not define flops_per_token()")

    def update_rules(self, model: ModelConfig) -> dict[str, UpdateRule]:
        """{logical axis name: rule}: how the trainer scales the optimizer's updates of the
        parameters with that axis (e.g. LTE's router learning rate, and its frozen routers)."""
        return {}


class MixerConfig(PartConfig):
    """Slot of the sequence mixer (attention, MEGA, contextual memory, ...)."""

    choices: ClassVar[dict[str, type[Choice]]] = {}
    sequence_chunks: ClassVar[int] = 1
    """Equal chunks of every sequence that each device of the mesh axis `sequence` holds when
    this mixer splits the sequence (train.seq_len must be a multiple of chunks x devices)."""


class FFNConfig(PartConfig):
    """Slot of the per-token FFN (SwiGLU, sparse or memory FFNs, ...)."""

    choices: ClassVar[dict[str, type[Choice]]] = {}


class HeadConfig(PartConfig):
    """Slot of the output head (LM head, planner heads, ...); called with `embed=` too."""

    choices: ClassVar[dict[str, type[Choice]]] = {}


SUMMED = ("aux_loss", "flops_saved")  # aux leaves summed over layers (others: averaged)
PER_LAYER = ("density", "routing_spread")  # aux leaves also logged per layer, as "<name>/layer<i>"


def reduce_aux(aux: Aux, stacked: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(aux_loss, metrics) from a nested aux dict.

    Leaves named "aux_loss" are summed into the loss (over layers too when `stacked`: outputs of
    a layer stack, leading axis = layers) and are also logged, as that sum. Other leaves are
    metrics: when stacked, those named in `SUMMED` are summed over layers, the rest averaged,
    and those named in `PER_LAYER` are logged per layer too. Metric names are the key paths,
    "ffn/density".
    """
    loss = jnp.zeros((), jnp.float32)
    metrics = {}
    for path, value in jax.tree_util.tree_leaves_with_path(aux):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        value, key = value.astype(jnp.float32), path[-1].key
        if stacked and key in PER_LAYER:
            metrics.update({f"{name}/layer{i}": v for i, v in enumerate(value)})
        if stacked:
            value = jnp.sum(value, axis=0) if key in SUMMED else jnp.mean(value, axis=0)
        if key == "aux_loss":
            loss = loss + value
        metrics[name] = value
    return loss, metrics


def decode_ctx(x_BT: jax.Array, start: jax.Array) -> Ctx:
    """The context of T tokens at positions start.. of one document (no targets)."""
    b, t = x_BT.shape[:2]
    positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
    return Ctx.make(jnp.zeros((b, t), jnp.int32), positions=positions)


def init_part_cache(part: Any, batch: int, max_len: int) -> Any:
    """`part`'s empty decoding cache; None for a per-token part."""
    return part.init_cache(batch, max_len) if hasattr(part, "init_cache") else None


def decode_part(part: Any, x_BTD: jax.Array, cache: Any, start: jax.Array) -> tuple[jax.Array, Any]:
    """`part` on T tokens at positions start.. with its cache (see the module docstring)."""
    if cache is None:
        y_BTD, _ = part(x_BTD, decode_ctx(x_BTD, start))
        return y_BTD, None
    return part.decode(x_BTD, cache, start)


def init_block_cache(mixer: Any, ffn: Any, batch: int, max_len: int) -> tuple[Any, Any]:
    """A pre-norm block's decoding cache: (mixer cache, FFN cache or None if per-token)."""
    return mixer.init_cache(batch, max_len), init_part_cache(ffn, batch, max_len)


def decode_pre_norm_block(
    x_BTD: jax.Array, cache: Any, start: jax.Array, *, mixer, mixer_norm, ffn, ffn_norm
) -> tuple[jax.Array, Any]:
    """x + mixer(norm x), then x + ffn(norm x) for T tokens at positions start.., with the
    block's cache from `init_block_cache`."""
    mixer_cache, ffn_cache = cache
    y_BTD, mixer_cache = mixer.decode(mixer_norm(x_BTD), mixer_cache, start)
    x_BTD = x_BTD + y_BTD
    y_BTD, ffn_cache = decode_part(ffn, ffn_norm(x_BTD), ffn_cache, start)
    return x_BTD + y_BTD, (mixer_cache, ffn_cache)
