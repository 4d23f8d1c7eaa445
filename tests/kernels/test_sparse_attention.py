"""sparse_attention: the Pallas kernel (interpreted on CPU) against the jnp reference, and the
reference against a naive numpy softmax(QK^T)V."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_testing import IMPL, assert_matches, jit, random_qkv, ref_jit
from menagerie.kernels import (
    BlockSizes,
    KernelUnsupportedError,
    masks,
    platform,
    sparse_attention,
    sparse_attention_reference,
)
from menagerie.kernels.sparse_attention import MIN_DKV_PROGRAMS, dkv_gqa_split

SMALL = BlockSizes(q=16, k=16, q_bwd=16, k_bwd=16, dv=32)  # many tiles on tiny shapes
# The dQ kernel's tiles differ from the dK/dV kernel's, and so do the dv tiles.
SPLIT = BlockSizes(q=16, k=16, q_bwd=16, k_bwd=32, dv=16, q_dq=32, k_dq=16, dv_bwd=32)


def naive_attention(q, k, v, keep_BTT, scale):
    """softmax(scale * q k^T) v per batch and head in float64 numpy; masked rows give 0."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, tq, hq, _ = q.shape
    group = hq // k.shape[2]
    out = np.zeros((b, tq, hq, v.shape[-1]))
    for bi in range(b):
        for h in range(hq):
            s = scale * q[bi, :, h] @ k[bi, :, h // group].T
            keep = keep_BTT[bi]
            s = np.where(keep, s, -np.inf)
            m = np.max(s, axis=1, keepdims=True)
            p = np.where(keep, np.exp(s - np.where(np.isfinite(m), m, 0)), 0.0)
            den = p.sum(1, keepdims=True)
            out[bi, :, h] = (p / np.where(den == 0, 1, den)) @ v[bi, :, h // group]
    return out


RNG = np.random.default_rng(0)
MASKS = {
    "causal": masks.Causal(),
    "strictly_causal": masks.StrictlyCausal(),
    "local": masks.LocalWindow(9, 4),
    "sinks_window": masks.SinksAndWindow(3, 12),
    "chunked": masks.ChunkedCausal(20),
    "strided": masks.Strided(5),
    "dilated": masks.Dilated(4, 3),
    "union": masks.LocalWindow(6, 0) | masks.Strided(7),
    "intersection": masks.Causal() & masks.LocalWindow(None, 0) & masks.Chunked(32, False),
    "numpy": masks.NumpyMask(RNG.random((70, 70)) < 0.15),
    "numpy_and_causal": masks.NumpyMask(RNG.random((70, 70)) < 0.5) & masks.Causal(),
}


@pytest.mark.parametrize("name", ["causal", "strictly_causal", "sinks_window", "numpy", "union"])
def test_reference_matches_naive_softmax(name):
    q, k, v = random_qkv(1, 2, 70, 70, 4, 2, 8, 12)
    seg = np.repeat(np.array([[0] * 30 + [1] * 40, [0] * 70]), 1, axis=0)
    keep = MASKS[name].dense(70, 70)[None] & (seg[:, :, None] == seg[:, None, :])
    want = naive_attention(q, k, v, keep, 0.3)
    ref = functools.partial(sparse_attention_reference, mask=MASKS[name], scale=0.3)
    got = ref_jit(lambda q, k, v: ref(q, k, v, segment_ids=seg))(q, k, v)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(MASKS))
def test_kernel_matches_reference_every_mask(name, impl):
    # Ragged length (70 is no multiple of 16), GQA 4:2, Dv != Dqk with several dv tiles.
    mask = MASKS[name]
    q, k, v = random_qkv(2, 1, 70, 70, 4, 2, 16, 40)
    fn = functools.partial(sparse_attention, mask=mask, impl=impl, block_sizes=SMALL)
    ref = functools.partial(sparse_attention, mask=mask, impl="reference")
    assert_matches(fn, ref, q, k, v)


@pytest.mark.parametrize(
    "b,tq,tk,hq,hkv,dqk,dv,dtype,blocks",
    [
        (2, 64, 64, 2, 2, 32, 32, jnp.float32, None),  # default tiles, one dv tile
        (1, 33, 33, 3, 1, 8, 8, jnp.float32, SMALL),  # MQA, tiny head dim (padded to 16)
        (1, 96, 96, 4, 4, 64, 128, jnp.bfloat16, None),  # bf16
        (1, 50, 50, 2, 1, 24, 72, jnp.bfloat16, SMALL),  # bf16, ragged, several dv tiles
        (2, 40, 90, 2, 2, 16, 16, jnp.float32, BlockSizes(q=16, k=32, q_bwd=32, k_bwd=16)),
        (1, 70, 70, 2, 1, 16, 48, jnp.float32, SPLIT),
    ],
)
def test_kernel_shapes_and_dtypes(b, tq, tk, hq, hkv, dqk, dv, dtype, blocks, impl):
    mask = masks.Causal(offset=tk - tq) if tk >= tq else masks.Causal()
    q, k, v = random_qkv(3, b, tq, tk, hq, hkv, dqk, dv, dtype)
    fn = functools.partial(sparse_attention, mask=mask, impl=impl, block_sizes=blocks)
    ref = functools.partial(sparse_attention, mask=mask, impl="reference")
    o = assert_matches(fn, ref, q, k, v)
    assert o.dtype == dtype and o.shape == (b, tq, hq, dv)


def test_segment_ids(impl):
    q, k, v = random_qkv(4, 2, 60, 60, 2, 1, 16, 24)
    seg = jnp.asarray(np.sort(RNG.integers(0, 4, (2, 60)), axis=1), jnp.int32)
    mask = masks.Causal()
    fn = functools.partial(
        sparse_attention, mask=mask, segment_ids=seg, impl=impl, block_sizes=SMALL
    )
    ref = functools.partial(sparse_attention, mask=mask, segment_ids=seg, impl="reference")
    assert_matches(fn, ref, q, k, v)


@pytest.mark.parametrize(
    "hq,split,mask,dv",
    [
        # All 3 query heads of a kv head summed in one program; a dense (numpy) mask, read
        # transposed by the dK/dV kernel; several dv tiles (separate dV and dK passes).
        (6, 1, MASKS["numpy_and_causal"], 40),
        (8, 2, masks.LocalWindow(9, 4), 16),  # 2 programs per kv head, partial sums added in XLA
    ],
)
def test_gqa_split_sums_query_heads_in_the_dkv_kernel(hq, split, mask, dv, impl):
    q, k, v = random_qkv(8, 1, 70, 70, hq, 2, 16, dv)
    seg = jnp.asarray(np.sort(RNG.integers(0, 3, (1, 70)), axis=1), jnp.int32)
    blocks = dataclasses.replace(SMALL, gqa_split=split)
    kw = dict(mask=mask, segment_ids=seg)
    fn = functools.partial(sparse_attention, **kw, impl=impl, block_sizes=blocks)
    assert_matches(fn, functools.partial(sparse_attention, **kw, impl="reference"), q, k, v)


def test_gqa_split_choice():
    # None: the smallest divisor of the group that keeps MIN_DKV_PROGRAMS programs.
    n = MIN_DKV_PROGRAMS
    assert dkv_gqa_split(BlockSizes(), 4, 2 * n) == 1
    assert dkv_gqa_split(BlockSizes(), 4, n // 2) == 2
    assert dkv_gqa_split(BlockSizes(), 6, n // 5) == 6  # 1, 2, 3 are too few
    assert dkv_gqa_split(BlockSizes(), 1, 1) == 1
    assert dkv_gqa_split(BlockSizes(gqa_split=2), 4, 2 * n) == 2
    q, k, v = random_qkv(9, 1, 16, 16, 4, 1, 8, 8)
    with pytest.raises(
        KernelUnsupportedError, match="gqa_split=3 must divide the GQA group size 4"
    ):
        sparse_attention(
            q, k, v, mask=masks.Causal(), impl="interpret", block_sizes=BlockSizes(gqa_split=3)
        )


def test_empty_rows_give_zeros_and_finite_gradients(impl):
    # Row 0 of a strictly-causal mask sees nothing; so do rows 20..39 of this numpy mask.
    dense = np.tril(np.ones((48, 48), bool), -1)
    dense[20:40] = False
    for mask in (masks.StrictlyCausal(), masks.NumpyMask(dense)):
        q, k, v = random_qkv(5, 1, 48, 48, 2, 2, 16, 16)
        fn = functools.partial(sparse_attention, mask=mask, impl=impl, block_sizes=SMALL)
        o = assert_matches(fn, functools.partial(sparse_attention_reference, mask=mask), q, k, v)
        empty = ~mask.dense(48, 48).any(1)
        assert np.all(np.asarray(o)[:, empty] == 0)
        grads = jit(jax.grad(lambda q, k, v, fn=fn: fn(q, k, v).sum(), (0, 1, 2)))(q, k, v)
        assert all(bool(jnp.isfinite(g).all()) for g in grads)
        assert np.all(np.asarray(grads[0])[:, empty] == 0)


def test_fully_empty_mask(impl):
    q, k, v = random_qkv(6, 1, 32, 32, 1, 1, 16, 16)
    mask = masks.NumpyMask(np.zeros((32, 32), bool))
    o = jit(functools.partial(sparse_attention, mask=mask, impl=impl, block_sizes=SMALL))(q, k, v)
    assert np.all(np.asarray(o) == 0)


@st.composite
def block_sparse_case(draw):
    """A random shape and a random block mask: per tile empty, full or random elements."""
    bq, bk = draw(st.sampled_from([16, 32])), draw(st.sampled_from([16, 32]))
    tq, tk = draw(st.integers(1, 80)), draw(st.integers(1, 80))
    hkv = draw(st.integers(1, 2))
    group = draw(st.integers(1, 2))
    dqk, dv = draw(st.sampled_from([8, 16, 32])), draw(st.sampled_from([8, 16, 48]))
    split = draw(st.sampled_from([None, 1]))  # None: one program per query head here
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    tiles = rng.integers(0, 3, (-(-tq // bq), -(-tk // bk)))
    dense = np.kron(tiles, np.ones((bq, bk), int))[:tq, :tk]
    dense = (dense == 2) | ((dense == 1) & (rng.random((tq, tk)) < 0.5))
    return (bq, bk, tq, tk, hkv, group, dqk, dv, split, seed, dense)


@settings(max_examples=5, deadline=None, derandomize=True)
@given(block_sparse_case())
def test_property_random_block_masks(case):
    bq, bk, tq, tk, hkv, group, dqk, dv, split, seed, dense = case
    q, k, v = random_qkv(seed, 1, tq, tk, hkv * group, hkv, dqk, dv)
    mask = masks.NumpyMask(dense)
    blocks = BlockSizes(q=bq, k=bk, q_bwd=bk, k_bwd=bq, dv=32, gqa_split=split)
    fn = functools.partial(sparse_attention, mask=mask, impl=IMPL, block_sizes=blocks)
    assert_matches(fn, functools.partial(sparse_attention_reference, mask=mask), q, k, v)


@settings(max_examples=3, deadline=None, derandomize=True)
@given(
    t=st.integers(1, 90),
    left=st.integers(0, 40),
    right=st.integers(0, 20),
    sinks=st.integers(0, 8),
)
def test_property_window_masks(t, left, right, sinks):
    mask = masks.LocalWindow(left, right) | masks.Sinks(sinks)
    q, k, v = random_qkv(t, 1, t, t, 2, 1, 16, 16)
    fn = functools.partial(sparse_attention, mask=mask, impl=IMPL, block_sizes=SMALL)
    assert_matches(fn, functools.partial(sparse_attention_reference, mask=mask), q, k, v)


def test_auto_and_errors():
    q, k, v = random_qkv(7, 1, 16, 16, 1, 1, 8, 8)
    o = sparse_attention(q, k, v, mask=masks.Causal())  # auto: runs on any machine
    assert o.shape == (1, 16, 1, 8)
    with pytest.raises(KernelUnsupportedError, match="impl="):
        sparse_attention(q, k, v, mask=masks.Causal(), impl="triton")
    if platform() == "cpu":
        with pytest.raises(KernelUnsupportedError, match="impl='interpret'"):
            sparse_attention(q, k, v, mask=masks.Causal(), impl="pallas")
    with pytest.raises(TypeError, match="Mask"):
        sparse_attention(q, k, v, mask=np.ones((16, 16), bool), impl="reference")
    with pytest.raises(ValueError, match="heads"):
        sparse_attention(q, k[:, :, [0, 0]], v[:, :, [0, 0]], mask=masks.Causal(), impl="reference")
