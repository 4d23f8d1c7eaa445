"""Helpers shared by the kernel tests (a unique module name, imported by the test files)."""

import os

import jax
import jax.numpy as jnp
import numpy as np

# "interpret" on CPU; bench/gpu_check.sh sets "pallas" to run the same tests compiled on a GPU.
IMPL = os.environ.get("MENAGERIE_KERNEL_IMPL", "interpret")

# References use HIGHEST explicitly; this also keeps XLA's own f32 matmuls off TF32 on GPU.
jax.config.update("jax_default_matmul_precision", "highest")


def normal(rng: np.random.Generator, shape, dtype=jnp.float32) -> jax.Array:
    """Standard normal float32 values drawn on the host, as a `dtype` array. Not jax.random:
    XLA:CPU compiles its draw anew for every shape, 1-2 s each, which was most of these tests'
    time."""
    return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)


def random_qkv(seed, b, tq, tk, hq, hkv, dqk, dv, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = normal(rng, (b, tq, hq, dqk), dtype)
    k = normal(rng, (b, tk, hkv, dqk), dtype)
    v = normal(rng, (b, tk, hkv, dv), dtype)
    return q, k, v


def tolerances(dtype):
    """(forward, gradient) tolerance, relative to the reference's largest magnitude."""
    return (2e-5, 1e-4) if dtype == jnp.float32 else (2e-2, 4e-2)


# The interpreted kernels are big XLA CPU programs run once: skip LLVM's expensive passes
# (halves compile time; per jit call, so nothing else in the process is affected).
FAST_COMPILE = (
    {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    if jax.default_backend() == "cpu"
    else None
)


def jit(fn):
    return jax.jit(fn, compiler_options=FAST_COMPILE)


def ref_jit(fn):
    """jit for the jnp references on CPU only: on GPU, eager op-by-op reuses compiled ops across
    tests, while a jitted reference pays XLA's GPU autotuning in every test."""
    return jit(fn) if FAST_COMPILE is not None else fn


def assert_matches(fn, ref_fn, q, k, v, *, seed=0):
    """fn and ref_fn agree on the output and on (dq, dk, dv) for a random cotangent."""
    fwd_tol, grad_tol = tolerances(q.dtype)

    def run(f):
        def go(q, k, v, do):
            o, vjp = jax.vjp(f, q, k, v)
            return o, vjp(do.astype(o.dtype))

        return jit(go)

    do = normal(np.random.default_rng(seed + 7), (*q.shape[:3], v.shape[-1]))
    o_ref, vjp_ref = ref_jit(lambda q, k, v: jax.vjp(ref_fn, q, k, v))(q, k, v)
    grads_ref = vjp_ref(do.astype(o_ref.dtype))
    o, grads = run(fn)(q, k, v, do)
    _close("out", o, o_ref, fwd_tol)
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref, strict=True):
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
