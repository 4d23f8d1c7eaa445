"""`kernels.blocked_attention` with a causal offset (query t sees keys s <= t - offset): offset 1
is the strictly causal retrieval of Memory Mosaics' contextual memory off GPU, offset g + 1 its
long-term memory with gap g. Forward and gradients against the plain definition."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_testing import jit, ref_jit
from menagerie.kernels.blocked_attention import blocked_attention


def _definition(q, k, v, segment_ids, offset, scale):
    """Per head with kv repeated: softmax over s <= t - offset in the same segment; a row
    that sees nothing is zero."""
    b, t, h, d = q.shape
    g = h // k.shape[2]
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    s = scale * jnp.einsum("bthd,bshd->bhts", q, k)
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :]) & np.tril(
        np.ones((t, t), bool), -offset
    )
    s = jnp.where(mask[:, None], s, -jnp.inf)
    p = jnp.where(mask[:, None], jax.nn.softmax(s, axis=-1), 0.0)
    p = jnp.where(mask.any(-1)[:, None, :, None], p, 0.0)
    return jnp.einsum("bhts,bshd->bthd", p, v)


@pytest.mark.parametrize("offset", [0, 1, 7])
@pytest.mark.parametrize("q_block", [256, 5, 2])  # one block; uneven blocks; blocks seeing nothing
def test_offset_attention_equals_the_definition(offset, q_block):
    """Outputs and gradients (GQA 4 query heads on 2 kv heads, two segments in one row, E != D,
    scale 1) within 1e-5, rows t < offset zero and every gradient finite. Catches: the keys a
    block sees not shortened by the offset (a query reads its own pair), the row mask shifted
    the wrong way, an empty row given uniform weights (the mask value everywhere) or NaN
    gradients, a block that sees nothing computed on an empty key slice."""
    rng = np.random.default_rng(offset * 10 + q_block)
    b, t, d, e = 2, 12, 8, 6
    q, ct = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in [(b, t, 4, d), (b, t, 4, e)])
    k = jnp.asarray(rng.standard_normal((b, t, 2, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, t, 2, e)), jnp.float32)
    seg = jnp.array([[1] * 5 + [2] * 7, [1] * 12], jnp.int32)

    def fast(q, k, v):
        return blocked_attention(q, k, v, seg, offset=offset, scale=1.0, q_block=q_block)

    def slow(q, k, v):
        return _definition(q, k, v, seg, offset, 1.0)

    with jax.default_matmul_precision("highest"):
        out = jit(fast)(q, k, v)
        np.testing.assert_allclose(out, ref_jit(slow)(q, k, v), atol=1e-5)
        assert not np.asarray(out[:, :offset]).any()
        got = jit(jax.grad(lambda *a: jnp.sum(fast(*a) * ct), argnums=(0, 1, 2)))(q, k, v)
        want = ref_jit(jax.grad(lambda *a: jnp.sum(slow(*a) * ct), argnums=(0, 1, 2)))(q, k, v)
    for g, w in zip(got, want, strict=True):
        assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_allclose(g, w, atol=1e-5)
