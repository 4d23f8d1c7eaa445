"""Sampling from a trained model, for the sample printed at the end of a run.

This recomputes the whole window for each new token (one compiled program, a fixed-size buffer):
simple and exact for the short samples the trainer prints. Cached decoding (KV cache and the
other recurrent states) is still to be written, with the export work.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def sample(
    graphdef: nnx.GraphDef,
    params: Any,
    prompt_ids: np.ndarray,
    *,
    max_new_tokens: int,
    window: int,
    temperature: float = 0.8,
    seed: int = 0,
    stop_id: int | None = None,
) -> np.ndarray:
    """Returns the generated ids (without the prompt), int32 [n <= max_new_tokens]."""
    prompt_ids = np.asarray(prompt_ids, np.int32)[-(window - 1) :]
    buf = np.zeros((1, window), np.int32)
    buf[0, : len(prompt_ids)] = prompt_ids
    length = len(prompt_ids)

    @jax.jit
    def next_token(params, tokens_1T, length, key):
        model = nnx.merge(graphdef, params)
        logits_1TV = model(tokens_1T).logits
        logits_V = jax.lax.dynamic_index_in_dim(logits_1TV[0], length - 1, keepdims=False)
        if temperature <= 0:
            return jnp.argmax(logits_V).astype(jnp.int32)
        return jax.random.categorical(key, logits_V / temperature).astype(jnp.int32)

    key = jax.random.key(seed)
    out = []
    for _ in range(max_new_tokens):
        key, sub = jax.random.split(key)
        tok = int(next_token(params, buf, length, sub))
        if stop_id is not None and tok == stop_id:
            break
        out.append(tok)
        if length == window:  # slide the window left by one
            buf[0, :-1] = buf[0, 1:]
            length -= 1
        buf[0, length] = tok
        length += 1
    return np.asarray(out, np.int32)
