"""The TPU path (splash attention, `kernels.tpu`) in the Pallas TPU interpreter against the jnp
reference: every mask type, ragged lengths (padding), GQA, dv != dqk, segment ids, empty rows."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_testing import assert_matches, random_qkv
from menagerie.kernels import (
    KernelUnsupportedError,
    chunked_attention,
    masks,
    sparse_attention,
)
from menagerie.kernels import tpu as tpu_route

TPU = "interpret_tpu"
RNG = np.random.default_rng(0)
MASKS = {
    "causal": masks.Causal(),
    "strictly_causal": masks.StrictlyCausal(),  # row 0 has no key
    "local": masks.LocalWindow(9, 4),
    "sinks_window": masks.SinksAndWindow(3, 12),
    "chunked": masks.Chunked(20),
    "chunked_bidirectional": masks.Chunked(24, causal=False),
    "strided": masks.Strided(5),
    "dilated": masks.Dilated(4, 3),
    "union": masks.LocalWindow(6, 0) | masks.Strided(7),
    "numpy_with_empty_rows": masks.NumpyMask(RNG.random((70, 70)) < 0.05),
}


@pytest.mark.parametrize("name", list(MASKS))
def test_every_mask_ragged_gqa_dv(name):
    # 70 is no multiple of 128 (padding and the extra key), GQA 4:2, Dv != Dqk.
    q, k, v = random_qkv(1, 2, 70, 70, 4, 2, 16, 40)
    fn = functools.partial(sparse_attention, mask=MASKS[name], impl=TPU)
    ref = functools.partial(sparse_attention, mask=MASKS[name], impl="reference")
    assert_matches(fn, ref, q, k, v)


@pytest.mark.parametrize(
    "mask",
    [masks.Causal(), masks.Chunked(64), masks.LocalWindow(40, 0) | masks.Chunked(128, True)],
    ids=repr,
)
def test_native_splash_masks(mask):
    # 256 = 2 x 128: no padding and no empty row, so the mask is passed as a splash mask.
    plan = tpu_route._plan(mask, 256, 256, False)
    assert type(plan[0]).__name__ != "NumpyMask" and not plan[3]
    q, k, v = random_qkv(2, 1, 256, 256, 2, 2, 32, 32, jnp.bfloat16)
    fn = functools.partial(sparse_attention, mask=mask, impl=TPU)
    ref = functools.partial(sparse_attention, mask=mask, impl="reference")
    assert_matches(fn, ref, q, k, v)


def test_segment_ids_and_their_limit():
    q, k, v = random_qkv(3, 2, 100, 100, 2, 1, 16, 24)
    seg = jnp.asarray([[0] * 30 + [1] * 50 + [2] * 20, [4] * 100], jnp.int32)
    kw = dict(mask=masks.Causal(), segment_ids=seg)
    fn = functools.partial(sparse_attention, impl=TPU, **kw)
    assert_matches(fn, functools.partial(sparse_attention, impl="reference", **kw), q, k, v)
    with pytest.raises(KernelUnsupportedError, match="impl='reference'"):
        sparse_attention(q, k, v, mask=masks.StrictlyCausal(), segment_ids=seg, impl=TPU)


def test_chunked_attention_megalodon_like():
    q, k, v = random_qkv(4, 1, 200, 200, 2, 2, 32, 160)
    kw = dict(chunk_size=64)
    fn = functools.partial(chunked_attention, impl=TPU, **kw)
    assert_matches(fn, functools.partial(chunked_attention, impl="reference", **kw), q, k, v)


def test_empty_rows_are_zero_with_finite_gradients():
    q, k, v = random_qkv(5, 1, 40, 40, 1, 1, 8, 8)
    mask = masks.StrictlyCausal() & masks.LocalWindow(None, 0)

    def loss(q, k, v):
        return jnp.sum(sparse_attention(q, k, v, mask=mask, impl=TPU) ** 2)

    o = sparse_attention(q, k, v, mask=mask, impl=TPU)
    assert np.all(np.asarray(o[:, 0]) == 0)
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    assert np.all(np.asarray(grads[0][:, 0]) == 0)
