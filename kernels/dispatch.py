"""The one dispatcher: which implementation of a kernel op runs.

`impl` is one of:
- "auto": "pallas" on GPU, "reference" elsewhere (CPU; and TPU, whose kernel has been run only
  in the interpreter so far).
- "pallas": the Pallas kernel compiled for the default device: on GPU our kernel (Triton
  lowering), on TPU JAX's splash attention (Mosaic TPU; see `kernels.tpu`).
- "interpret": our GPU kernel's body run by the Pallas interpreter (any device; CPU CI).
- "interpret_tpu": the TPU kernel (splash attention) run by the Pallas interpreter.
- "reference": the pure-jnp twin that defines what the op computes.
"""

from __future__ import annotations

import jax

IMPLS = ("auto", "pallas", "interpret", "interpret_tpu", "reference")


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
            "the interpreter), impl='interpret_tpu' (the TPU kernel) or impl='reference'"
        )
    return impl


def kernel_family(impl: str) -> tuple[str, bool]:
    """("gpu" | "tpu", interpret?) for a resolved Pallas impl: which kernel runs, and how."""
    if impl == "interpret_tpu":
        return "tpu", True
    if impl == "interpret":
        return "gpu", True
    return ("tpu" if platform() == "tpu" else "gpu"), False
