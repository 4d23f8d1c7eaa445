"""The LM head: next-token logits, from the embedding table when tied."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from .config import ModelConfig
from .layers import ACT_VOCAB, BATCH, SEQ, Embed, constrain, linear
from .parts import Aux, Ctx, HeadConfig


class LMHeadConfig(HeadConfig):
    """Logits x @ W [D,V]; W is the embedding table when `model.tie_embeddings`."""

    kind: Literal["lm"] = "lm"
    """Selects this head."""

    def build(self, model: ModelConfig, *, rngs: nnx.Rngs) -> LMHead:
        return LMHead(model, rngs=rngs)

    def num_params(self, model: ModelConfig) -> int:
        """D V when untied, else 0 (the table is the embedding's)."""
        return 0 if model.tie_embeddings else model.d_model * model.padded_vocab

    def embedding_params(self, model: ModelConfig) -> int:
        return self.num_params(model)

    def flops_per_token(self, model: ModelConfig, seq_len: int) -> float:
        """6 D V: the logits matmul counts whether or not the matrix is tied."""
        return float(6 * model.d_model * model.padded_vocab)


class LMHead(nnx.Module):
    """Next-token logits [B,T,V] float32.

    Heads get the model's `embed` at call time (tying is the head's concern, and sharing the
    module by reference would give its parameter two paths in the state).
    """

    def __init__(self, model: ModelConfig, *, rngs: nnx.Rngs):
        self.out = (
            None
            if model.tie_embeddings
            else linear(model, model.d_model, model.padded_vocab, ("embed", "vocab"), rngs=rngs)
        )

    def __call__(self, x_BTD: jax.Array, ctx: Ctx, *, embed: Embed) -> tuple[jax.Array, Aux]:
        del ctx
        with jax.named_scope("head"):
            if self.out is None:
                logits_BTV = embed.attend(x_BTD)
            else:
                logits_BTV = self.out(x_BTD, out_dtype=jnp.float32)
            logits_BTV = constrain(logits_BTV, (BATCH, SEQ, ACT_VOCAB))
        return logits_BTV, {}
