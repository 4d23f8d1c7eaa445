"""The TPU path of `sparse_attention` / `chunked_attention`: JAX's splash attention.

On TPU, `impl="pallas"` routes here: splash attention (jax.experimental.pallas.ops.tpu.
splash_attention) is Google's block-sparse Mosaic TPU flash attention with a fused backward, and
every `kernels.masks.Mask` maps onto its masks. `impl="interpret_tpu"` runs the very same
kernels in the Pallas TPU interpreter on any device; CPU CI tests that against the reference.

How our contract is mapped onto splash's:
- Layout [B, T, H, D] -> splash's head-major [H, T, D], vmapped over the batch (and over key /
  value heads for GQA, with the MQA kernel per group). q is scaled before the kernel.
- Sequence lengths are padded to a multiple of 128 and head dims to a multiple of 128 (zeros
  change no score; padded value columns are sliced off).
- The mask. Masks that splash has natively (full, causal, local window, chunked causal, and
  their unions / intersections) are passed as splash masks when no padding is needed and every
  query row sees at least one key; anything else is passed as a `NumpyMask` of our dense mask
  (O(Tq * Tk) host memory at trace time). Splash divides by the softmax denominator without a
  guard, so a query with no visible key would give NaN: such rows (and the padded rows) are
  given one extra all-zero key, which makes their output exactly 0 and their gradients 0, as
  the contract says.
- Segment ids map to splash's `SegmentIds`. Rows left empty by segment ids cannot be given the
  extra key (it would need every segment's id), so with segment ids the mask must let every
  query see itself (true for causal, local, chunked masks; not for strictly-causal); otherwise
  this raises `KernelUnsupportedError` naming `impl="reference"`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from menagerie.kernels import masks as masks_lib
from menagerie.kernels.dispatch import KernelUnsupportedError

LANES = 128  # splash tiles: multiples of 128 on both sequence axes


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _splash():
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as kernel,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as mask,
    )

    return kernel, mask


def _native(mask: masks_lib.Mask, shape: tuple[int, int]):
    """The splash mask equal to `mask` on `shape`, or None when there is no native one."""
    _, sm = _splash()
    if isinstance(mask, masks_lib.Full):
        return sm.FullMask(shape)
    if isinstance(mask, masks_lib.Causal):
        return sm.CausalMask(shape, offset=mask.offset)
    if isinstance(mask, masks_lib.LocalWindow):
        return sm.LocalMask(shape, window_size=(mask.left, mask.right), offset=0)
    if isinstance(mask, masks_lib.Chunked) and mask.causal:
        return sm.ChunkedCausalMask(shape, chunk_size=mask.chunk_size)
    if isinstance(mask, masks_lib.And | masks_lib.Or):
        a, b = _native(mask.a, shape), _native(mask.b, shape)
        if a is None or b is None:
            return None
        return (sm.LogicalAnd if isinstance(mask, masks_lib.And) else sm.LogicalOr)(a, b)
    return None


def _sees_itself(mask: masks_lib.Mask, t: int) -> bool:
    """Every query q < t may attend to key q."""
    if not mask.computable:
        return bool(np.all(np.diagonal(mask.dense(t, t))))
    pos = np.arange(t)
    return bool(np.all(mask(pos, pos)))


@functools.lru_cache(maxsize=64)
def _plan(mask: masks_lib.Mask, tq: int, tk: int, has_seg: bool):
    """(splash mask [tq_p, tk_p (+ LANES)], tq_p, tk_p, extra key block?) for this shape."""
    _, sm = _splash()
    tq_p, tk_p = _round_up(tq, LANES), _round_up(tk, LANES)
    # Row facts without a dense [tq, tk] array (block kinds of one-row tiles: O(tq) for the
    # interval masks), so the native path stays O(T) on the host.
    empty_rows = mask.block_kinds(tq, tk, 1, tk)[:, 0] == masks_lib.EMPTY
    if has_seg and (tq != tk or not _sees_itself(mask, tq)):
        raise KernelUnsupportedError(
            "the TPU kernel (splash attention) needs every query to see itself when segment_ids "
            f"are given (a segment's first token must not be left with no key); {mask!r} does "
            "not. Use impl='reference'."
        )
    if (tq_p, tk_p) == (tq, tk) and not empty_rows.any():
        native = _native(mask, (tq, tk))
        if native is not None:
            return native, tq_p, tk_p, False
    extra = bool(empty_rows.any() or tq_p > tq)
    full = np.zeros((tq_p, tk_p + (LANES if extra else 0)), bool)
    full[:tq, :tk] = mask.dense(tq, tk)
    if extra:  # rows with no key (and padded rows) see the first extra key, an all-zero one
        full[:tq, tk_p] = empty_rows
        full[tq:, tk_p] = True
    return sm.NumpyMask(full), tq_p, tk_p, extra


def _blocks(tq_p: int, tk_p: int):
    sk, _ = _splash()
    bq = max(b for b in (512, 256, 128) if tq_p % b == 0)
    bk = max(b for b in (512, 256, 128) if tk_p % b == 0)
    return sk.BlockSizes(
        block_q=bq,
        block_kv=bk,
        block_kv_compute=bk,
        block_q_dkv=bq,
        block_kv_dkv=bk,
        block_kv_dkv_compute=bk,
        block_q_dq=bq,
        block_kv_dq=bk,
    )


def splash_flash(q, k, v, mask, *, scale, group, segment_ids, interpret):
    """`sparse_attention`'s contract on splash attention (see the module docstring).

    q [B, Tq, Hq, Dqk], k [B, Tk, Hkv, Dqk], v [B, Tk, Hkv, Dv]; segment_ids None or a
    (q [B, Tq], kv [B, Tk]) pair of int32 arrays.
    """
    sk, sm = _splash()
    b, tq, hq, dqk = q.shape
    tk, hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
    splash_mask, tq_p, tk_p, extra = _plan(mask, tq, tk, segment_ids is not None)
    tk_x = tk_p + (LANES if extra else 0)
    d_p, dv_p = _round_up(dqk, LANES), _round_up(dv, LANES)
    scale = 1.0 / math.sqrt(dqk) if scale is None else scale
    qs = (q.astype(jnp.float32) * scale).astype(q.dtype)

    def heads_major(x, t_to, d_to):  # [B, T, H, D] -> [B, H, T_to, D_to], zero-padded
        x = jnp.pad(x, ((0, 0), (0, t_to - x.shape[1]), (0, 0), (0, d_to - x.shape[3])))
        return x.transpose(0, 2, 1, 3)

    qh, kh, vh = heads_major(qs, tq_p, d_p), heads_major(k, tk_x, d_p), heads_major(v, tk_x, dv_p)
    seg = None
    if segment_ids is not None:
        qseg, kseg = segment_ids
        # Padded queries / keys get their own id; they are masked out anyway.
        qseg = jnp.pad(qseg, ((0, 0), (0, tq_p - tq)), constant_values=-1)
        kseg = jnp.pad(kseg, ((0, 0), (0, tk_x - tk)), constant_values=-1)
        seg = (qseg, kseg)
    blocks = _blocks(tq_p, tk_x)
    heads = group if group > 1 else hq
    kernel = (sk.make_splash_mqa if group > 1 else sk.make_splash_mha)(
        sm.MultiHeadMask([splash_mask] * heads),
        block_sizes=blocks,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )

    def one(qb, kb, vb, sb):  # one batch row (and one key/value head for GQA)
        ids = None if sb is None else sk.SegmentIds(q=sb[0], kv=sb[1])
        return kernel(qb, kb, vb, segment_ids=ids)

    if group > 1:  # [B, Hkv, group, T, D] queries against [B, Hkv, T, D] keys / values
        qg = qh.reshape(b, hkv, group, tq_p, d_p)
        per_head = jax.vmap(one, in_axes=(0, 0, 0, None))
        o = jax.vmap(per_head, in_axes=(0, 0, 0, 0 if seg is not None else None))(qg, kh, vh, seg)
        o = o.reshape(b, hq, tq_p, dv_p)
    else:
        o = jax.vmap(one, in_axes=(0, 0, 0, 0 if seg is not None else None))(qh, kh, vh, seg)
    return o.transpose(0, 2, 1, 3)[:, :tq, :, :dv].astype(q.dtype)
