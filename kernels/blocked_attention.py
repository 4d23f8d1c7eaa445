"""Softmax attention written for XLA (jnp, every backend): causal queries in blocks that score
only the keys up to their own end, with a FlashAttention-style custom VJP.

The attention mixer's "xla" implementation and the chunked attention's fast path off GPU
(`chunked_attention(impl="xla")`, each chunk a causal sequence): the fully masked upper blocks
of the score matrix are never computed, and the backward recomputes the probabilities from the
saved row max and sum instead of saving [T,S] tensors. The dense references (`attention_reference`,
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
    offset: int = 0,
    scale: float | None = None,
    q_block: int = 256,
) -> jax.Array:
    """Softmax attention with GQA; query t sees key s iff (s <= t - offset if causal) and same
    segment. `offset` 1 is strictly causal (Memory Mosaics); a query that sees no key (t <
    offset) gets zeros and zero gradients.

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
    shift = offset if causal else None
    o_BKGTD = _blocked_attention(bounds, shift, q_BKGTD, k_BKSD, v_BKSD, segment_ids_BT)
    return o_BKGTD.transpose(0, 3, 1, 2, 4).reshape(b, t, h, v_BTKE.shape[-1])


def _keys_seen(lo: int, hi: int, shift: int | None, t: int) -> int:
    """How many keys queries lo:hi can see: up to hi - shift causally (shift None: all t)."""
    return t if shift is None else max(hi - shift, 0)


def _block_scores(lo, hi, shift, q_BKGTD, k_BKSD, segment_ids_BT):
    """Masked float32 scores [B,K,G,C,S] of queries lo:hi against the keys they can see (key s
    iff s <= t - shift; shift None: not causal), and the block's queries as [B,K,G*C,D]."""
    b, kv, g, t, d = q_BKGTD.shape
    c, s = hi - lo, _keys_seen(lo, hi, shift, t)
    q_BKMD = q_BKGTD[:, :, :, lo:hi].reshape(b, kv, g * c, d)
    s_BKMS = jnp.einsum(
        "bkmd,bksd->bkms", q_BKMD, k_BKSD[:, :, :s], preferred_element_type=jnp.float32
    )
    mask_BCS = segment_ids_BT[:, lo:hi, None] == segment_ids_BT[:, None, :s]
    if shift is not None:
        rows = jax.lax.broadcasted_iota(jnp.int32, (c, s), 0) + (lo - shift)
        mask_BCS = mask_BCS & (rows >= jax.lax.broadcasted_iota(jnp.int32, (c, s), 1))[None]
    s_BKGCS = s_BKMS.reshape(b, kv, g, c, s)
    return jnp.where(mask_BCS[:, None, None], s_BKGCS, jnp.finfo(jnp.float32).min), q_BKMD


def _blocked_attention_fwd(bounds, shift, q_BKGTD, k_BKSD, v_BKSD, segment_ids_BT):
    b, kv, g, t, _ = q_BKGTD.shape
    e = v_BKSD.shape[-1]
    outs, maxes, sums = [], [], []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        c, s = hi - lo, _keys_seen(lo, hi, shift, t)
        if s == 0:  # no query of the block sees a key: zeros, and l = inf zeroes the backward
            outs.append(jnp.zeros((b, kv, g, c, e), v_BKSD.dtype))
            maxes.append(jnp.zeros((b, kv, g, c), jnp.float32))
            sums.append(jnp.full((b, kv, g, c), jnp.inf, jnp.float32))
            continue
        s_BKGCS, _ = _block_scores(lo, hi, shift, q_BKGTD, k_BKSD, segment_ids_BT)
        m_BKGC = jnp.max(s_BKGCS, axis=-1)
        e_BKGCS = jnp.exp(s_BKGCS - m_BKGC[..., None])
        l_BKGC = jnp.sum(e_BKGCS, axis=-1)
        if shift:  # rows t < shift see nothing: every score is the mask value
            l_BKGC = jnp.where(m_BKGC > 0.5 * jnp.finfo(jnp.float32).min, l_BKGC, jnp.inf)
        p_BKMS = (e_BKGCS / l_BKGC[..., None]).astype(v_BKSD.dtype).reshape(b, kv, g * c, s)
        o_BKME = jnp.einsum("bkms,bkse->bkme", p_BKMS, v_BKSD[:, :, :s])
        outs.append(o_BKME.reshape(b, kv, g, c, e))
        maxes.append(m_BKGC)
        sums.append(l_BKGC)
    cat = lambda xs: jnp.concatenate(xs, axis=3) if len(xs) > 1 else xs[0]  # noqa: E731
    # The row max and sum (not their log-sum-exp): the backward recomputes p as exp(s - m) / l,
    # the very numbers of the forward.
    return cat(outs), (q_BKGTD, k_BKSD, v_BKSD, segment_ids_BT, cat(maxes), cat(sums))


def _blocked_attention_bwd(bounds, shift, res, do_BKGTD):
    # FlashAttention's backward (Dao et al. 2022, Alg. 4) at block granularity: probabilities
    # are recomputed from the saved row max and sum, so no [T,S] tensor is saved for the
    # backward (inside a layer scan such residuals are stacked over layers: a large write and
    # read).
    q_BKGTD, k_BKSD, v_BKSD, segment_ids_BT, m_BKGT, l_BKGT = res
    b, kv, g, t, d = q_BKGTD.shape
    e = v_BKSD.shape[-1]
    dq_blocks = []
    dk_BKSD = jnp.zeros(k_BKSD.shape, jnp.float32)
    dv_BKSD = jnp.zeros(v_BKSD.shape, jnp.float32)
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        c, s = hi - lo, _keys_seen(lo, hi, shift, t)
        if s == 0:
            dq_blocks.append(jnp.zeros((b, kv, g, c, d), jnp.float32))
            continue
        s_BKGCS, q_BKMD = _block_scores(lo, hi, shift, q_BKGTD, k_BKSD, segment_ids_BT)
        p_BKGCS = jnp.exp(s_BKGCS - m_BKGT[:, :, :, lo:hi, None]) / l_BKGT[:, :, :, lo:hi, None]
        do_BKMD = do_BKGTD[:, :, :, lo:hi].reshape(b, kv, g * c, e)
        p_BKMS = p_BKGCS.astype(v_BKSD.dtype).reshape(b, kv, g * c, s)
        dv_BKSD = dv_BKSD.at[:, :, :s].add(
            jnp.einsum("bkms,bkme->bkse", p_BKMS, do_BKMD, preferred_element_type=jnp.float32)
        )
        dp_BKMS = jnp.einsum(
            "bkme,bkse->bkms", do_BKMD, v_BKSD[:, :, :s], preferred_element_type=jnp.float32
        )
        # delta = sum_s p dp (= do . o), summed as the softmax's own VJP sums it: with a
        # saturated softmax (p one-hot) ds is then exactly 0, where do . o leaves rounding
        # that large scores (Memory Mosaics: 1e4) multiply into the key gradients.
        dp_BKGCS = dp_BKMS.reshape(b, kv, g, c, s)
        delta_BKGC = jnp.sum(p_BKGCS * dp_BKGCS, axis=-1, keepdims=True)
        ds_BKGCS = p_BKGCS * (dp_BKGCS - delta_BKGC)
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
def _blocked_attention(bounds, shift, q_BKGTD, k_BKSD, v_BKSD, segment_ids_BT):
    """Attention of pre-scaled q [B,K,G,T,D] over k [B,K,S,D] and v [B,K,S,E] with queries in
    blocks `bounds`, key s seen iff s <= t - shift (None: every key); -> [B,K,G,T,E]."""
    return _blocked_attention_fwd(bounds, shift, q_BKGTD, k_BKSD, v_BKSD, segment_ids_BT)[0]


_blocked_attention.defvjp(_blocked_attention_fwd, _blocked_attention_bwd)
