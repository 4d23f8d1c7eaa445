"""The transformer family: a decoder assembled from a mixer, an FFN and a head chosen by config.

Baseline = Llama: pre-RMSNorm blocks x + mixer(norm(x)), x + ffn(norm(x)), RoPE attention,
SwiGLU FFN, final RMSNorm, (tied) LM head. Any registered part fits its slot (`arch.parts`).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import pydantic
from flax import nnx

from .attention import AttentionConfig
from .config import ModelConfig
from .layers import ACT_EMBED, BATCH, SEQ, Embed, constrain, dtype_of, rms_norm
from .lm_head import LMHeadConfig
from .parts import (
    Aux,
    Ctx,
    FFNConfig,
    HeadConfig,
    MixerConfig,
    Output,
    decode_ctx,
    decode_pre_norm_block,
    init_block_cache,
    reduce_aux,
)
from .stack import DecodeState, decode_layers, run_layers, stack_layers, stacked
from .swiglu import SwiGLUConfig


class TransformerConfig(ModelConfig):
    """A pre-norm decoder: n_layers blocks of mixer and FFN, a final norm and a head."""

    family: Literal["transformer"] = "transformer"
    """Selects this family."""
    mixer: pydantic.SerializeAsAny[MixerConfig] = AttentionConfig()
    """Sequence mixer part (`kind` picks it: attention, ...)."""
    ffn: pydantic.SerializeAsAny[FFNConfig] = SwiGLUConfig()
    """FFN part (`kind` picks it: swiglu, ...)."""
    head: pydantic.SerializeAsAny[HeadConfig] = LMHeadConfig()
    """Output head part (`kind` picks it: lm, ...)."""

    moved_keys: ClassVar[dict[str, str]] = {
        "n_heads": "mixer.n_heads",
        "n_kv_heads": "mixer.n_kv_heads",
        "head_dim": "mixer.head_dim",
        "rope_theta": "mixer.rope_theta",
        "attention_impl": "mixer.impl",
        "mlp_dim": "ffn.hidden_dim",
        "mlp_multiple": "ffn.hidden_multiple",
    }

    @pydantic.model_validator(mode="after")
    def _check_parts(self) -> TransformerConfig:
        for part in self.parts():
            part.check(self)
        return self

    def parts(self) -> tuple[Any, ...]:
        return (self.mixer, self.ffn, self.head)

    def build(self, *, rngs: nnx.Rngs) -> Transformer:
        return Transformer(self, rngs=rngs)

    def num_params(self, include_embeddings: bool = True) -> int:
        """Embedding V D + per layer (two norm scales 2 D + mixer + FFN) + final norm D + head."""
        d, v = self.d_model, self.padded_vocab
        per_layer = 2 * d + self.mixer.num_params(self) + self.ffn.num_params(self)
        n = v * d + self.n_layers * per_layer + d + self.head.num_params(self)
        if not include_embeddings:
            n -= v * d + self.head.embedding_params(self)
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """n_layers * (mixer + FFN) + head; the embedding lookup and norms count nothing."""
        layer = self.mixer.flops_per_token(self, seq_len) + self.ffn.flops_per_token(self, seq_len)
        return float(self.n_layers * layer + self.head.flops_per_token(self, seq_len))


class Block(nnx.Module):
    """x + mixer(norm(x)), then x + ffn(norm(x)). Returns (x_BTD, {"mixer": aux, "ffn": aux})."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.mixer_norm = rms_norm(cfg, rngs=rngs)
        self.mixer = cfg.mixer.build(cfg, rngs=rngs)
        self.ffn_norm = rms_norm(cfg, rngs=rngs)
        self.ffn = cfg.ffn.build(cfg, rngs=rngs)

    def __call__(self, x_BTD: jax.Array, ctx: Ctx) -> tuple[jax.Array, Aux]:
        with jax.named_scope("block"):
            y_BTD, mixer_aux = self.mixer(self.mixer_norm(x_BTD), ctx)
            x_BTD = constrain(x_BTD + y_BTD, (BATCH, SEQ, ACT_EMBED))
            y_BTD, ffn_aux = self.ffn(self.ffn_norm(x_BTD), ctx)
            x_BTD = constrain(x_BTD + y_BTD, (BATCH, SEQ, ACT_EMBED))
        return x_BTD, {"mixer": mixer_aux, "ffn": ffn_aux}

    def init_cache(self, batch: int, max_len: int) -> tuple[Any, Any]:
        """(mixer cache, FFN cache or None for a per-token FFN); see `parts`."""
        return init_block_cache(self.mixer, self.ffn, batch, max_len)

    def decode(self, x_BTD: jax.Array, cache: Any, start: jax.Array) -> tuple[jax.Array, Any]:
        """The block for T tokens at positions start.. given its parts' caches."""
        parts = dict(
            mixer=self.mixer, mixer_norm=self.mixer_norm, ffn=self.ffn, ffn_norm=self.ffn_norm
        )
        return decode_pre_norm_block(x_BTD, cache, start, **parts)


class Transformer(nnx.Module):
    """Embed -> n_layers Blocks (scanned or looped) -> final RMSNorm -> head."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embed(
            cfg.padded_vocab,
            cfg.d_model,
            std=cfg.init_std,
            param_dtype=dtype_of(cfg.param_dtype),
            compute_dtype=dtype_of(cfg.compute_dtype),
            rngs=rngs,
        )
        self.blocks = stack_layers(lambda rngs: Block(cfg, rngs=rngs), cfg, rngs=rngs)
        self.final_norm = rms_norm(cfg, rngs=rngs)
        self.head = cfg.head.build(cfg, rngs=rngs)

    def __call__(self, tokens_BT: jax.Array, ctx: Ctx | None = None, **ctx_fields) -> Output:
        """tokens [B,T] int32 and a `Ctx` (or its fields as keywords: positions default to
        arange(T), segment_ids to ones = one document per row). Returns Output(logits [B,T,V]
        float32, aux_loss, metrics)."""
        ctx = Ctx.make(tokens_BT, **ctx_fields) if ctx is None else ctx
        with jax.named_scope("embed"):
            x_BTD = constrain(self.embed(tokens_BT), (BATCH, SEQ, ACT_EMBED))
        x_BTD, block_aux = run_layers(self.blocks, x_BTD, ctx, self.cfg)
        x_BTD = self.final_norm(x_BTD)
        logits_BTV, head_aux = self.head(x_BTD, ctx, embed=self.embed)
        block_loss, block_metrics = reduce_aux(block_aux, stacked=True)
        head_loss, head_metrics = reduce_aux({"head": head_aux})
        return Output(
            logits=logits_BTV,
            aux_loss=block_loss + head_loss,
            metrics=block_metrics | head_metrics,
        )

    state_grows = True  # the KV cache holds every token of the context

    @property
    def decodes(self) -> bool:
        """Whether this model has incremental decoding: its mixer part has a cache."""
        mixer = self.blocks.mixer if self.cfg.scan_layers else self.blocks[0].mixer
        return hasattr(mixer, "decode")

    def init_state(self, batch: int, max_len: int) -> DecodeState:
        """The decoding state before the first token of `batch` sequences of at most
        `max_len` tokens (the attention cache holds them all)."""
        block = self.blocks if self.cfg.scan_layers else self.blocks[0]
        caches = stacked(block.init_cache(batch, max_len), self.cfg)
        head = self.head.init_state(batch, max_len) if hasattr(self.head, "init_state") else None
        return DecodeState(caches, jnp.zeros((), jnp.int32), head)

    def decode(self, tokens_BT: jax.Array, state: DecodeState) -> tuple[jax.Array, DecodeState]:
        """Logits [B,T,V] float32 of T more tokens (a prompt piece, or one) and the state after
        them; token by token this gives what the full forward pass gives."""
        start = state.position
        x_BTD = constrain(self.embed(tokens_BT), (BATCH, SEQ, ACT_EMBED))
        x_BTD, caches = decode_layers(self.blocks, x_BTD, state.layers, start, self.cfg)
        h_BTD, head = self.final_norm(x_BTD), state.head
        if head is None:  # a head of the current tokens alone (the LM head, MTP heads)
            logits_BTV, _ = self.head(h_BTD, decode_ctx(tokens_BT, start), embed=self.embed)
        else:  # a head with its own state (a conditioning planner)
            logits_BTV, head = self.head.decode(h_BTD, head, start, embed=self.embed)
        return logits_BTV, DecodeState(caches, start + tokens_BT.shape[1], head)
