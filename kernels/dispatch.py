"""The one dispatcher: which implementation of a kernel op runs.

`impl` is one of:
- "auto": "pallas" on GPU, "reference" elsewhere (CPU, and TPU until the TPU kernel is tested).
- "pallas": the Pallas kernel compiled for the default device (GPU: Triton lowering).
- "interpret": the same Pallas kernel body run by the Pallas interpreter (any device; CPU CI).
- "reference": the pure-jnp twin that defines what the op computes.
"""

from __future__ import annotations

import jax

IMPLS = ("auto", "pallas", "interpret", "reference")


class KernelUnsupportedError(ValueError):
    """An impl / device / argument combination the kernels do not support; names an alternative."""


def platform() -> str:
    """'gpu', 'tpu' or 'cpu': the platform of the default device."""
    p = jax.default_backend()
    return "gpu" if p in ("gpu", "cuda", "rocm") else p


def resolve_impl(impl: str) -> str:
    """Maps `impl` to one of "pallas", "interpret", "reference", or raises a clear error."""
    if impl not in IMPLS:
        raise KernelUnsupportedError(f"impl={impl!r} is not one of {IMPLS}")
    plat = platform()
    if impl == "auto":
        return "pallas" if plat == "gpu" else "reference"
    if impl == "pallas" and plat == "cpu":
        raise KernelUnsupportedError(
            "impl='pallas' needs a GPU or TPU; on CPU use impl='interpret' (the Pallas kernel in "
            "the interpreter) or impl='reference'"
        )
    if impl == "pallas" and plat == "tpu":
        raise KernelUnsupportedError(
            "impl='pallas' is not implemented for TPU yet (the kernel is written for the Triton "
            "lowering); use impl='reference', or for sparse masks JAX's splash attention "
            "(jax.experimental.pallas.ops.tpu.splash_attention)"
        )
    return impl
