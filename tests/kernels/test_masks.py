"""Masks: element rules, block classification (exact, or conservative for combinations), and the
index tables the kernel loops over."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from menagerie.kernels import masks

T = 37
Q, K = np.arange(T)[:, None], np.arange(T)[None, :]
EXPECTED = {
    masks.Full(): np.ones((T, T), bool),
    masks.Causal(): K <= Q,
    masks.Causal(offset=3): K <= Q + 3,
    masks.StrictlyCausal(): K < Q,
    masks.LocalWindow(5, 2): (K >= Q - 5) & (K <= Q + 2),
    masks.LocalWindow(None, 0): K <= Q,
    masks.LocalWindow(4, None): K >= Q - 4,
    masks.Sinks(3): (K < 3) & (K <= Q),
    masks.SinksAndWindow(2, 6): (K <= Q) & ((K < 2) | (Q - K < 6)),
    masks.Chunked(8): (Q // 8 == K // 8) & (K <= Q),
    masks.Chunked(8, causal=False): Q // 8 == K // 8,
    masks.Strided(4): (K <= Q) & ((Q - K) % 4 == 0),
    masks.Dilated(3, 2): (Q - K >= 0) & (Q - K < 6) & ((Q - K) % 2 == 0),
}


@pytest.mark.parametrize("mask", list(EXPECTED), ids=repr)
def test_dense_matches_definition(mask):
    np.testing.assert_array_equal(mask.dense(T, T), EXPECTED[mask])


@pytest.mark.parametrize("mask", list(EXPECTED), ids=repr)
def test_jnp_rule_matches_numpy(mask):
    # The kernel evaluates the same rule on int32 jnp iotas.
    got = mask(jnp.arange(T, dtype=jnp.int32)[:, None], jnp.arange(T, dtype=jnp.int32)[None, :])
    np.testing.assert_array_equal(np.broadcast_to(np.asarray(got), (T, T)), EXPECTED[mask])


def brute_kinds(dense, bq, bk):
    tq, tk = dense.shape
    nq, nk = -(-tq // bq), -(-tk // bk)
    out = np.zeros((nq, nk), np.int8)
    for i in range(nq):
        for j in range(nk):
            tile = np.zeros((bq, bk), bool)
            sub = dense[i * bq : (i + 1) * bq, j * bk : (j + 1) * bk]
            tile[: sub.shape[0], : sub.shape[1]] = sub
            tile = tile[: sub.shape[0]]  # padded query rows do not count
            out[i, j] = masks.FULL if tile.all() else masks.PARTIAL if tile.any() else masks.EMPTY
    return out


# Unions (SinksAndWindow) are conservative, checked in test_combinations_are_sound.
@pytest.mark.parametrize("mask", [m for m in EXPECTED if not isinstance(m, masks.Or)], ids=repr)
@pytest.mark.parametrize("tq,tk,bq,bk", [(37, 37, 8, 8), (37, 50, 16, 4), (64, 20, 32, 16)])
def test_block_kinds_exact(mask, tq, tk, bq, bk):
    np.testing.assert_array_equal(
        mask.block_kinds(tq, tk, bq, bk), brute_kinds(mask.dense(tq, tk), bq, bk)
    )


def check_sound(mask, tq, tk, bq, bk):
    """EMPTY tiles hold no visible pair; FULL tiles only visible pairs; nothing non-empty lost."""
    got, exact = mask.block_kinds(tq, tk, bq, bk), brute_kinds(mask.dense(tq, tk), bq, bk)
    assert np.all((got == masks.EMPTY) <= (exact == masks.EMPTY))
    assert np.all((got == masks.FULL) <= (exact == masks.FULL))
    assert np.all((exact != masks.EMPTY) <= (got != masks.EMPTY))


@st.composite
def random_mask(draw, depth=0):
    leaf = st.one_of(
        st.builds(masks.Causal, st.integers(-3, 3)),
        st.builds(masks.LocalWindow, st.integers(0, 12), st.integers(0, 6)),
        st.builds(masks.Chunked, st.integers(1, 20), st.booleans()),
        st.builds(masks.Strided, st.integers(1, 6)),
        st.builds(masks.Sinks, st.integers(0, 5)),
    )
    if depth >= 2 or draw(st.booleans()):
        return draw(leaf)
    a, b = draw(random_mask(depth + 1)), draw(random_mask(depth + 1))
    return a & b if draw(st.booleans()) else a | b


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    mask=random_mask(),
    tq=st.integers(1, 60),
    tk=st.integers(1, 60),
    bq=st.sampled_from([4, 8, 16]),
    bk=st.sampled_from([4, 8, 16]),
)
def test_combinations_are_sound(mask, tq, tk, bq, bk):
    check_sound(mask, tq, tk, bq, bk)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    tq=st.integers(1, 50),
    tk=st.integers(1, 50),
    bq=st.sampled_from([4, 8]),
    bk=st.sampled_from([4, 16]),
    seed=st.integers(0, 1000),
    density=st.floats(0, 1),
)
def test_numpy_mask_kinds_exact(tq, tk, bq, bk, seed, density):
    dense = np.random.default_rng(seed).random((tq, tk)) < density
    mask = masks.NumpyMask(dense)
    np.testing.assert_array_equal(mask.block_kinds(tq, tk, bq, bk), brute_kinds(dense, bq, bk))
    check_sound(mask & masks.Causal(), tq, tk, bq, bk)
    check_sound(mask | masks.LocalWindow(3, 0), tq, tk, bq, bk)


def test_block_tables():
    kinds = np.array([[2, 0, 1, 2], [0, 0, 0, 0], [1, 1, 0, 0]], np.int8)
    t = masks.block_tables(kinds)
    np.testing.assert_array_equal(t.counts, [[2, 3], [0, 0], [0, 2]])
    np.testing.assert_array_equal(t.index[0], [0, 3, 2])  # FULL tiles first, then PARTIAL
    np.testing.assert_array_equal(t.index[2, :2], [0, 1])
    assert t.density == pytest.approx(5 / 12)
    tt = masks.block_tables(kinds, transpose=True)  # per key block, for the dK/dV pass
    np.testing.assert_array_equal(tt.counts, [[1, 2], [0, 1], [0, 1], [1, 1]])
    np.testing.assert_array_equal(tt.index[0, :2], [0, 2])


def test_numpy_mask_hashing_and_errors():
    a = np.eye(4, dtype=bool)
    assert masks.NumpyMask(a) == masks.NumpyMask(a.copy())
    assert hash(masks.NumpyMask(a)) == hash(masks.NumpyMask(a.copy()))
    assert masks.NumpyMask(a) != masks.NumpyMask(~a)
    with pytest.raises(ValueError, match="shape"):
        masks.NumpyMask(a).dense(5, 5)
    with pytest.raises(ValueError, match="2-D"):
        masks.NumpyMask(np.ones(3, bool))
    assert not (masks.NumpyMask(a) & masks.Causal()).computable
    assert (masks.Causal() | masks.Strided(2)).computable
