"""The planner's writer: it writes the planned block last token first, reading the prefix.

A part of the `planner` head (`arch.planner`, `model.head.writer_layers` > 0). For block j (last
position a_j = (j+1)P - 1) it writes the P tokens x_{a_j+1..a_j+P} of block j+1 in reverse,
step i = 0..P-1 giving y_i = x_{a_j+P-i}:

    m_t = h_t + sum_{k=1..K} c_k * h_{t-k}          (memory taps; earlier states of t's document)
    u_0 = z_j + e_0,   u_i = Emb(y_{i-1}) + e_i   (i > 0; the plan then through step 0)
    u <- u + Attn(RMSNorm u  ->  [RMSNorm_m m_t, t <= a_j in a_j's document ; RMSNorm u_{<=i}])
    u <- u + SwiGLU(RMSNorm u)                                   (per writer layer)
    p(y_i | z_j, h_{<=a_j}, y_{<i}) = softmax(U RMSNorm(u_i))

z_j is the block's plan, e_i a learned step embedding, h the backbone's final hidden states, U
and Emb the model's (un)embedding, c_k [D] per-channel taps (K = `writer_taps`, all
`writer_tap_init` at init, zero by default: a short causal depthwise convolution, as the
Canon layers of Allen-Zhu's "Physics of Language Models" 4.1; K = 0: m = h). With
`writer_taps_on: keys_values` the states are not mixed (m = h); instead each layer mixes its
memory keys and values after their projections, each with taps of its own, as Canon-B does:

    k_t <- k_t + sum_k c^K_k * k_{t-k},   v_t <- v_t + sum_k c^V_k * v_{t-k}   (c [H, Dh])

so a key can stay its own position's (the node looked up) while its value carries the
position before (the node's parent on path-star); with taps on the states both come from one
mixed state. Each layer's attention reads the memory and the block's earlier steps with the
same projections; there are no positions in it (h carries the backbone's, the taps the order
of neighbours). Every step's query reads the whole masked row, so a writer layer costs about
one causal attention layer over the row per pass.

Training scores the steps teacher-forced (y_{<i} the true tokens of block j+1, written last
first: the reverse loss; where a token does not count, past the row or the document or under a
loss-mask zero, the step reads the writer's own token there, as greedy writing does) and,
separately, writes every block greedily with its own tokens (stop-gradient): those tokens steer
the LM (`Planner.reading`), so what the LM reads at training is what it reads when generating,
and nothing of block j+1 reaches it.

Why last first: on path-star the block after `=` is the path, whose last node is the goal, in
the prompt; written goal first, every step is one edge lookup whose query is the token just
written (the reversed-target control's structure), where written first to last the first
choice needs the whole path found at once. The design is this repo's (planners.md's proposal
has no writer); a backward factorisation of the next block is close in spirit to the Belief
State Transformer's backward encoder (Hu et al. 2024), not taken from it.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from .attention import AttentionConfig
from .config import ModelConfig
from .layers import Embed, dtype_of, linear, param, rms_norm
from .swiglu import SwiGLUConfig


def causal_taps(x_BT_, taps_K_, segments_BT: jax.Array | None) -> jax.Array:
    """x_t + sum_{k=1..K} c_k * x_{t-k} (c_k = taps[k - 1], shaped as x's trailing axes), the
    earlier entries taken in t's document only (`segments`; None: one document)."""
    out, t = x_BT_, x_BT_.shape[1]
    trailing = [(0, 0)] * (x_BT_.ndim - 2)
    for k in range(1, min(taps_K_.shape[0], t - 1) + 1):
        earlier = jnp.pad(x_BT_[:, : t - k], ((0, 0), (k, 0), *trailing))
        if segments_BT is not None:
            same_BT = jnp.pad(segments_BT[:, k:] == segments_BT[:, : t - k], ((0, 0), (k, 0)))
            earlier = jnp.where(same_BT.reshape(same_BT.shape + (1,) * len(trailing)), earlier, 0)
        out = out + taps_K_[k - 1].astype(x_BT_.dtype) * earlier
    return out


class WriterLayer(nnx.Module):
    """One writer layer: attention over the memory and the block's earlier steps, then SwiGLU."""

    def __init__(
        self,
        attention: AttentionConfig,
        ffn: SwiGLUConfig,
        model: ModelConfig,
        *,
        kv_taps: int = 0,
        tap_init: float = 0.0,
        key_tap_init: float | None = None,
        rngs,
    ):
        d, h = model.d_model, attention.n_heads
        hd = attention.dim_head(model)
        key_init = tap_init if key_tap_init is None else key_tap_init

        def init(key, shape, dtype):  # [keys, values]
            return jnp.stack([jnp.full(shape[1:], c, dtype) for c in (key_init, tap_init)])

        shape, names = (2, kv_taps, h, hd), ("kv", "memory_tap", "heads", "head_dim")
        kw = dict(std=None, dtype=dtype_of(model.param_dtype), init=init)
        self.kv_taps = param(rngs, shape, names, **kw) if kv_taps else None
        self.norm = rms_norm(model, rngs=rngs)
        self.memory_norm = rms_norm(model, rngs=rngs)
        self.q = linear(model, d, (h, hd), ("embed", "heads", "head_dim"), rngs=rngs)
        self.k = linear(model, d, (h, hd), ("embed", "heads", "head_dim"), rngs=rngs)
        self.v = linear(model, d, (h, hd), ("embed", "heads", "head_dim"), rngs=rngs)
        self.o = linear(model, (h, hd), d, ("heads", "head_dim", "embed"), rngs=rngs)
        self.ffn_norm = rms_norm(model, rngs=rngs)
        self.ffn = ffn.build(model, rngs=rngs)

    def memory(self, h_BTD: jax.Array, segments_BT) -> tuple[jax.Array, jax.Array]:
        """Keys and values [B,T,H,Dh] of the prefix's states, each mixed with its own taps
        (`kv_taps`: c^K_k, c^V_k [H,Dh]) when the writer's taps are on keys and values."""
        m_BTD = self.memory_norm(h_BTD)
        k_BTHK, v_BTHK = self.k(m_BTD), self.v(m_BTD)
        if self.kv_taps is None:
            return k_BTHK, v_BTHK
        return (
            causal_taps(k_BTHK, self.kv_taps[0], segments_BT),
            causal_taps(v_BTHK, self.kv_taps[1], segments_BT),
        )

    def step(self, u_BND, i, cache, memory, allowed_BNT) -> tuple[jax.Array, Any]:
        """Step i of every block: u [B,N,D] -> u; `cache` the block's earlier steps' keys and
        values [B,N,P,H,Dh] (step i's written in)."""
        x_BND = self.norm(u_BND)
        q_BNHK = self.q(x_BND)
        k_BNPHK = jax.lax.dynamic_update_index_in_dim(cache[0], self.k(x_BND), i, 2)
        v_BNPHK = jax.lax.dynamic_update_index_in_dim(cache[1], self.v(x_BND), i, 2)
        k_BTHK, v_BTHK = memory
        scale = 1.0 / math.sqrt(q_BNHK.shape[-1])
        s_mem = jnp.einsum("bnhk,bthk->bnht", q_BNHK, k_BTHK, preferred_element_type=jnp.float32)
        s_own = jnp.einsum("bnhk,bnphk->bnhp", q_BNHK, k_BNPHK, preferred_element_type=jnp.float32)
        s_mem = jnp.where(allowed_BNT[:, :, None], s_mem * scale, -jnp.inf)
        earlier = jnp.arange(k_BNPHK.shape[2]) <= i
        s_own = jnp.where(earlier, s_own * scale, -jnp.inf)
        w = jax.nn.softmax(jnp.concatenate([s_mem, s_own], -1), axis=-1).astype(v_BTHK.dtype)
        t = s_mem.shape[-1]
        out_BNHK = jnp.einsum("bnht,bthk->bnhk", w[..., :t], v_BTHK) + jnp.einsum(
            "bnhp,bnphk->bnhk", w[..., t:], v_BNPHK
        )
        u_BND = u_BND + self.o(out_BNHK).astype(u_BND.dtype)
        u_BND = u_BND + self.ffn(self.ffn_norm(u_BND), None)[0].astype(u_BND.dtype)
        return u_BND, (k_BNPHK, v_BNPHK)


class PlanWriter(nnx.Module):
    """Writes each planned block last token first (module docstring)."""

    def __init__(
        self,
        layers: int,
        block: int,
        taps: int,
        attention,
        ffn,
        model: ModelConfig,
        *,
        tap_init: float = 0.0,
        taps_on: str = "states",
        key_tap_init: float | None = None,
        rngs: nnx.Rngs,
    ):
        self.block = block
        dtype = dtype_of(model.param_dtype)
        shape, names = (taps, model.d_model), ("memory_tap", "embed")
        init = jax.nn.initializers.constant(tap_init)
        on_states = taps and taps_on == "states"
        kw = dict(std=None, dtype=dtype, init=init)
        self.taps = param(rngs, shape, names, **kw) if on_states else None
        kv = dict(kv_taps=0 if on_states else taps, tap_init=tap_init, key_tap_init=key_tap_init)
        self.layers = nnx.List(
            [WriterLayer(attention, ffn, model, **kv, rngs=rngs) for _ in range(layers)]
        )
        shape, names = (block, model.d_model), ("plan_offset", "embed")
        self.steps = param(rngs, shape, names, std=model.init_std, dtype=dtype)
        self.out_norm = rms_norm(model, rngs=rngs)

    def mix(self, h_BTD: jax.Array, segments_BT: jax.Array | None) -> jax.Array:
        """m_t = h_t + sum_k c_k * h_{t-k}, k = 1..K (K `taps`, c_k [D]), the earlier states
        taken in t's document only (`segments`; None: one document); m = h when the taps are
        not on the states."""
        return h_BTD if self.taps is None else causal_taps(h_BTD, self.taps[...], segments_BT)

    def memory(self, h_BTD: jax.Array, segments_BT: jax.Array | None) -> list:
        """Every layer's keys and values [B,T,H,Dh] of the mixed states (`mix`)."""
        m_BTD = self.mix(h_BTD, segments_BT)
        return [layer.memory(m_BTD, segments_BT) for layer in self.layers]

    def write(self, z_BND, memory, allowed_BNT, embed: Embed, head, teacher=None):
        """(logits [B,N,P,V] float32, tokens [B,N,P] int32) of the P steps of every block, step
        i the block's token P - 1 - i, reading `memory` (from `memory`) where `allowed`. Each
        step reads the tokens of the steps before it: its own argmax tokens (greedy); with
        `teacher` = (tokens, known) [B,N,P] in step order, the true token where it counts
        (teacher forcing) and its own where not (past the row or the document, or masked out:
        what greedy writing reads there too)."""
        b, n, d = z_BND.shape
        kv_shape = (b, n, self.block, *memory[0][0].shape[2:])
        caches = [(jnp.zeros(kv_shape, m[0].dtype),) * 2 for m in memory]
        zero = jnp.zeros((b, n), jnp.int32)
        if teacher is not None:
            inputs_PBN, known_PBN = (jnp.moveaxis(x, -1, 0) for x in teacher)

        def step(carry, i):
            caches, prev_BN = carry
            first = jnp.where(i == 0, z_BND, embed(prev_BN).astype(z_BND.dtype))
            u_BND = first + self.steps[i].astype(z_BND.dtype)
            new = []
            for layer, cache, mem in zip(self.layers, caches, memory, strict=True):
                u_BND, cache = layer.step(u_BND, i, cache, mem, allowed_BNT)
                new.append(cache)
            logits_BNV = head(self.out_norm(u_BND))
            token_BN = jnp.argmax(logits_BNV, axis=-1).astype(jnp.int32)
            if teacher is not None:
                token_BN = jnp.where(known_PBN[i] > 0, inputs_PBN[i], token_BN)
            return (new, token_BN), (logits_BNV, token_BN)

        _, (logits_PBNV, tokens_PBN) = jax.lax.scan(step, (caches, zero), jnp.arange(self.block))
        return jnp.moveaxis(logits_PBNV, 0, 2), jnp.moveaxis(tokens_PBN, 0, -1)
