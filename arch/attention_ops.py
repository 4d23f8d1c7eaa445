"""Softmax attention and RoPE: the math of the attention mixer, independent of any module.

`attention` is `kernels.blocked_attention` (jnp, every backend: a blocked causal layout with a
FlashAttention-style custom VJP) or cuDNN's fused kernel, and `arch.ring_attention` when the
active mesh splits the sequence; `apply_rope` rotates query/key pairs.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
from menagerie.kernels.blocked_attention import blocked_attention

from .ring_attention import ring_attention, ring_devices


def apply_rope(
    x_BTHD: jax.Array, positions_BT: jax.Array, theta: float, interleaved: bool = False
) -> jax.Array:
    """Rotary position embedding (Su et al. 2021), rotate-half layout as in HF Llama.

    Positions are per token, so packed documents restart at 0. Angles in float32; output in
    x's dtype. Pairs (i, i + D/2) rotate by positions * theta^(-2i/D); with `interleaved`,
    pairs (2i, 2i + 1) do (the complex-number layout of Meta's Llama and Megalodon code).
    """
    d = x_BTHD.shape[-1]
    inv_freq = theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)  # [D/2]
    angles_BTF = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    cos = jnp.cos(angles_BTF)[:, :, None, :]  # [B,T,1,D/2]
    sin = jnp.sin(angles_BTF)[:, :, None, :]
    x = x_BTHD.astype(jnp.float32)
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x.shape)
    else:
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTHD.dtype)


def attention(
    q_BTHD: jax.Array,
    k_BTKD: jax.Array,
    v_BTKD: jax.Array,
    *,
    segment_ids_BT: jax.Array,
    causal: bool = True,
    impl: Literal["xla", "cudnn"] = "xla",
    q_block: int = 256,
) -> jax.Array:
    """Softmax attention with GQA; query t sees key s iff (s <= t if causal) and same segment.

    q [B,T,H,D], k/v [B,T,K,D] with K | H (query head h reads kv head h // G, G = H/K);
    returns [B,T,H,D] in q's dtype. "xla": `kernels.blocked_attention` (causal query blocks
    of q_block that skip the masked upper blocks; float32 softmax). "cudnn":
    jax.nn.dot_product_attention's cuDNN kernel (GPU, bf16/fp16 inputs; untested here so far).
    Under a mesh whose `sequence` axis (size P > 1) is not manual, either impl is
    `arch.ring_attention` (jnp blocks, float32 softmax), so the compiler never gathers the
    whole sequence's keys and values; that needs T to be a multiple of 2P (else a warning, and
    the compiler places the attention).
    """
    t, d = q_BTHD.shape[1], q_BTHD.shape[3]
    scale = 1.0 / math.sqrt(d)
    if ring_devices(t) > 1:
        return ring_attention(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT, causal=causal, scale=scale)
    if impl == "cudnn":
        same_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
        if causal:
            same_BTS = same_BTS & jnp.tril(jnp.ones((t, t), dtype=jnp.bool_))[None]
        return jax.nn.dot_product_attention(
            q_BTHD, k_BTKD, v_BTKD, mask=same_BTS[:, None], scale=scale, implementation="cudnn"
        )
    return blocked_attention(
        q_BTHD, k_BTKD, v_BTKD, segment_ids_BT, causal=causal, scale=scale, q_block=q_block
    )
