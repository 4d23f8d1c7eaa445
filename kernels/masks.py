"""Block-sparse attention masks for `sparse_attention`.

A mask says which key position `k` a query position `q` may attend to. Positions are absolute
(0-based) and a mask is defined for any sequence lengths `(tq, tk)`. Each mask gives:

- `mask(q_pos, k_pos)`: the element-wise rule on broadcastable int arrays (numpy at trace time,
  jnp inside the Pallas kernel), for masks that are `computable`. A `NumpyMask` is not: the
  kernel reads its tiles from the dense array instead.
- `dense(tq, tk)`: the boolean numpy array [tq, tk] (the reference uses it).
- `block_kinds(tq, tk, bq, bk)`: int8 [cdiv(tq, bq), cdiv(tk, bk)], per tile EMPTY (0), PARTIAL
  (1, masked per element) or FULL (2, no masking), the same labels as splash attention's
  `MaskInfo.block_mask`. Keys `k >= tk` (padding) count as masked; padded query rows `q >= tq`
  do not count (their outputs are discarded).
- `block_tables(...)`: the compact index tables the kernel loops over, so empty tiles cost
  nothing. All of this is numpy, computed once per shape at trace time and cached.

Masks combine with `&` (`And`) and `|` (`Or`). Block kinds of a combination are derived from
the parts, conservatively: a tile may be labelled PARTIAL where it is in fact FULL or EMPTY,
which costs time, never correctness.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib

import numpy as np
from jax import lax

EMPTY, PARTIAL, FULL = 0, 1, 2


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _div(a, b: int):
    """Floor division of non-negative ints, numpy or jnp (lax.div lowers on Triton; // may not)."""
    return a // b if isinstance(a, np.ndarray | np.integer | int) else lax.div(a, np.int32(b))


def _rem(a, b: int):
    """Remainder; only compared with 0 here, so C and floor semantics agree."""
    return (
        np.remainder(a, b)
        if isinstance(a, np.ndarray | np.integer | int)
        else lax.rem(a, np.int32(b))
    )


class Mask:
    """Base class. Subclasses define `__call__` (and `_interval` if the mask is an interval)."""

    computable = True

    def __call__(self, q_pos, k_pos):
        raise NotImplementedError

    def __and__(self, other: Mask) -> Mask:
        return And(self, other)

    def __or__(self, other: Mask) -> Mask:
        return Or(self, other)

    def dense(self, tq: int, tk: int) -> np.ndarray:
        """bool [tq, tk]: True where query q may attend to key k."""
        q = np.arange(tq, dtype=np.int64)[:, None]
        k = np.arange(tk, dtype=np.int64)[None, :]
        return np.broadcast_to(self(q, k), (tq, tk)).copy()

    def block_kinds(self, tq: int, tk: int, bq: int, bk: int) -> np.ndarray:
        """int8 [cdiv(tq, bq), cdiv(tk, bk)] of EMPTY / PARTIAL / FULL."""
        return _block_kinds_cached(self, tq, tk, bq, bk)

    def _block_kinds(self, tq: int, tk: int, bq: int, bk: int) -> np.ndarray:
        # Generic and exact: evaluate one row of query blocks at a time (bq * tk elements).
        nq, nk = _cdiv(tq, bq), _cdiv(tk, bk)
        k_valid = np.arange(nk * bk) < tk
        out = np.empty((nq, nk), np.int8)
        dense = None if self.computable else self.dense(tq, tk)
        for i in range(nq):
            rows = np.arange(i * bq, min((i + 1) * bq, tq))
            if dense is None:
                m = np.broadcast_to(
                    self(rows[:, None], np.arange(nk * bk)[None, :]), (len(rows), nk * bk)
                )
            else:
                m = np.zeros((len(rows), nk * bk), bool)
                m[:, :tk] = dense[rows]
            m = (m & k_valid[None, :]).reshape(len(rows), nk, bk)
            out[i] = np.where(m.all((0, 2)), FULL, np.where(m.any((0, 2)), PARTIAL, EMPTY))
        return out


@functools.lru_cache(maxsize=256)
def _block_kinds_cached(mask: Mask, tq: int, tk: int, bq: int, bk: int) -> np.ndarray:
    out = mask._block_kinds(tq, tk, bq, bk)
    out.setflags(write=False)
    return out


class _IntervalMask(Mask):
    """A mask whose row q is one interval lo(q) <= k <= hi(q): block kinds in O(tq * nk)."""

    def _interval(self, q: np.ndarray, tk: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def __call__(self, q_pos, k_pos):
        raise NotImplementedError

    def _block_kinds(self, tq, tk, bq, bk):
        nq, nk = _cdiv(tq, bq), _cdiv(tk, bk)
        q = np.arange(nq * bq, dtype=np.int64)
        lo, hi = self._interval(q, tk)
        lo = np.maximum(np.broadcast_to(lo, q.shape), 0)
        hi = np.minimum(np.broadcast_to(hi, q.shape), tk - 1)
        valid = q < tq  # padded query rows are "don't care"
        k0 = (np.arange(nk) * bk)[None, None, :]
        k1 = k0 + bk - 1
        lo_r, hi_r = lo.reshape(nq, bq, 1), hi.reshape(nq, bq, 1)
        v = valid.reshape(nq, bq, 1)
        row_full = (lo_r <= k0) & (hi_r >= k1)
        row_any = np.maximum(lo_r, k0) <= np.minimum(hi_r, k1)
        full = np.all(row_full | ~v, axis=1)
        anyv = np.any(row_any & v, axis=1)
        return np.where(full, FULL, np.where(anyv, PARTIAL, EMPTY)).astype(np.int8)


@dataclasses.dataclass(frozen=True)
class Full(_IntervalMask):
    """Every query sees every key."""

    def _interval(self, q, tk):
        return np.zeros_like(q), np.full_like(q, tk - 1)

    def __call__(self, q_pos, k_pos):
        return (q_pos >= 0) & (k_pos >= 0)


@dataclasses.dataclass(frozen=True)
class Causal(_IntervalMask):
    """k <= q + offset."""

    offset: int = 0

    def _interval(self, q, tk):
        return np.zeros_like(q), q + self.offset

    def __call__(self, q_pos, k_pos):
        return k_pos <= q_pos + self.offset


@dataclasses.dataclass(frozen=True)
class StrictlyCausal(_IntervalMask):
    """k < q: a query may not see itself (Memory Mosaics' predictive memories). Row 0 is empty."""

    def _interval(self, q, tk):
        return np.zeros_like(q), q - 1

    def __call__(self, q_pos, k_pos):
        return k_pos < q_pos


@dataclasses.dataclass(frozen=True)
class LocalWindow(_IntervalMask):
    """q - left <= k <= q + right; None means unbounded on that side. (left, 0) is causal local."""

    left: int | None
    right: int | None = 0

    def _interval(self, q, tk):
        lo = np.zeros_like(q) if self.left is None else q - self.left
        hi = np.full_like(q, tk - 1) if self.right is None else q + self.right
        return lo, hi

    def __call__(self, q_pos, k_pos):
        out = (q_pos >= 0) & (k_pos >= 0)
        if self.left is not None:
            out = out & (k_pos >= q_pos - self.left)
        if self.right is not None:
            out = out & (k_pos <= q_pos + self.right)
        return out


@dataclasses.dataclass(frozen=True)
class Sinks(_IntervalMask):
    """The first `sinks` keys, causally: k < sinks and k <= q."""

    sinks: int

    def _interval(self, q, tk):
        return np.zeros_like(q), np.minimum(q, self.sinks - 1)

    def __call__(self, q_pos, k_pos):
        return (k_pos < self.sinks) & (k_pos <= q_pos)


def SinksAndWindow(sinks: int, window: int) -> Mask:  # noqa: N802 (reads as a mask class)
    """StreamingLLM: the first `sinks` keys plus the last `window` keys (q itself included)."""
    return Sinks(sinks) | LocalWindow(window - 1, 0)


@dataclasses.dataclass(frozen=True)
class Chunked(_IntervalMask):
    """Block-diagonal: q and k in the same chunk of `chunk_size`; causal inside it by default."""

    chunk_size: int
    causal: bool = True

    def _interval(self, q, tk):
        lo = (q // self.chunk_size) * self.chunk_size
        return lo, (q if self.causal else lo + self.chunk_size - 1)

    def __call__(self, q_pos, k_pos):
        out = _div(q_pos, self.chunk_size) == _div(k_pos, self.chunk_size)
        return out & (k_pos <= q_pos) if self.causal else out


ChunkedCausal = Chunked


@dataclasses.dataclass(frozen=True)
class Strided(Mask):
    """Sparse Transformer's strided head: k <= q and (q - k) % stride == 0."""

    stride: int

    def __call__(self, q_pos, k_pos):
        return (k_pos <= q_pos) & (_rem(q_pos - k_pos, self.stride) == 0)


@dataclasses.dataclass(frozen=True)
class Dilated(Mask):
    """Causal dilated window: q - k = j * dilation for j in [0, window)."""

    window: int
    dilation: int

    def __call__(self, q_pos, k_pos):
        d = q_pos - k_pos
        return (d >= 0) & (d < self.window * self.dilation) & (_rem(d, self.dilation) == 0)


class NumpyMask(Mask):
    """Any boolean numpy array [tq, tk]; the kernel reads its tiles from HBM as int8."""

    computable = False

    def __init__(self, array):
        self.array = np.asarray(array, dtype=bool)
        if self.array.ndim != 2:
            raise ValueError(f"NumpyMask needs a 2-D [tq, tk] array, got {self.array.shape}")
        self.array.setflags(write=False)
        self._key = (self.array.shape, hashlib.sha1(np.packbits(self.array).tobytes()).digest())

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, NumpyMask) and self._key == other._key

    def __repr__(self):
        return f"NumpyMask(shape={self.array.shape}, density={self.array.mean():.3f})"

    def dense(self, tq, tk):
        if (tq, tk) != self.array.shape:
            raise ValueError(f"NumpyMask has shape {self.array.shape}, attention is {(tq, tk)}")
        return self.array


@dataclasses.dataclass(frozen=True)
class And(Mask):
    a: Mask
    b: Mask

    @property
    def computable(self):
        return self.a.computable and self.b.computable

    def __call__(self, q_pos, k_pos):
        return self.a(q_pos, k_pos) & self.b(q_pos, k_pos)

    def dense(self, tq, tk):
        return self.a.dense(tq, tk) & self.b.dense(tq, tk)

    def _block_kinds(self, tq, tk, bq, bk):
        ka, kb = self.a.block_kinds(tq, tk, bq, bk), self.b.block_kinds(tq, tk, bq, bk)
        return np.where((ka == EMPTY) | (kb == EMPTY), EMPTY, np.minimum(ka, kb)).astype(np.int8)


@dataclasses.dataclass(frozen=True)
class Or(Mask):
    a: Mask
    b: Mask

    @property
    def computable(self):
        return self.a.computable and self.b.computable

    def __call__(self, q_pos, k_pos):
        return self.a(q_pos, k_pos) | self.b(q_pos, k_pos)

    def dense(self, tq, tk):
        return self.a.dense(tq, tk) | self.b.dense(tq, tk)

    def _block_kinds(self, tq, tk, bq, bk):
        ka, kb = self.a.block_kinds(tq, tk, bq, bk), self.b.block_kinds(tq, tk, bq, bk)
        return np.maximum(ka, kb).astype(np.int8)


@dataclasses.dataclass(frozen=True)
class BlockTables:
    """Compact per-row tile lists for the kernel's loops (numpy int32).

    For row r (a query block in the forward / dQ pass, a key block in the dK/dV pass):
    `index[r, :counts[r, 0]]` are the FULL tiles, `index[r, counts[r, 0]:counts[r, 1]]` the
    PARTIAL ones; the rest is padding. `density` is the fraction of non-empty tiles.
    """

    index: np.ndarray  # int32 [rows, max(1, widest row)]
    counts: np.ndarray  # int32 [rows, 2]
    density: float


def block_tables(kinds: np.ndarray, *, transpose: bool = False) -> BlockTables:
    """Tables over the rows of `kinds` [nq, nk] (or of its transpose, for the dK/dV pass)."""
    kinds = kinds.T if transpose else kinds
    rows = kinds.shape[0]
    # Stable sort puts FULL (2) before PARTIAL (1) before EMPTY (0) in each row.
    order = np.argsort(-kinds.astype(np.int32), axis=1, kind="stable").astype(np.int32)
    n_full = (kinds == FULL).sum(1)
    n_any = (kinds != EMPTY).sum(1)
    width = max(1, int(n_any.max()) if rows else 1)
    index = np.ascontiguousarray(order[:, :width])
    index = np.where(np.arange(width)[None, :] < n_any[:, None], index, 0).astype(np.int32)
    counts = np.stack([n_full, n_any], axis=1).astype(np.int32)
    return BlockTables(index, counts, float((kinds != EMPTY).mean()) if kinds.size else 0.0)
