"""Chunked (block-diagonal) attention: the jnp reference and the dispatch to the Pallas kernel.

Megalodon (Ma et al., 2024, Sec. 3) splits the sequence into consecutive, non-overlapping chunks
and runs softmax attention inside each chunk only, causal within it. That is block-sparse
attention with the mask `masks.Chunked(chunk_size, causal)`, so the Pallas path is the kernel
of `sparse_attention` (its index tables visit only the tiles inside each chunk; when chunk_size
is not a multiple of the tile, the tiles straddling a chunk boundary are masked per element).
The reference here is written independently, per chunk, to cross-check that kernel. Off GPU,
"auto" runs `impl="xla"`: each chunk as a causal sequence through `blocked_attention`, whose
query blocks skip the masked upper part of the chunk (at chunk 1024 and blocks of 256, 5/8 of
the scores) and whose backward saves no [C,C] tensor.
"""

from __future__ import annotations

import jax.numpy as jnp
from menagerie.kernels import masks as masks_lib
from menagerie.kernels.blocked_attention import blocked_attention
from menagerie.kernels.dispatch import platform, resolve_impl
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
    chunks = _chunker(b, t, chunk_size)

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


def _chunker(b: int, t: int, chunk_size: int):
    """[B, T, ...] -> [B * n, C, ...]: the n chunks of C tokens, the last one zero-padded."""
    n = -(-t // chunk_size)

    def chunks(x):
        x = jnp.pad(x, ((0, 0), (0, n * chunk_size - t)) + ((0, 0),) * (x.ndim - 2))
        return x.reshape(b * n, chunk_size, *x.shape[2:])

    return chunks


def chunked_attention_xla(
    q, k, v, *, chunk_size: int, causal: bool = True, scale=None, segment_ids=None, q_block=256
):
    """Each chunk as one sequence of `blocked_attention` (queries in blocks of `q_block`): the
    reference's contract. A short last chunk's padding gets segment -1: no real query sees it."""
    check_shapes(q, k, v)
    b, t = q.shape[:2]
    if k.shape[1] != t:
        raise ValueError(f"chunked attention needs Tq == Tk, got {t} and {k.shape[1]}")
    chunks = _chunker(b, t, chunk_size)
    seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    pad = -(-t // chunk_size) * chunk_size - t
    seg = jnp.pad(seg, ((0, 0), (0, pad)), constant_values=-1).reshape(-1, chunk_size)
    qkv = chunks(q), chunks(k), chunks(v)
    o = blocked_attention(*qkv, seg, causal=causal, scale=scale, q_block=q_block)
    return o.reshape(b, -1, *o.shape[2:])[:, :t]


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
        `kernels.dispatch`) | "xla" (`chunked_attention_xla`, what "auto" runs off GPU).
      block_sizes: optional `sparse_attention.BlockSizes` for the Pallas path.
    Returns:
      [B, T, Hq, Dv] in q's dtype. Differentiable in q, k, v (custom_vjp on the Pallas and
      xla paths).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if impl == "xla" or (impl == "auto" and platform() != "gpu"):
        return chunked_attention_xla(
            q, k, v, chunk_size=chunk_size, causal=causal, scale=scale, segment_ids=segment_ids
        )
    impl = resolve_impl(impl)
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
