"""Helpers shared by the kernel tests (a unique module name, imported by the test files)."""

import os

import jax
import jax.numpy as jnp
import numpy as np

# "interpret" on CPU; bench/gpu_check.sh sets "pallas" to run the same tests compiled on a GPU.
IMPL = os.environ.get("MENAGERIE_KERNEL_IMPL", "interpret")

# References use HIGHEST explicitly; this also keeps XLA's own f32 matmuls off TF32 on GPU.
jax.config.update("jax_default_matmul_precision", "highest")


def random_qkv(seed, b, tq, tk, hq, hkv, dqk, dv, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(kq, (b, tq, hq, dqk), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (b, tk, hkv, dqk), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (b, tk, hkv, dv), jnp.float32).astype(dtype)
    return q, k, v


def tolerances(dtype):
    """(forward, gradient) tolerance, relative to the reference's largest magnitude."""
    return (2e-5, 1e-4) if dtype == jnp.float32 else (2e-2, 4e-2)


def assert_matches(fn, ref_fn, q, k, v, *, seed=0, check_grads=True):
    """fn and ref_fn agree on the output and on (dq, dk, dv) for a random cotangent."""
    fwd_tol, grad_tol = tolerances(q.dtype)
    o_ref, vjp_ref = jax.vjp(ref_fn, q, k, v)
    if not check_grads:
        o = jax.jit(fn)(q, k, v)
        _close("out", o, o_ref, fwd_tol)
        return o
    do = jax.random.normal(jax.random.PRNGKey(seed + 7), o_ref.shape, jnp.float32).astype(q.dtype)

    @jax.jit
    def run(q, k, v, do):
        o, vjp = jax.vjp(fn, q, k, v)
        return o, vjp(do)

    o, grads = run(q, k, v, do)
    _close("out", o, o_ref, fwd_tol)
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, vjp_ref(do), strict=True):
        assert g.shape == g_ref.shape and g.dtype == g_ref.dtype, name
        _close(name, g, g_ref, grad_tol)
    return o


def _close(name, x, ref, tol):
    x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
    assert x.shape == ref.shape, (name, x.shape, ref.shape)
    assert np.isfinite(x).all(), f"{name} has non-finite values"
    err = float(np.abs(x - ref).max()) if x.size else 0.0
    bound = tol * (1.0 + float(np.abs(ref).max()) if ref.size else 1.0)
    assert err <= bound, f"{name}: max abs error {err:.3g} > {bound:.3g}"
