"""Compiling the tiny programs of tests: most run once or twice, and XLA's backend
optimisations took longer than running them (half of some files' time)."""

from __future__ import annotations

import functools

import jax

LESS_OPTIMISED = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

quick_jit = functools.partial(jax.jit, compiler_options=LESS_OPTIMISED)
"""`jax.jit` compiled with LESS_OPTIMISED (same arguments, same numbers up to rounding)."""
