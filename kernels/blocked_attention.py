"""Softmax attention written for XLA (jnp, every backend): causal queries in blocks that score
only the keys up to their own end, with a FlashAttention-style custom VJP.

The attention mixer's "xla" implementation and the chunked attention's fast path off GPU
(`chunked_attention(impl="xla")`, each chunk a causal sequence): the fully masked upper blocks
of the score matrix are never computed, and the backward recomputes the probabilities from the
saved log-sum-exp instead of saving [T,S] tensors. The dense references (`attention_reference`,
`chunked_attention_reference`) define what it computes.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


def blocked_attention(
    q_BTHD: jax.Array,
    k_BTKD: jax.Array,
    v_BTKE: jax.Array,
    segment_ids_BT: jax.Array,
    *,
    causal: bool = True,
    scale: float | None = None,
    q_block: int = 256,
) -> jax.Array:
    """Softmax attention with GQA; query t sees key s iff (s <= t if causal) and same segment.

    q [B,T,H,D], k [B,T,K,D], v [B,T,K,E] with K | H (query head h reads kv head h // G,
    G = H/K); scale default 1/sqrt(D); returns [B,T,H,E] in q's dtype. Each kv head serves its
    G query heads without repeating k/v; scores and softmax in float32. When causal, queries are
    split into ceil(T / q_block) blocks and each block only scores the keys up to its own end,
    so the fully masked upper blocks cost nothing (exact: they would get weight 0).
    """
    b, t, h, d = q_BTHD.shape
    kv = k_BTKD.shape[2]
    g = h // kv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    # Layout: heads lead and the G query heads of a kv head are stacked along the query axis
    # (M = G*C for a block of C queries), so both matmuls are plain batched [M,D]x[D,S]
    # products over (B,K), which XLA CPU runs faster than einsums over [B,T,K,G,D].
    # The score tensor is memory-bound on CPU (softmax and its backward are several passes
    # over [B,K,G,C,S]), so skipping the upper blocks saves about as much time as FLOPs.
    q_BKGTD = (q_BTHD * jnp.asarray(scale, q_BTHD.dtype)).reshape(b, t, kv, g, d)
    q_BKGTD = q_BKGTD.transpose(0, 2, 3, 1, 4)
    k_BKSD = k_BTKD.transpose(0, 2, 1, 3)
    v_BKSD = v_BTKE.transpose(0, 2, 1, 3)
    n_blocks = max(1, -(-t // q_block)) if causal else 1
    bounds = tuple(round(i * t / n_blocks) for i in range(n_blocks + 1))
    o_BKGTD = _blocked_attention(bounds, causal, q_BKGTD, k_BKSD, v_BKSD, segment_ids_BT)
    return o_BKGTD.transpose(0, 3, 1, 2, 4).reshape(b, t, h, v_BTKE.shape[-1])


def _block_scores(lo, hi, causal, q_BKGTD, k_BKSD, segment_ids_BT):
    """Masked float32 scores [B,K,G,C,S] of queries lo:hi against the keys they can see, and
    the block's queries as [B,K,G*C,D]."""
    b, kv, g, t, d = q_BKGTD.shape
    c, s = hi - lo, (hi if causal else t)
    q_BKMD = q_BKGTD[:, :, :, lo:hi].reshape(b, kv, g * c, d)
    s_BKMS = jnp.einsum(
        "bkmd,bksd->bkms", q_BKMD, k_BKSD[:, :, :s], preferred_element_type=jnp.float32
    )
    mask_BCS = segment_ids_BT[:, lo:hi, None] == segment_ids_BT[:, None, :s]
    if causal:
        rows = jax.lax.broadcasted_iota(jnp.int32, (c, s), 0) + lo
        mask_BCS = mask_BCS & (rows >= jax.lax.broadcasted_iota(jnp.int32, (c, s), 1))[None]
    s_BKGCS = s_BKMS.reshape(b, kv, g, c, s)
    return jnp.where(mask_BCS[:, None, None], s_BKGCS, jnp.finfo(jnp.float32).min), q_BKMD


def _blocked_attention_fwd(bounds, causal, q_BKGTD, k_BKSD, v_BKSD, segment_ids_BT):
    b, kv, g, t, _ = q_BKGTD.shape
    e = v_BKSD.shape[-1]
    outs, lses = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        c, s = hi - lo, (hi if causal else t)
        s_BKGCS, _ = _block_scores(lo, hi, causal, q_BKGTD, k_BKSD, segment_ids_BT)
        m_BKGC = jnp.max(s_BKGCS, axis=-1)
        e_BKGCS = jnp.exp(s_BKGCS - m_BKGC[..., None])
        l_BKGC = jnp.sum(e_BKGCS, axis=-1)
        p_BKMS = (e_BKGCS / l_BKGC[..., None]).astype(v_BKSD.dtype).reshape(b, kv, g * c, s)
        o_BKME = jnp.einsum("bkms,bkse->bkme", p_BKMS, v_BKSD[:, :, :s])
        outs.append(o_BKME.reshape(b, kv, g, c, e))
        lses.append(m_BKGC + jnp.log(l_BKGC))
    o_BKGTD = jnp.concatenate(outs, axis=3) if len(outs) > 1 else outs[0]
    lse_BKGT = jnp.concatenate(lses, axis=3) if len(lses) > 1 else lses[0]
    return o_BKGTD, (q_BKGTD, k_BKSD, v_BKSD, segment_ids_BT, o_BKGTD, lse_BKGT)


def _blocked_attention_bwd(bounds, causal, res, do_BKGTD):
    # FlashAttention's backward (Dao et al. 2022, Alg. 4) at block granularity: probabilities
    # are recomputed from the saved log-sum-exp, so no [T,S] tensor is saved for the backward
    # (inside a layer scan such residuals are stacked over layers: a large write and read).
    q_BKGTD, k_BKSD, v_BKSD, segment_ids_BT, o_BKGTD, lse_BKGT = res
    b, kv, g, t, d = q_BKGTD.shape
    e = v_BKSD.shape[-1]
    delta_BKGT = jnp.sum(do_BKGTD.astype(jnp.float32) * o_BKGTD.astype(jnp.float32), axis=-1)
    dq_blocks = []
    dk_BKSD = jnp.zeros(k_BKSD.shape, jnp.float32)
    dv_BKSD = jnp.zeros(v_BKSD.shape, jnp.float32)
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        c, s = hi - lo, (hi if causal else t)
        s_BKGCS, q_BKMD = _block_scores(lo, hi, causal, q_BKGTD, k_BKSD, segment_ids_BT)
        p_BKGCS = jnp.exp(s_BKGCS - lse_BKGT[:, :, :, lo:hi, None])
        do_BKMD = do_BKGTD[:, :, :, lo:hi].reshape(b, kv, g * c, e)
        p_BKMS = p_BKGCS.astype(v_BKSD.dtype).reshape(b, kv, g * c, s)
        dv_BKSD = dv_BKSD.at[:, :, :s].add(
            jnp.einsum("bkms,bkme->bkse", p_BKMS, do_BKMD, preferred_element_type=jnp.float32)
        )
        dp_BKMS = jnp.einsum(
            "bkme,bkse->bkms", do_BKMD, v_BKSD[:, :, :s], preferred_element_type=jnp.float32
        )
        ds_BKGCS = p_BKGCS * (dp_BKMS.reshape(b, kv, g, c, s) - delta_BKGT[:, :, :, lo:hi, None])
        ds_BKMS = ds_BKGCS.astype(q_BKGTD.dtype).reshape(b, kv, g * c, s)
        dq_BKMD = jnp.einsum("bkms,bksd->bkmd", ds_BKMS, k_BKSD[:, :, :s])
        dq_blocks.append(dq_BKMD.reshape(b, kv, g, c, d))
        dk_BKSD = dk_BKSD.at[:, :, :s].add(
            jnp.einsum("bkms,bkmd->bksd", ds_BKMS, q_BKMD, preferred_element_type=jnp.float32)
        )
    dq_BKGTD = jnp.concatenate(dq_blocks, axis=3) if len(dq_blocks) > 1 else dq_blocks[0]
    dseg = np.zeros(segment_ids_BT.shape, jax.dtypes.float0)
    return (
        dq_BKGTD.astype(q_BKGTD.dtype),
        dk_BKSD.astype(k_BKSD.dtype),
        dv_BKSD.astype(v_BKSD.dtype),
        dseg,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _blocked_attention(bounds, causal, q_BKGTD, k_BKSD, v_BKSD, segment_ids_BT):
    """Attention of pre-scaled q [B,K,G,T,D] over k [B,K,S,D] and v [B,K,S,E] with queries in
    blocks `bounds`; -> [B,K,G,T,E]."""
    return _blocked_attention_fwd(bounds, causal, q_BKGTD, k_BKSD, v_BKSD, segment_ids_BT)[0]


_blocked_attention.defvjp(_blocked_attention_fwd, _blocked_attention_bwd)
