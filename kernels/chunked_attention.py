"""Chunked (block-diagonal) attention: the jnp reference and the dispatch to the Pallas kernel.

Megalodon (Ma et al., 2024, Sec. 3) splits the sequence into consecutive, non-overlapping chunks
and runs softmax attention inside each chunk only, causal within it. That is block-sparse
attention with the mask `masks.Chunked(chunk_size, causal)`, so the Pallas path is the kernel
of `sparse_attention` (its index tables visit only the tiles inside each chunk; when chunk_size
is not a multiple of the tile, the tiles straddling a chunk boundary are masked per element).
The reference here is written independently, per chunk, to cross-check that kernel.
"""

from __future__ import annotations

import jax.numpy as jnp
from menagerie.kernels import masks as masks_lib
from menagerie.kernels.dispatch import resolve_impl
from menagerie.kernels.sparse_attention import (
    _split_segments,
    attention_reference,
    block_sparse_flash,
    check_shapes,
)


def chunked_attention_reference(
    q, k, v, *, chunk_size: int, causal: bool = True, scale=None, segment_ids=None
):
    """Per-chunk masked softmax in float32: reshape to [B * n_chunks, chunk, H, D]."""
    check_shapes(q, k, v)
    b, t = q.shape[:2]
    if k.shape[1] != t:
        raise ValueError(f"chunked attention needs Tq == Tk, got {t} and {k.shape[1]}")
    n = -(-t // chunk_size)
    pad = n * chunk_size - t

    def chunks(x):  # [B, T, H, D] -> [B * n, C, H, D]
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
        return x.reshape(b * n, chunk_size, *x.shape[2:])

    pos = jnp.arange(n * chunk_size).reshape(n, chunk_size)
    keep = (pos[:, None, :] < t) & jnp.ones((1, chunk_size, 1), bool)  # [n, Cq, Ck]
    if causal:
        keep = keep & jnp.tril(jnp.ones((chunk_size, chunk_size), bool))[None]
    keep = jnp.broadcast_to(keep[None], (b, n, chunk_size, chunk_size))
    qs, ks = _split_segments(segment_ids, b, t, t)
    if qs is not None:
        qs = jnp.pad(qs, ((0, 0), (0, pad))).reshape(b, n, chunk_size)
        ks = jnp.pad(ks, ((0, 0), (0, pad))).reshape(b, n, chunk_size)
        keep = keep & (qs[..., :, None] == ks[..., None, :])
    keep = keep.reshape(b * n, 1, 1, chunk_size, chunk_size)
    o = attention_reference(chunks(q), chunks(k), chunks(v), keep, scale=scale)
    return o.reshape(b, n * chunk_size, *o.shape[2:])[:, :t]


def chunked_attention(
    q,
    k,
    v,
    *,
    chunk_size: int,
    causal: bool = True,
    scale=None,
    segment_ids=None,
    impl: str = "auto",
    block_sizes=None,
):
    """Attention inside consecutive, non-overlapping chunks of `chunk_size` (block-diagonal).

    Args:
      q: [B, T, Hq, Dqk]; k: [B, T, Hkv, Dqk]; v: [B, T, Hkv, Dv]. Dv may differ from Dqk
        (Megalodon: Z/H and E/H); Hq % Hkv == 0 (GQA). T need not be a multiple of chunk_size
        (the last chunk is shorter) nor of the tile size. bf16 / f16 / f32.
      chunk_size: tokens per chunk; causal: causal inside each chunk.
      scale: default 1 / sqrt(Dqk). segment_ids: int [B, T], attention stays within a segment.
      impl: "auto" | "pallas" | "interpret" | "interpret_tpu" | "reference" (see
        `kernels.dispatch`).
      block_sizes: optional `sparse_attention.BlockSizes` for the Pallas path.
    Returns:
      [B, T, Hq, Dv] in q's dtype. Differentiable in q, k, v (custom_vjp on the Pallas path).
    """
    impl = resolve_impl(impl)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if impl == "reference":
        return chunked_attention_reference(
            q, k, v, chunk_size=chunk_size, causal=causal, scale=scale, segment_ids=segment_ids
        )
    check_shapes(q, k, v)
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"chunked attention needs Tq == Tk, got {q.shape[1]} and {k.shape[1]}")
    mask = masks_lib.Chunked(chunk_size, causal)
    return block_sparse_flash(
        q,
        k,
        v,
        mask,
        scale=scale,
        segment_ids=segment_ids,
        impl=impl,
        block_sizes=block_sizes,
    )
