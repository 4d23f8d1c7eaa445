"""Decoder-only transformer assembled from parts (mixer, FFN, head) chosen by ModelConfig.

Baseline = Llama: pre-RMSNorm blocks x + mixer(norm(x)), x + ffn(norm(x)), RoPE attention,
SwiGLU FFN, final RMSNorm, (tied) LM head. New parts register in MIXERS / FFNS / HEADS.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx, struct

from .config import ModelConfig
from .layers import (
    ACT_EMBED,
    BATCH,
    SEQ,
    Attention,
    Aux,
    Embed,
    LMHead,
    RMSNorm,
    SwiGLU,
    constrain,
    dtype_of,
)

MIXERS: dict[str, type[nnx.Module]] = {"attention": Attention}
FFNS: dict[str, type[nnx.Module]] = {"swiglu": SwiGLU}
HEADS: dict[str, type[nnx.Module]] = {"lm": LMHead}

_REMAT_POLICIES = {
    "full": None,  # save nothing but the block input
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@struct.dataclass
class Output:
    """What every model returns (a pytree).

    logits: [B,T,V] float32. aux_loss: float32 scalar the trainer adds to the LM loss (0 for
    the baseline). metrics: dict of float32 scalars to log (empty for the baseline).
    """

    logits: jax.Array
    aux_loss: jax.Array
    metrics: dict[str, jax.Array]


def reduce_aux(aux: Aux, prefix: str, stacked: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Split a part's aux dict into (aux_loss, metrics "prefix/key").

    With `stacked` (outputs of a layer scan, leading axis = layers) "aux_loss" is summed over
    layers and metrics are averaged over layers; "aux_loss" is also logged, as that sum.
    """
    loss = jnp.zeros((), jnp.float32)
    metrics = {}
    for key, value in aux.items():
        value = value.astype(jnp.float32)
        if key == "aux_loss":
            value = jnp.sum(value) if stacked else value
            loss = loss + value
        elif stacked:
            value = jnp.mean(value, axis=0)
        metrics[f"{prefix}/{key}"] = value
    return loss, metrics


class Block(nnx.Module):
    """x + mixer(norm(x)), then x + ffn(norm(x)). Returns (x_BTD, aux) with aux keys
    prefixed "mixer/" and "ffn/"."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        norm = functools.partial(
            RMSNorm,
            cfg.d_model,
            eps=cfg.norm_eps,
            param_dtype=dtype_of(cfg.param_dtype),
            compute_dtype=dtype_of(cfg.compute_dtype),
            rngs=rngs,
        )
        self.mixer_norm = norm()
        self.mixer = MIXERS[cfg.mixer](cfg, rngs=rngs)
        self.ffn_norm = norm()
        self.ffn = FFNS[cfg.ffn](cfg, rngs=rngs)

    def __call__(self, x_BTD, *, positions, segment_ids) -> tuple[jax.Array, Aux]:
        with jax.named_scope("block"):
            y_BTD, mixer_aux = self.mixer(
                self.mixer_norm(x_BTD), positions=positions, segment_ids=segment_ids
            )
            x_BTD = constrain(x_BTD + y_BTD, (BATCH, SEQ, ACT_EMBED))
            y_BTD, ffn_aux = self.ffn(
                self.ffn_norm(x_BTD), positions=positions, segment_ids=segment_ids
            )
            x_BTD = constrain(x_BTD + y_BTD, (BATCH, SEQ, ACT_EMBED))
        aux = {f"mixer/{k}": v for k, v in mixer_aux.items()}
        aux.update({f"ffn/{k}": v for k, v in ffn_aux.items()})
        return x_BTD, aux


def _apply_block(block: Block, x_BTD, positions, segment_ids):
    return block(x_BTD, positions=positions, segment_ids=segment_ids)


class Transformer(nnx.Module):
    """Embed -> n_layers Blocks (scanned or looped) -> final RMSNorm -> head."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt, cdt = dtype_of(cfg.param_dtype), dtype_of(cfg.compute_dtype)
        self.embed = Embed(
            cfg.padded_vocab,
            cfg.d_model,
            std=cfg.init_std,
            param_dtype=pdt,
            compute_dtype=cdt,
            rngs=rngs,
        )
        if cfg.scan_layers:

            @nnx.split_rngs(splits=cfg.n_layers)
            @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_blocks(rngs: nnx.Rngs) -> Block:
                return Block(cfg, rngs=rngs)

            self.blocks = make_blocks(rngs)
        else:
            self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        self.final_norm = RMSNorm(
            cfg.d_model, eps=cfg.norm_eps, param_dtype=pdt, compute_dtype=cdt, rngs=rngs
        )
        self.head = HEADS[cfg.head](cfg, rngs=rngs)

    def _run_blocks(self, x_BTD, positions, segment_ids) -> tuple[jax.Array, Aux]:
        """Apply all blocks; aux values come back stacked over layers [L]."""
        cfg = self.cfg
        block_fn = _apply_block
        if cfg.remat != "none":
            # prevent_cse=False is safe (and faster) inside scan, which already stops CSE.
            block_fn = nnx.remat(
                block_fn, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers
            )
        if cfg.scan_layers:

            @nnx.scan(
                in_axes=(0, nnx.Carry, None, None),
                out_axes=(nnx.Carry, 0),
                transform_metadata={nnx.PARTITION_NAME: "layers"},
            )
            def scan_fn(block, x, positions, segment_ids):
                return block_fn(block, x, positions, segment_ids)

            x_BTD, aux = scan_fn(self.blocks, x_BTD, positions, segment_ids)
            return x_BTD, aux
        auxes = []
        for block in self.blocks:
            x_BTD, aux = block_fn(block, x_BTD, positions, segment_ids)
            auxes.append(aux)
        aux = jax.tree.map(lambda *a: jnp.stack(a), *auxes) if auxes[0] else {}
        return x_BTD, aux

    def __call__(self, tokens_BT, *, positions=None, segment_ids=None) -> Output:
        """tokens [B,T] int32; positions [B,T] int32 (default arange(T)); segment_ids [B,T]
        int32 (default all ones = one document per row; tokens attend only within their
        segment). Returns Output(logits [B,T,V] float32, aux_loss, metrics)."""
        b, t = tokens_BT.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        with jax.named_scope("embed"):
            x_BTD = constrain(self.embed(tokens_BT), (BATCH, SEQ, ACT_EMBED))
        x_BTD, block_aux = self._run_blocks(x_BTD, positions, segment_ids)
        x_BTD = self.final_norm(x_BTD)
        logits_BTV, head_aux = self.head(
            x_BTD, embed=self.embed, positions=positions, segment_ids=segment_ids
        )
        aux_loss, metrics = jnp.zeros((), jnp.float32), {}
        for prefix in ("mixer", "ffn"):
            part_aux = {
                k.split("/", 1)[1]: v for k, v in block_aux.items() if k.startswith(prefix + "/")
            }
            loss, m = reduce_aux(part_aux, prefix, stacked=True)
            aux_loss, metrics = aux_loss + loss, metrics | m
        loss, m = reduce_aux(head_aux, "head", stacked=False)
        return Output(logits=logits_BTV, aux_loss=aux_loss + loss, metrics=metrics | m)
