"""Block-sparse flash attention: Pallas kernels, the jnp reference, and the custom_vjp wiring.

`sparse_attention(q, k, v, mask=...)` computes softmax(scale * q k^T + mask) v where the mask is
a `kernels.masks.Mask`. The kernels follow FlashAttention-2 (Dao, 2023, Alg. 1 and 2): online
softmax in float32 over key tiles, the log-sum-exp saved for the backward, which recomputes the
probabilities in a dQ pass (loop over key tiles) and a dK/dV pass (loop over query tiles) using
delta = rowsum(dO * O). Nothing of size [Tq, Tk] is written to HBM. The dK/dV pass works on the
transposed scores S^T = K Q^T, as FlashAttention-2's Triton backward does, and with GQA one
program serves a key block of one kv head for all the query heads that share it, summing their
dK/dV on chip (`BlockSizes.gqa_split` trades that against parallelism).

Block sparsity (as in splash attention's `MaskInfo`): at trace time numpy labels every tile
EMPTY / PARTIAL / FULL and builds, per query block (per key block for dK/dV), the list of
non-empty tiles, FULL ones first. The kernel runs two `fori_loop`s with bounds read from that
table: FULL tiles unmasked, PARTIAL tiles masked per element. Empty tiles are never touched.

Lowering. GPU uses the Pallas Triton lowering (`pallas.triton.CompilerParams`): it accepts
dynamic loop bounds read from memory and arbitrary block-sparse index tables with one kernel
body, and it runs on Ampere as well as Hopper. Mosaic GPU (the default GPU lowering since JAX
0.9, Triton deprecated in 0.11) would be faster on Hopper but needs warp-specialised pipelines
with static shapes per tile; that is future work. The interpreter (`impl="interpret"`) runs the
very same kernel functions on CPU. On TPU, `block_sparse_flash` hands over to JAX's splash
attention (`kernels.tpu`): these kernels index whole-sequence refs, which Mosaic TPU would place
in VMEM.

Contracts (all kernels):
- q [B, Tq, Hq, Dqk], k [B, Tk, Hkv, Dqk], v [B, Tk, Hkv, Dv]; Hq % Hkv == 0 (GQA: query head
  h uses key/value head h // (Hq // Hkv)); Dv may differ from Dqk. bf16 / f16 / f32 inputs,
  float32 accumulation, output in q's dtype.
- Any Tq, Tk: the wrapper pads to block multiples (padded keys are masked) and head dims to
  powers of two >= 16 (zeros change no score).
- A query row with no visible key outputs zeros; its gradients are zero (never NaN).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from menagerie.kernels import masks as masks_lib
from menagerie.kernels.dispatch import KernelUnsupportedError, kernel_family, resolve_impl

# A finite "minus infinity": exp2(MASK_VALUE - m) underflows to 0 without inf - inf NaNs.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (powers of two >= 16) and Triton launch parameters, per kernel.

    Forward: `q` query rows per program, `k` key rows per inner step. dK/dV kernel: `k_bwd` key
    rows per program, `q_bwd` query rows per inner step. dQ kernel: `q_dq` query rows per program,
    `k_dq` key rows per inner step (default: `q_bwd`, `k_bwd`). `dv` tiles the value head dim
    (Megalodon's Dv = 2048) in the forward, `dv_bwd` in the backward (default: `dv`).
    `num_warps` / `num_stages` apply to the forward; the `_bwd` ones to both backward kernels
    (default: the forward's).

    `gqa_split` (GQA only): the dK/dV kernel runs `gqa_split` programs per key/value head, each
    summing the dK/dV of `group // gqa_split` query heads in registers; XLA adds the partial
    sums when `gqa_split > 1`. 1 writes no per-query-head dK/dV to HBM at all; `group` is one
    program per query head. None picks the smallest split that still launches
    `MIN_DKV_PROGRAMS` programs (`dkv_gqa_split`).
    """

    q: int = 64
    k: int = 64
    q_bwd: int = 64
    k_bwd: int = 64
    dv: int = 256
    num_warps: int | None = None
    num_stages: int = 2
    q_dq: int | None = None
    k_dq: int | None = None
    num_warps_bwd: int | None = None
    num_stages_bwd: int | None = None
    dv_bwd: int | None = None
    gqa_split: int | None = None

    @property
    def dq_tiles(self) -> tuple[int, int]:
        return (self.q_dq or self.q_bwd, self.k_dq or self.k_bwd)

    @classmethod
    def default(cls, dqk: int, dv: int) -> BlockSizes:
        """The fastest of `python bench/kernels.py --tune` on an H100 (JAX 0.11.2, bf16): at
        Megalodon-7B shapes (Dqk 256, Dv 2048) and at Llama shapes (head dim 128)."""
        bwd = dict(q_bwd=64, k_bwd=64, num_warps_bwd=4, num_stages_bwd=2)
        if max(dqk, min(dv, 256)) > 128:
            return cls(q=128, k=64, dv=256, num_warps=8, num_stages=2, **bwd)
        return cls(q=128, k=128, num_warps=8, num_stages=3, **bwd)


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the kernels need that is known at trace time (hashable: custom_vjp static)."""

    scale: float
    mask: masks_lib.Mask | None  # evaluated in-kernel; None when a dense int8 mask is passed
    tk: int  # true key length; keys >= tk are padding
    blocks: BlockSizes
    group: int  # Hq // Hkv
    split: int  # dK/dV programs per kv head (gqa_split); each sums group // split query heads
    dv_tile: int
    n_dv: int  # number of dv tiles
    dv_tile_bwd: int
    n_dv_bwd: int
    has_seg: bool
    interpret: bool
    f32: bool  # f32 inputs: ask for IEEE dots (Triton would use TF32)


# ----------------------------------------------------------------------------- kernel bodies


def _dot(a, b, st: _Static, contract=((1,), (0,))):
    prec = lax.Precision.HIGHEST if st.f32 else None
    return lax.dot_general(
        a, b, (contract, ((), ())), precision=prec, preferred_element_type=jnp.float32
    )


def _dot_nt(a, b, st):  # a @ b.T
    return _dot(a, b, st, ((1,), (1,)))


def _split_refs(st: _Static, refs):
    """(cnt, idx, dense | None, qseg | None, kseg | None, rest): the common leading refs."""
    cnt, idx, *refs = refs
    dense = refs.pop(0) if st.mask is None else None
    qseg = kseg = None
    if st.has_seg:
        qseg, kseg, *refs = refs
    return cnt, idx, dense, qseg, kseg, refs


def _keep(st, q0, k0, bq, bk, dense_ref, qseg_ref, kseg_ref, partial, transposed=False):
    """bool [bq, bk] of visible pairs in the tile at (q0, k0) ([bk, bq] when `transposed`; then
    `dense_ref` is the transposed mask), or None when all are visible."""
    keep = None
    if partial:
        if dense_ref is not None:
            rows, cols = (
                (pl.ds(k0, bk), pl.ds(q0, bq)) if transposed else (pl.ds(q0, bq), pl.ds(k0, bk))
            )
            keep = dense_ref[rows, cols] != 0
        else:
            q_pos = q0 + jnp.arange(bq, dtype=jnp.int32)
            k_pos = k0 + jnp.arange(bk, dtype=jnp.int32)
            if transposed:
                q_pos, k_pos = q_pos[None, :], k_pos[:, None]
            else:
                q_pos, k_pos = q_pos[:, None], k_pos[None, :]
            keep = st.mask(q_pos, k_pos) & (k_pos < st.tk)
    if st.has_seg:
        qs, ks = qseg_ref[pl.ds(q0, bq)], kseg_ref[pl.ds(k0, bk)]
        same = (ks[:, None] == qs[None, :]) if transposed else (qs[:, None] == ks[None, :])
        keep = same if keep is None else keep & same
    return keep


def _two_loops(cnt_ref, row, body, carry):
    """FULL tiles unmasked, then PARTIAL tiles masked; bounds come from the index table."""
    n_full, n_any = cnt_ref[row, 0], cnt_ref[row, 1]
    carry = lax.fori_loop(0, n_full, functools.partial(body, partial=False), carry)
    return lax.fori_loop(n_full, n_any, functools.partial(body, partial=True), carry)


def _fwd_kernel(*refs, st: _Static):
    cnt_ref, idx_ref, dense_ref, qseg_ref, kseg_ref, refs = _split_refs(st, refs)
    q_ref, k_ref, v_ref, o_ref, lse_ref = refs
    bq, bk = st.blocks.q, st.blocks.k
    i = pl.program_id(2)
    q0 = i * bq
    q = q_ref[...]
    c = st.scale * _LOG2E  # work in base 2: exp2 is the native instruction

    def body(t, carry, partial):
        acc, m, l_sum = carry
        k0 = pl.multiple_of(idx_ref[i, t] * bk, bk)
        s = _dot_nt(q, k_ref[pl.ds(k0, bk), :], st) * c
        keep = _keep(st, q0, k0, bq, bk, dense_ref, qseg_ref, kseg_ref, partial)
        if keep is not None:
            s = jnp.where(keep, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l_sum = alpha * l_sum + jnp.sum(p, axis=1)
        v = v_ref[pl.ds(k0, bk), :]
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, st)
        return acc, m_new, l_sum

    acc = jnp.zeros((bq, o_ref.shape[-1]), jnp.float32)
    m = jnp.full((bq,), MASK_VALUE, jnp.float32)
    l_sum = jnp.zeros((bq,), jnp.float32)
    acc, m, l_sum = _two_loops(cnt_ref, i, body, (acc, m, l_sum))
    # A row that saw no visible key still has m == MASK_VALUE (real scores are far above it):
    # output 0 and lse = +inf, so the backward's exp2(s - lse) is exactly 0 for that row.
    empty = m <= 0.5 * MASK_VALUE
    l_sum = jnp.where(empty, 1.0, l_sum)
    o_ref[...] = jnp.where(empty[:, None], 0.0, acc / l_sum[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log2(l_sum))


def _dp(a_at, b_at, st: _Static, shape):
    """sum over the dv tiles d of a(d) @ b(d)^T (dP = dO V^T, or its transpose V dO^T), tiles
    loaded by the callbacks. A fori_loop, not a Python loop, so only one pair of tiles is live
    at a time (shared memory)."""
    if st.n_dv == 1:
        return _dot_nt(a_at(0), b_at(0), st)

    def step(d, acc):
        return acc + _dot_nt(a_at(d), b_at(d), st)

    return lax.fori_loop(0, st.n_dv, step, jnp.zeros(shape, jnp.float32))


def _cols(start, width: int):
    """pl.ds(start, width) for a column offset that is a multiple of `width` (static or not:
    the Triton lowering cannot put multiple_of on a literal)."""
    if isinstance(start, int):
        return pl.ds(start, width)
    return pl.ds(pl.multiple_of(start, width), width)


def _dq_kernel(*refs, st: _Static):
    cnt_ref, idx_ref, dense_ref, qseg_ref, kseg_ref, refs = _split_refs(st, refs)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
    bq, bk = st.blocks.dq_tiles
    i = pl.program_id(2)
    q0 = i * bq
    q, lse, delta = q_ref[...], lse_ref[...], delta_ref[...]
    c = st.scale * _LOG2E
    do_full = do_ref[...] if st.n_dv == 1 else None  # small enough to keep on chip

    def body(t, dq, partial):
        k0 = pl.multiple_of(idx_ref[i, t] * bk, bk)
        k = k_ref[pl.ds(k0, bk), :]
        s = _dot_nt(q, k, st) * c
        keep = _keep(st, q0, k0, bq, bk, dense_ref, qseg_ref, kseg_ref, partial)
        if keep is not None:
            s = jnp.where(keep, s, MASK_VALUE)
        p = jnp.exp2(s - lse[:, None])
        dp = _dp(
            lambda d: (
                do_full if do_full is not None else do_ref[:, _cols(d * st.dv_tile, st.dv_tile)]
            ),
            lambda d: v_ref[pl.ds(k0, bk), _cols(d * st.dv_tile, st.dv_tile)],
            st,
            (bq, bk),
        )
        ds = p * (dp - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k, st)

    dq = _two_loops(cnt_ref, i, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * st.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, st: _Static, want_dk: bool, want_dv: bool):
    """Per key block (of one kv head): loops over the `group // split` query heads it serves
    and, per head, over the query blocks that see the key block, summing dK / dV in registers.

    It works with S^T = K Q^T [bk, bq] (as FlashAttention-2's Triton backward does), so P^T and
    dS^T come out of their matmuls in the layout the next matmul (P^T dO, dS^T Q) consumes: no
    transpose of a register tile. Refs per program: q [Tq, gs * Dqk] and dO [Tq, gs * Dv] (the
    gs query heads side by side), lse / delta [gs * Tq]. dK needs all of dP (every dv tile); dV
    is per dv tile. With one dv tile both come from one pass; otherwise the wrapper runs a dV
    pass over a dv-tile grid axis and a dK pass."""
    cnt_ref, idx_ref, dense_ref, qseg_ref, kseg_ref, refs = _split_refs(st, refs)
    refs = list(refs)
    q_ref, k_ref = refs.pop(0), refs.pop(0)
    v_ref = refs.pop(0) if want_dk else None
    do_ref, lse_ref = refs.pop(0), refs.pop(0)
    delta_ref = refs.pop(0) if want_dk else None
    dk_ref = refs.pop(0) if want_dk else None
    dv_ref = refs.pop(0) if want_dv else None
    bq, bk, dvt = st.blocks.q_bwd, st.blocks.k_bwd, st.dv_tile
    gs = st.group // st.split
    dqk = k_ref.shape[-1]
    dv_w = do_ref.shape[-1] // gs  # one head's (padded) value width
    tq = lse_ref.shape[0] // gs
    j = pl.program_id(2)
    d0 = pl.program_id(3) * dvt if (want_dv and not want_dk) else 0  # this program's dv tile
    k0 = j * bk
    k = k_ref[...]
    c = st.scale * _LOG2E

    def head(g, carry):
        q_cols = _cols(g * dqk, dqk)

        def body(t, carry, partial):
            dk, dv = carry
            q0 = pl.multiple_of(idx_ref[j, t] * bq, bq)
            rows = pl.ds(q0, bq)
            stats = pl.ds(pl.multiple_of(g * tq + q0, bq), bq)  # head g's lse / delta
            q = q_ref[rows, q_cols]
            s_t = _dot_nt(k, q, st) * c
            keep = _keep(st, q0, k0, bq, bk, dense_ref, qseg_ref, kseg_ref, partial, True)
            if keep is not None:
                s_t = jnp.where(keep, s_t, MASK_VALUE)
            p_t = jnp.exp2(s_t - lse_ref[stats][None, :])
            do = do_ref[rows, _cols(g * dv_w + d0, dvt)] if want_dv or st.n_dv == 1 else None
            if want_dv:
                dv = dv + _dot(p_t.astype(do.dtype), do, st)
            if want_dk:
                dp_t = _dp(
                    lambda d: v_ref[:, _cols(d * dvt, dvt)],
                    lambda d: (
                        do if do is not None else do_ref[rows, _cols(g * dv_w + d * dvt, dvt)]
                    ),
                    st,
                    (bk, bq),
                )
                ds_t = p_t * (dp_t - delta_ref[stats][None, :])
                dk = dk + _dot(ds_t.astype(q.dtype), q, st)
            return dk, dv

        return _two_loops(cnt_ref, j, body, carry)

    dk = jnp.zeros(k.shape, jnp.float32) if want_dk else None
    dv = jnp.zeros((bk, dvt), jnp.float32) if want_dv else None
    dk, dv = head(0, (dk, dv)) if gs == 1 else lax.fori_loop(0, gs, head, (dk, dv))
    if want_dk:
        dk_ref[...] = (dk * st.scale).astype(dk_ref.dtype)
    if want_dv:
        dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- pallas_call wiring


def _compiler_params(st: _Static, head_dim: int, bwd: bool = False):
    if st.interpret:
        return {}
    from jax.experimental.pallas import triton as pl_triton  # only needed when compiling

    bs = st.blocks
    warps = (bs.num_warps_bwd if bwd else None) or bs.num_warps or (4 if head_dim <= 64 else 8)
    stages = (bs.num_stages_bwd if bwd else None) or bs.num_stages
    return {"compiler_params": pl_triton.CompilerParams(num_warps=warps, num_stages=stages)}


def _common_specs(st: _Static, tables, dense, qseg, kseg):
    """Specs and operands for (cnt, idx, [dense], [qseg, kseg]); grid is (b, h, row, ...)."""
    cnt, idx = tables
    ops = [cnt, idx]
    specs = [
        pl.BlockSpec(cnt.shape, lambda *g: (0, 0)),
        pl.BlockSpec(idx.shape, lambda *g: (0, 0)),
    ]
    if st.mask is None:
        ops.append(dense)
        specs.append(pl.BlockSpec(dense.shape, lambda *g: (0, 0)))
    if st.has_seg:
        ops += [qseg, kseg]
        specs += [
            pl.BlockSpec((None, qseg.shape[1]), lambda b, *g: (b, 0)),
            pl.BlockSpec((None, kseg.shape[1]), lambda b, *g: (b, 0)),
        ]
    return ops, specs


def _kv_head(h, per_kv: int):
    """The kv head of grid head index h when `per_kv` consecutive indices share one."""
    return h if per_kv == 1 else lax.div(h, per_kv)


def _forward(st: _Static, q, k, v, aux):
    fwd_tables, _, _, dense, _, qseg, kseg = aux
    b, tq, hq, dqk = q.shape
    tk = k.shape[1]
    bq, dvt = st.blocks.q, st.dv_tile
    ops, specs = _common_specs(st, fwd_tables, dense, qseg, kseg)
    specs += [
        pl.BlockSpec((None, bq, None, dqk), lambda b_, h, i, d: (b_, i, h, 0)),
        pl.BlockSpec((None, tk, None, dqk), lambda b_, h, i, d: (b_, 0, _kv_head(h, st.group), 0)),
        pl.BlockSpec((None, tk, None, dvt), lambda b_, h, i, d: (b_, 0, _kv_head(h, st.group), d)),
    ]
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, st=st),
        grid=(b, hq, tq // bq, st.n_dv),
        in_specs=specs,
        out_specs=[
            pl.BlockSpec((None, bq, None, dvt), lambda b_, h, i, d: (b_, i, h, d)),
            # Every dv tile writes the same lse values; the duplicate stores are benign.
            pl.BlockSpec((None, None, bq), lambda b_, h, i, d: (b_, h, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, tq, hq, v.shape[-1]), q.dtype),
            jax.ShapeDtypeStruct((b, hq, tq), jnp.float32),
        ],
        interpret=st.interpret,
        name="sparse_attention_fwd",
        **_compiler_params(st, max(dqk, dvt)),
    )(*ops, q, k, v)
    return o, lse


def _backward(st: _Static, q, k, v, aux, o, lse, do):
    st = dataclasses.replace(st, dv_tile=st.dv_tile_bwd, n_dv=st.n_dv_bwd)
    _, dq_tables, dkv_tables, dense, dense_t, qseg, kseg = aux
    b, tq, hq, dqk = q.shape
    tk, hkv, dv_pad = k.shape[1], k.shape[2], v.shape[-1]
    bk, dvt = st.blocks.k_bwd, st.dv_tile
    # delta = rowsum(dO * O) (FlashAttention-2, Alg. 2 line 4); a cheap fused XLA reduction.
    delta = jnp.einsum("bthd,bthd->bht", do.astype(jnp.float32), o.astype(jnp.float32))
    kvh = functools.partial(_kv_head, per_kv=st.group)

    bq_dq = st.blocks.dq_tiles[0]
    ops, specs = _common_specs(st, dq_tables, dense, qseg, kseg)
    specs += [
        pl.BlockSpec((None, bq_dq, None, dqk), lambda b_, h, i: (b_, i, h, 0)),
        pl.BlockSpec((None, tk, None, dqk), lambda b_, h, i: (b_, 0, kvh(h), 0)),
        pl.BlockSpec((None, tk, None, dv_pad), lambda b_, h, i: (b_, 0, kvh(h), 0)),
        pl.BlockSpec((None, bq_dq, None, dv_pad), lambda b_, h, i: (b_, i, h, 0)),
        pl.BlockSpec((None, None, bq_dq), lambda b_, h, i: (b_, h, i)),
        pl.BlockSpec((None, None, bq_dq), lambda b_, h, i: (b_, h, i)),
    ]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, st=st),
        grid=(b, hq, tq // bq_dq),
        in_specs=specs,
        out_specs=pl.BlockSpec((None, bq_dq, None, dqk), lambda b_, h, i: (b_, i, h, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=st.interpret,
        name="sparse_attention_dq",
        **_compiler_params(st, max(dqk, dvt), bwd=True),
    )(*ops, q, k, v, do, lse, delta)

    # dK/dV: grid over (batch, kv head x split, key block, dv tile). Each program sums the dK/dV
    # of gs = group // split query heads; the reshapes below only regroup contiguous heads
    # (query head h serves kv head h // group), so they are free.
    split, gs = st.split, st.group // st.split
    hp = hkv * split
    q_g = q.reshape(b, tq, hp, gs * dqk)
    do_g = do.reshape(b, tq, hp, gs * dv_pad)
    lse_g, delta_g = lse.reshape(b, hp, gs * tq), delta.reshape(b, hp, gs * tq)

    kv_of = functools.partial(_kv_head, per_kv=split)

    def dkv_call(want_dk, want_dv):
        ops, specs = _common_specs(st, dkv_tables, dense_t, qseg, kseg)
        n_dv = st.n_dv if (want_dv and not want_dk) else 1
        specs.append(pl.BlockSpec((None, tq, None, gs * dqk), lambda b_, h, j, d: (b_, 0, h, 0)))
        specs.append(pl.BlockSpec((None, bk, None, dqk), lambda b_, h, j, d: (b_, j, kv_of(h), 0)))
        ops += [q_g, k]
        if want_dk:
            specs.append(
                pl.BlockSpec((None, bk, None, dv_pad), lambda b_, h, j, d: (b_, j, kv_of(h), 0))
            )
            ops.append(v)
        stats_spec = pl.BlockSpec((None, None, gs * tq), lambda b_, h, j, d: (b_, h, 0))
        specs += [pl.BlockSpec((None, tq, None, gs * dv_pad), lambda b_, h, j, d: (b_, 0, h, 0))]
        specs += [stats_spec]
        ops += [do_g, lse_g]
        out_specs, out_shape = [], []
        if want_dk:
            specs.append(stats_spec)
            ops.append(delta_g)
            out_specs.append(pl.BlockSpec((None, bk, None, dqk), lambda b_, h, j, d: (b_, j, h, 0)))
            out_shape.append(jax.ShapeDtypeStruct((b, tk, hp, dqk), k.dtype))
        if want_dv:
            dvt_out = dvt if n_dv > 1 else dv_pad
            out_specs.append(
                pl.BlockSpec((None, bk, None, dvt_out), lambda b_, h, j, d: (b_, j, h, d))
            )
            out_shape.append(jax.ShapeDtypeStruct((b, tk, hp, dv_pad), v.dtype))
        return pl.pallas_call(
            functools.partial(_dkv_kernel, st=st, want_dk=want_dk, want_dv=want_dv),
            grid=(b, hp, tk // bk, n_dv),
            in_specs=specs,
            out_specs=out_specs,
            out_shape=out_shape,
            interpret=st.interpret,
            name=f"sparse_attention_{'dk' if want_dk else ''}{'dv' if want_dv else ''}",
            **_compiler_params(st, max(dqk, dvt), bwd=True),
        )(*ops)

    if st.n_dv == 1:
        dk, dv = dkv_call(True, True)
    else:
        (dv,) = dkv_call(False, True)
        (dk,) = dkv_call(True, False)
    if split > 1:  # partial sums over query heads, per kv head
        dk = dk.astype(jnp.float32).reshape(b, tk, hkv, split, dqk).sum(3).astype(k.dtype)
        dv = dv.astype(jnp.float32).reshape(b, tk, hkv, split, dv_pad).sum(3).astype(v.dtype)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st: _Static, q, k, v, aux):
    return _forward(st, q, k, v, aux)[0]


def _flash_fwd(st, q, k, v, aux):
    o, lse = _forward(st, q, k, v, aux)
    return o, (q, k, v, aux, o, lse)


def _flash_bwd(st, res, do):
    q, k, v, aux, o, lse = res
    dq, dk, dv = _backward(st, q, k, v, aux, o, lse, do)
    return dq, dk, dv, jax.tree.map(lambda _: None, aux)


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- public wrappers


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _pow2(x: int) -> int:
    return max(16, 1 << (int(x) - 1).bit_length())


def _tables(mask, tq, tk, bq, bk, nq, nk, transpose=False):
    kinds = np.zeros((nq, nk), np.int8)
    src = mask.block_kinds(tq, tk, bq, bk)
    kinds[: src.shape[0], : src.shape[1]] = src  # padded rows / columns stay EMPTY
    t = masks_lib.block_tables(kinds, transpose=transpose)
    return jnp.asarray(t.counts), jnp.asarray(t.index)


def _split_segments(segment_ids, b, tq, tk):
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, tuple | list):
        qs, ks = segment_ids
    else:
        qs = ks = segment_ids
    qs, ks = jnp.asarray(qs, jnp.int32), jnp.asarray(ks, jnp.int32)
    if qs.shape != (b, tq) or ks.shape != (b, tk):
        raise ValueError(
            f"segment_ids must be [B, T] (or a (q [B, Tq], kv [B, Tk]) pair); got {qs.shape}, "
            f"{ks.shape} for B={b}, Tq={tq}, Tk={tk}"
        )
    return qs, ks


def check_shapes(q, k, v) -> int:
    """Validates the attention contract; returns the GQA group size Hq // Hkv."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, T, H, D]; got {q.shape}, {k.shape}, {v.shape}")
    if q.shape[0] != k.shape[0] or k.shape[:3] != v.shape[:3] or q.shape[3] != k.shape[3]:
        raise ValueError(f"incompatible q {q.shape}, k {k.shape}, v {v.shape}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} not a multiple of kv heads {k.shape[2]}")
    return q.shape[2] // k.shape[2]


# The dK/dV kernel's GQA split (`BlockSizes.gqa_split=None`) keeps at least this many programs:
# about four per SM of an H100 (132 SMs). Not tuned by measurement yet.
MIN_DKV_PROGRAMS = 512


def dkv_gqa_split(blocks: BlockSizes, group: int, programs_per_split: int) -> int:
    """dK/dV programs per kv head: `blocks.gqa_split`, or (None) the smallest divisor of
    `group` with `programs_per_split * split >= MIN_DKV_PROGRAMS`."""
    if blocks.gqa_split is not None:
        if blocks.gqa_split < 1 or group % blocks.gqa_split:
            raise KernelUnsupportedError(
                f"gqa_split={blocks.gqa_split} must divide the GQA group size {group}"
            )
        return blocks.gqa_split
    divisors = [s for s in range(1, group + 1) if group % s == 0]
    return next((s for s in divisors if programs_per_split * s >= MIN_DKV_PROGRAMS), group)


def block_sparse_flash(q, k, v, mask, *, scale, segment_ids, impl, block_sizes=None):
    """The Pallas path behind `sparse_attention` and `chunked_attention` (padding + custom_vjp);
    `impl` is "pallas", "interpret" or "interpret_tpu". The TPU kernel is in `kernels.tpu`."""
    group = check_shapes(q, k, v)
    b, tq, _, dqk = q.shape
    tk, dv = k.shape[1], v.shape[-1]
    family, interpret = kernel_family(impl)
    if family == "tpu":
        from menagerie.kernels.tpu import splash_flash

        seg = _split_segments(segment_ids, b, tq, tk)
        return splash_flash(
            q,
            k,
            v,
            mask,
            scale=scale,
            group=group,
            interpret=interpret,
            segment_ids=None if seg[0] is None else seg,
        )
    bs = block_sizes or BlockSizes.default(dqk, dv)
    # Short sequences: shrink tiles so padding stays under 2x.
    cap_q, cap_k = _pow2(tq), _pow2(tk)
    q_dq, k_dq = bs.dq_tiles
    bs = dataclasses.replace(
        bs,
        q=min(bs.q, cap_q),
        q_bwd=min(bs.q_bwd, cap_q),
        q_dq=min(q_dq, cap_q),
        k=min(bs.k, cap_k),
        k_bwd=min(bs.k_bwd, cap_k),
        k_dq=min(k_dq, cap_k),
    )
    for name in ("q", "k", "q_bwd", "k_bwd", "q_dq", "k_dq", "dv", "dv_bwd"):
        n = getattr(bs, name) if name != "dv_bwd" else (bs.dv_bwd or bs.dv)
        if n < 16 or n & (n - 1):
            raise KernelUnsupportedError(f"block size {name}={n} must be a power of two >= 16")
    # Powers of two: the largest tile of each axis is a multiple of the others.
    tq_p = _round_up(tq, max(bs.q, bs.q_bwd, bs.q_dq))
    tk_p = _round_up(tk, max(bs.k, bs.k_bwd, bs.k_dq))
    dqk_p, dv_p = _pow2(dqk), _pow2(dv)
    dv_tile, dv_tile_bwd = min(dv_p, bs.dv), min(dv_p, bs.dv_bwd or bs.dv)
    qseg, kseg = _split_segments(segment_ids, b, tq, tk)

    dense = dense_t = None
    kernel_mask = mask
    if not mask.computable:
        kernel_mask = None
        dense_np = np.zeros((tq_p, tk_p), np.int8)
        dense_np[:tq, :tk] = mask.dense(tq, tk)
        dense, dense_t = jnp.asarray(dense_np), jnp.asarray(np.ascontiguousarray(dense_np.T))
    fwd_t = _tables(mask, tq, tk, bs.q, bs.k, tq_p // bs.q, tk_p // bs.k)
    dq_t = _tables(mask, tq, tk, bs.q_dq, bs.k_dq, tq_p // bs.q_dq, tk_p // bs.k_dq)
    dkv_t = _tables(mask, tq, tk, bs.q_bwd, bs.k_bwd, tq_p // bs.q_bwd, tk_p // bs.k_bwd, True)
    if qseg is not None:
        qseg = jnp.pad(qseg, ((0, 0), (0, tq_p - tq)), constant_values=-1)
        kseg = jnp.pad(kseg, ((0, 0), (0, tk_p - tk)), constant_values=-2)

    st = _Static(
        scale=float(1.0 / math.sqrt(dqk) if scale is None else scale),
        mask=kernel_mask,
        tk=tk,
        blocks=bs,
        group=group,
        split=dkv_gqa_split(bs, group, b * k.shape[2] * (tk_p // bs.k_bwd)),
        dv_tile=dv_tile,
        n_dv=dv_p // dv_tile,
        dv_tile_bwd=dv_tile_bwd,
        n_dv_bwd=dv_p // dv_tile_bwd,
        has_seg=qseg is not None,
        interpret=interpret,
        f32=q.dtype == jnp.float32,
    )
    qp = jnp.pad(q, ((0, 0), (0, tq_p - tq), (0, 0), (0, dqk_p - dqk)))
    kp = jnp.pad(k, ((0, 0), (0, tk_p - tk), (0, 0), (0, dqk_p - dqk)))
    vp = jnp.pad(v, ((0, 0), (0, tk_p - tk), (0, 0), (0, dv_p - dv)))
    aux = (fwd_t, dq_t, dkv_t, dense, dense_t, qseg, kseg)
    return _flash(st, qp, kp, vp, aux)[:, :tq, :, :dv]


def attention_reference(q, k, v, keep, *, scale=None):
    """Masked softmax attention in float32 (pure jnp), GQA by grouping query heads.

    keep: bool, broadcastable to [B, 1, 1, Tq, Tk]. Rows with nothing visible give zeros.
    """
    group = check_shapes(q, k, v)
    b, tq, hq, dqk = q.shape
    hkv = k.shape[2]
    scale = 1.0 / math.sqrt(dqk) if scale is None else scale
    q_g = q.astype(jnp.float32).reshape(b, tq, hkv, group, dqk)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", q_g, k.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    s = jnp.where(keep, s * scale, MASK_VALUE)
    p = jnp.where(keep, jax.nn.softmax(s, axis=-1), 0.0)
    o = jnp.einsum("bhgqk,bkhd->bqhgd", p, v.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    return o.reshape(b, tq, hq, v.shape[-1]).astype(q.dtype)


def sparse_attention_reference(q, k, v, *, mask, scale=None, segment_ids=None):
    """Dense masked softmax with `mask.dense(Tq, Tk)`; same contract as `sparse_attention`."""
    b, tq = q.shape[:2]
    tk = k.shape[1]
    keep = jnp.asarray(mask.dense(tq, tk))[None, None, None]
    qs, ks = _split_segments(segment_ids, b, tq, tk)
    if qs is not None:
        keep = keep & (qs[:, None, None, :, None] == ks[:, None, None, None, :])
    return attention_reference(q, k, v, keep, scale=scale)


def sparse_attention(
    q, k, v, *, mask: masks_lib.Mask, scale=None, segment_ids=None, impl="auto", block_sizes=None
):
    """Block-sparse attention. Empty tiles of `mask` are skipped, partial tiles masked.

    Args:
      q: [B, Tq, Hq, Dqk]; k: [B, Tk, Hkv, Dqk]; v: [B, Tk, Hkv, Dv] (bf16, f16 or f32).
      mask: a `kernels.masks.Mask` (e.g. `masks.Causal() & masks.LocalWindow(128, 0)`).
      scale: multiplies q k^T; default 1 / sqrt(Dqk).
      segment_ids: int [B, T] (Tq == Tk), or a pair (q [B, Tq], kv [B, Tk]): tokens attend only
        within their segment (packed documents).
      impl: "auto" | "pallas" | "interpret" | "interpret_tpu" | "reference" (see
        `kernels.dispatch`).
      block_sizes: optional `BlockSizes` for the GPU Pallas kernel.
    Returns:
      [B, Tq, Hq, Dv] in q's dtype; rows with no visible key are zeros.
    """
    impl = resolve_impl(impl)
    if not isinstance(mask, masks_lib.Mask):
        raise TypeError(f"mask must be a kernels.masks.Mask, got {type(mask).__name__}")
    if impl == "reference":
        check_shapes(q, k, v)
        return sparse_attention_reference(q, k, v, mask=mask, scale=scale, segment_ids=segment_ids)
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
