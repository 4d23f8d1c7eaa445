"""chunked_attention: the Pallas kernel (interpreted on CPU) and the xla path (blocked queries)
against the per-chunk reference, and the reference against naive per-chunk softmax attention."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_testing import IMPL, assert_matches, random_qkv, ref_jit
from menagerie.kernels import (
    BlockSizes,
    chunked_attention,
    chunked_attention_reference,
    chunked_attention_xla,
    masks,
    sparse_attention_reference,
)

SMALL = BlockSizes(q=16, k=16, q_bwd=16, k_bwd=16, dv=32)


def naive_chunked(q, k, v, chunk, causal, scale):
    """Loop over chunks, batches and heads in float64 numpy."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, hq, _ = q.shape
    group = hq // k.shape[2]
    out = np.zeros((b, t, hq, v.shape[-1]))
    for start in range(0, t, chunk):
        sl = slice(start, min(start + chunk, t))
        n = sl.stop - sl.start
        for bi in range(b):
            for h in range(hq):
                s = scale * q[bi, sl, h] @ k[bi, sl, h // group].T
                if causal:
                    s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
                p = np.exp(s - s.max(1, keepdims=True))
                out[bi, sl, h] = (p / p.sum(1, keepdims=True)) @ v[bi, sl, h // group]
    return out


@pytest.mark.parametrize("t,chunk,causal", [(50, 16, True), (50, 7, False), (24, 64, True)])
def test_reference_matches_naive(t, chunk, causal):
    q, k, v = random_qkv(0, 2, t, t, 4, 2, 8, 12)
    ref = functools.partial(chunked_attention_reference, chunk_size=chunk, causal=causal)
    got = ref_jit(lambda q, k, v: ref(q, k, v, scale=0.5))(q, k, v)
    want = naive_chunked(q, k, v, chunk, causal, 0.5)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)
    # The two references (per-chunk and dense-mask) agree as well.
    dense_ref = functools.partial(sparse_attention_reference, mask=masks.Chunked(chunk, causal))
    dense = ref_jit(lambda q, k, v: dense_ref(q, k, v, scale=0.5))(q, k, v)
    np.testing.assert_allclose(np.asarray(dense), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "b,t,hq,hkv,dqk,dv,chunk,causal,dtype",
    [
        (2, 64, 2, 2, 16, 16, 32, True, jnp.float32),  # chunk a multiple of the tile
        (1, 70, 4, 2, 16, 40, 24, True, jnp.float32),  # ragged T, chunk not a tile multiple, GQA
        (1, 45, 2, 1, 32, 64, 20, False, jnp.float32),  # non-causal chunks, dv != dqk
        (1, 37, 2, 2, 16, 16, 100, True, jnp.float32),  # one chunk longer than T
        (1, 80, 2, 1, 32, 96, 32, True, jnp.bfloat16),  # bf16, Megalodon-like dv > dqk
    ],
)
def test_kernel_matches_reference(b, t, hq, hkv, dqk, dv, chunk, causal, dtype, impl):
    q, k, v = random_qkv(1, b, t, t, hq, hkv, dqk, dv, dtype)
    kw = dict(chunk_size=chunk, causal=causal)
    fn = functools.partial(chunked_attention, impl=impl, block_sizes=SMALL, **kw)
    ref = functools.partial(chunked_attention, impl="reference", **kw)
    o = assert_matches(fn, ref, q, k, v)
    assert o.shape == (b, t, hq, dv) and o.dtype == dtype


@pytest.mark.parametrize(
    "b,t,hq,hkv,dqk,dv,chunk,causal,q_block",
    [
        (1, 70, 4, 2, 16, 40, 24, True, 8),  # ragged T (padded last chunk), 3 uneven blocks, GQA
        (2, 64, 2, 1, 8, 24, 64, True, 16),  # one chunk, 4 query blocks
        (1, 45, 2, 1, 32, 64, 20, False, 8),  # non-causal: one block seeing the whole chunk
    ],
)
def test_xla_path_matches_reference(b, t, hq, hkv, dqk, dv, chunk, causal, q_block):
    """What "auto" runs off GPU: values and gradients. Catches a block that scores too few keys
    or too many, padding a short last chunk visible, v's width taken from q's."""
    q, k, v = random_qkv(5, b, t, t, hq, hkv, dqk, dv)
    seg = jnp.asarray([[0] * 10 + [1] * 30 + [2] * (t - 40)] * b, jnp.int32)
    for kw in (dict(scale=0.7), dict(segment_ids=seg)):
        kw |= dict(chunk_size=chunk, causal=causal)
        # small query blocks, so that these short chunks are cut into several
        fn = functools.partial(chunked_attention_xla, q_block=q_block, **kw)
        assert_matches(fn, functools.partial(chunked_attention, impl="reference", **kw), q, k, v)


def test_segment_ids(impl):
    q, k, v = random_qkv(2, 2, 56, 56, 2, 2, 16, 16)
    seg = jnp.asarray([[0] * 10 + [1] * 30 + [2] * 16, [5] * 56], jnp.int32)
    kw = dict(chunk_size=24, segment_ids=seg)
    fn = functools.partial(chunked_attention, impl=impl, block_sizes=SMALL, **kw)
    assert_matches(fn, functools.partial(chunked_attention, impl="reference", **kw), q, k, v)


def test_default_tiles(impl):
    q, k, v = random_qkv(3, 1, 160, 160, 2, 2, 64, 64, jnp.bfloat16)
    fn = functools.partial(chunked_attention, chunk_size=128, impl=impl)
    ref = functools.partial(chunked_attention, chunk_size=128, impl="reference")
    assert_matches(fn, ref, q, k, v)


@settings(max_examples=4, deadline=None, derandomize=True)
@given(
    t=st.integers(1, 72),
    chunk=st.integers(1, 40),
    causal=st.booleans(),
    group=st.integers(1, 2),
    dqk=st.sampled_from([8, 16, 24]),
    dv=st.sampled_from([8, 16, 40]),
)
def test_property_random_shapes(t, chunk, causal, group, dqk, dv):
    q, k, v = random_qkv(t * chunk, 1, t, t, 2 * group, 2, dqk, dv)
    kw = dict(chunk_size=chunk, causal=causal)
    fn = functools.partial(chunked_attention, impl=IMPL, block_sizes=SMALL, **kw)
    assert_matches(fn, functools.partial(chunked_attention, impl="reference", **kw), q, k, v)


def test_rejects_cross_attention():
    q, k, v = random_qkv(4, 1, 16, 24, 1, 1, 8, 8)
    with pytest.raises(ValueError, match="Tq == Tk"):
        chunked_attention(q, k, v, chunk_size=8, impl="reference")
