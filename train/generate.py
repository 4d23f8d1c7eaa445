"""Sampling from a trained model: the sample printed at the end of a run.

Two paths, chosen by the model:
- A model with incremental decoding (`decodes`, `init_state(batch, max_len)` and
  `decode(tokens, state) -> (logits, state)`: the transformer family with the attention mixer,
  and Megalodon) prefills the prompt in pieces, then runs one compiled step per new token on
  its carried state; nothing is recompiled per token. A model whose state grows with the
  context (`state_grows`: the attention KV cache) keeps at most `window` tokens: when the cache
  is full, the last half window is prefilled again into a fresh one. Megalodon's state is the
  same size at any length, so its context is the whole sequence.
- Any other model recomputes the whole window for each new token (one compiled program, a
  fixed-size buffer).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

PREFILL_PIECE = 256  # prompt tokens per prefill call: at most two compiled prefill shapes


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
    """Returns the generated ids (without the prompt), int32 [n <= max_new_tokens]. `window`
    bounds the context of models without incremental decoding."""
    prompt_ids = np.asarray(prompt_ids, np.int32)
    if window < 2:
        raise ValueError(f"the sampling window must hold at least 2 tokens, got {window}")
    if not len(prompt_ids):
        raise ValueError("the sample prompt encodes to no tokens: set train.sample_prompt")
    picks = _Picker(temperature, seed)
    model = nnx.merge(graphdef, params)
    if getattr(model, "decodes", False):
        window = window if model.state_grows else None
        tokens = _decoded(graphdef, params, prompt_ids, picks, max_new_tokens, window)
    else:
        tokens = _windowed(graphdef, params, prompt_ids, picks, max_new_tokens, window)
    out = []
    for tok in tokens:
        if stop_id is not None and tok == stop_id:
            break
        out.append(tok)
    return np.asarray(out, np.int32)


class _Picker:
    """The next token from logits [V]: argmax at temperature <= 0, else a categorical sample
    with a key split off per token."""

    def __init__(self, temperature: float, seed: int):
        self.temperature, self.key = temperature, jax.random.key(seed)

    def next_key(self) -> jax.Array:
        self.key, sub = jax.random.split(self.key)
        return sub

    def __call__(self, logits_V: jax.Array, key: jax.Array) -> jax.Array:
        if self.temperature <= 0:
            return jnp.argmax(logits_V).astype(jnp.int32)
        return jax.random.categorical(key, logits_V / self.temperature).astype(jnp.int32)


def _decoded(graphdef, params, prompt_ids, pick: _Picker, max_new_tokens: int, window):
    """Yields new tokens: the prompt prefilled in pieces, then one jitted step per token; with
    a `window`, a full cache is refilled from the last window // 2 tokens (at least 2)."""

    @jax.jit
    def prefill(params, tokens_1T, state):
        logits, state = nnx.merge(graphdef, params).decode(tokens_1T, state)
        return logits[0, -1], state

    @jax.jit
    def step(params, token, state, key):
        logits, state = nnx.merge(graphdef, params).decode(token.reshape(1, 1), state)
        return pick(logits[0, -1], key), state

    def prefilled(ids):
        state = nnx.merge(graphdef, params).init_state(1, window)
        for start in range(0, len(ids), PREFILL_PIECE):
            piece = jnp.asarray(ids[None, start : start + PREFILL_PIECE])
            logits, state = prefill(params, piece, state)
        return logits, state

    seen = list(prompt_ids[-(window - 1) :] if window else prompt_ids)
    logits, state = prefilled(np.asarray(seen, np.int32))
    token = pick(logits, pick.next_key())
    for i in range(max_new_tokens):
        yield int(token)
        seen.append(int(token))
        if i + 1 == max_new_tokens:
            break
        if window and len(seen) > window:  # the cache is full: start a fresh one
            del seen[: len(seen) - max(2, window // 2)]
            logits, state = prefilled(np.asarray(seen[:-1], np.int32))
        token, state = step(params, token, state, pick.next_key())


def _windowed(graphdef, params, prompt_ids, pick: _Picker, max_new_tokens: int, window: int):
    """Yields new tokens, each from the whole last `window` tokens recomputed."""
    prompt_ids = prompt_ids[-(window - 1) :]
    buf = np.zeros((1, window), np.int32)
    buf[0, : len(prompt_ids)] = prompt_ids
    length = len(prompt_ids)

    @jax.jit
    def next_token(params, tokens_1T, length, key):
        logits_1TV = nnx.merge(graphdef, params)(tokens_1T).logits
        return pick(jax.lax.dynamic_index_in_dim(logits_1TV[0], length - 1, False), key)

    for _ in range(max_new_tokens):
        tok = int(next_token(params, buf, length, pick.next_key()))
        yield tok
        if length == window:  # slide the window left by one
            buf[0, :-1] = buf[0, 1:]
            length -= 1
        buf[0, length] = tok
        length += 1
