"""Shared layers: RMSNorm, RoPE, attention masking and GQA, logical names, constrain."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from menagerie.arch import attention_ops, layers


def _reference_attention(q, k, v, segment_ids):
    """Per-head loop with kv repeated: the plain definition."""
    b, t, h, d = q.shape
    g = h // k.shape[2]
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    s = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d)
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :]) & np.tril(np.ones((t, t), bool))
    s = jnp.where(mask[:, None], s, -np.inf)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, axis=-1), v)


def _normal(seed: int, *shapes) -> list[jax.Array]:
    """Standard normal float32 arrays drawn on the host: a jax.random draw compiles a program
    per shape (1-2 s each on XLA:CPU), more than these tests take otherwise."""
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(shape, np.float32)) for shape in shapes]


@pytest.mark.parametrize("q_block", [256, 5])  # one block; 3 uneven causal query blocks
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_attention_matches_reference(heads, kv_heads, q_block):
    b, t, d = 2, 12, 8
    q, k, v, ct = _normal(0, (b, t, heads, d), *[(b, t, kv_heads, d)] * 2, (b, t, heads, d))
    seg = jnp.array([[1] * 5 + [2] * 7, [1] * 12], jnp.int32)
    attn = jax.jit(lambda *a: attention_ops.attention(*a[:3], segment_ids_BT=a[3], q_block=q_block))
    np.testing.assert_allclose(attn(q, k, v, seg), _reference_attention(q, k, v, seg), atol=1e-5)
    # gradients too (cotangent ct): the blocks slice k and v
    grads = jax.grad(lambda *a: jnp.sum(attn(*a, seg) * ct), argnums=(0, 1, 2))(q, k, v)
    ref = jax.grad(lambda *a: jnp.sum(_reference_attention(*a, seg) * ct), argnums=(0, 1, 2))
    for got, want in zip(grads, ref(q, k, v), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_attention_bf16_keeps_dtype():
    x = jnp.ones((1, 4, 2, 8), jnp.bfloat16)
    out = attention_ops.attention(x, x, x, segment_ids_BT=jnp.ones((1, 4), jnp.int32))
    assert out.dtype == jnp.bfloat16


@pytest.mark.gpu  # cuDNN attention: skipped off a GPU; bench/gpu_check.sh runs it
def test_cudnn_attention_matches_xla():
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    b, t, h, kvh, d = 2, 128, 4, 2, 64
    q = jax.random.normal(kq, (b, t, h, d), jnp.bfloat16)
    k = jax.random.normal(kk, (b, t, kvh, d), jnp.bfloat16)
    v = jax.random.normal(kv, (b, t, kvh, d), jnp.bfloat16)
    seg = jnp.concatenate([jnp.ones((b, 50), jnp.int32), 2 * jnp.ones((b, 78), jnp.int32)], 1)
    ref = attention_ops.attention(q, k, v, segment_ids_BT=seg, impl="xla").astype(jnp.float32)
    out = attention_ops.attention(q, k, v, segment_ids_BT=seg, impl="cudnn").astype(jnp.float32)
    np.testing.assert_allclose(out, ref, atol=3e-2)


def test_rope_is_identity_at_position_zero():
    [x] = _normal(1, (1, 1, 2, 8))
    out = jax.jit(attention_ops.apply_rope, static_argnums=2)(x, jnp.zeros((1, 1), jnp.int32), 1e4)
    np.testing.assert_allclose(out, x)


@pytest.mark.parametrize("shift", [1, 7, 100])
def test_rope_dot_product_depends_only_on_offset(shift):
    q, k = _normal(2, (1, 1, 1, 16), (1, 1, 1, 16))

    @jax.jit
    def score(m, n):
        qm = attention_ops.apply_rope(q, jnp.full((1, 1), m), 1e4)
        kn = attention_ops.apply_rope(k, jnp.full((1, 1), n), 1e4)
        return jnp.sum(qm * kn)

    np.testing.assert_allclose(score(5, 2), score(5 + shift, 2 + shift), rtol=1e-4, atol=1e-5)
    assert not np.allclose(score(5, 2), score(5, 3))


def test_rmsnorm_float32_statistics():
    """RMSNorm of bf16 activations computes its statistics in float32: its bf16 output is the
    exact (float64) normalisation correctly rounded to bf16. Statistics in bf16 round the mean
    of squares and rsqrt to 8 bits first, which moves over a third of the outputs by one bf16
    ulp: an error that any rtol loose enough for bf16 lets through, hence the bitwise check."""
    d = 256
    norm = layers.RMSNorm(
        d, eps=1e-5, param_dtype=jnp.float32, compute_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)
    )
    norm.scale[...] = jax.random.uniform(jax.random.key(4), (d,), minval=0.5, maxval=2.0)
    x = (jax.random.normal(jax.random.key(3), (4, 64, d)) * 50).astype(jnp.bfloat16)
    y = norm(x)
    assert y.dtype == jnp.bfloat16
    x64, scale64 = np.asarray(x, np.float64), np.asarray(norm.scale[...], np.float64)
    ref = x64 / np.sqrt(np.mean(np.square(x64), -1, keepdims=True) + 1e-5) * scale64
    ref_bf16 = np.asarray(jnp.asarray(ref, jnp.float32).astype(jnp.bfloat16), np.float32)
    # float32 rounding can tip a value lying within ~1e-7 of a bf16 rounding tie: allow 0.1%.
    assert np.mean(np.asarray(y, np.float32) != ref_bf16) < 1e-3


def test_linear_contracts_trailing_axes_and_names_params():
    lin = layers.Linear(
        (2, 3),
        5,
        ("heads", "head_dim", "embed"),
        std=0.02,
        param_dtype=jnp.float32,
        compute_dtype=jnp.float32,
        rngs=nnx.Rngs(0),
    )
    [x] = _normal(4, (4, 7, 2, 3))
    np.testing.assert_allclose(
        lin(x), jnp.einsum("bthd,hde->bte", x, lin.kernel[...]), rtol=1e-5, atol=1e-6
    )
    assert lin.kernel.get_metadata()["out_sharding"] == ("heads", "head_dim", "embed")


def test_embed_attend_is_transpose():
    emb = layers.Embed(
        11, 64, std=1.0, param_dtype=jnp.float32, compute_dtype=jnp.float32, rngs=nnx.Rngs(0)
    )
    x = emb(jnp.array([[3, 5]]))
    logits = emb.attend(x)
    assert logits.shape == (1, 2, 11) and logits.dtype == jnp.float32
    assert int(jnp.argmax(logits[0, 0])) == 3


def test_constrain_is_noop_without_mesh():
    x = jnp.ones((2, 3))
    assert layers.constrain(x, (layers.BATCH, layers.ACT_EMBED)) is x
