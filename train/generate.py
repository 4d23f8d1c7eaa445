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

import dataclasses
import functools
import time
from collections.abc import Callable, Iterator
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
    top_k: int = 0,
    top_p: float = 1.0,
) -> np.ndarray:
    """Returns the generated ids (without the prompt), int32 [n <= max_new_tokens]. `window`
    bounds the context (see the module docstring)."""
    ids = stream(
        graphdef,
        params,
        prompt_ids,
        max_new_tokens=max_new_tokens,
        window=window,
        temperature=temperature,
        seed=seed,
        stop_id=stop_id,
        top_k=top_k,
        top_p=top_p,
    )
    return np.asarray(list(ids), np.int32)


def stream(
    graphdef: nnx.GraphDef,
    params: Any,
    prompt_ids: np.ndarray,
    *,
    max_new_tokens: int,
    window: int,
    temperature: float = 0.8,
    seed: int = 0,
    stop_id: int | None = None,
    top_k: int = 0,
    top_p: float = 1.0,
) -> Iterator[int]:
    """`sample`, one token id at a time as each is decoded (stops before `stop_id`)."""
    prompt_ids = np.asarray(prompt_ids, np.int32)
    if window < 2:
        raise ValueError(f"the sampling window must hold at least 2 tokens, got {window}")
    if not len(prompt_ids):
        raise ValueError("the sample prompt encodes to no tokens: set train.sample_prompt")
    sampling, keys = Sampling(temperature, top_k, top_p), _keys(seed)
    model = nnx.merge(graphdef, params)
    graphdef, params = prepared(model)
    if getattr(model, "decodes", False):
        window = window if model.state_grows else None
        tokens = _decoded(graphdef, params, prompt_ids, sampling, keys, max_new_tokens, window)
    else:
        tokens = _windowed(graphdef, params, prompt_ids, sampling, keys, max_new_tokens, window)
    for tok in tokens:
        if stop_id is not None and tok == stop_id:
            return
        yield tok


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is picked from logits [V]: argmax at temperature <= 0, else a
    categorical sample at that temperature from the `top_k` most likely tokens (0: all) whose
    cumulative probability first reaches `top_p` (nucleus sampling; 1: all). Hashable: a
    static argument of the compiled step."""

    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(
                f"top_k must be >= 0 and top_p in (0, 1], got {self.top_k} and {self.top_p}"
            )

    def __call__(self, logits_V: jax.Array, key: jax.Array) -> jax.Array:
        if self.temperature <= 0:
            return jnp.argmax(logits_V).astype(jnp.int32)
        logits_V = logits_V.astype(jnp.float32) / self.temperature
        if self.top_k == 0 and self.top_p >= 1:
            return jax.random.categorical(key, logits_V).astype(jnp.int32)
        order = jnp.argsort(-logits_V)
        ranked = logits_V[order]
        keep = jnp.arange(ranked.shape[0]) < (self.top_k or ranked.shape[0])
        probs = jax.nn.softmax(jnp.where(keep, ranked, -jnp.inf))
        keep &= jnp.cumsum(probs) - probs < self.top_p  # the first token always stays
        pick = jax.random.categorical(key, jnp.where(keep, ranked, -jnp.inf))
        return order[pick].astype(jnp.int32)


def prepared(model: nnx.Module) -> tuple[nnx.GraphDef, Any]:
    """(graphdef, state) of `model` after each of its modules' `prepare_inference()`: the
    derived weight layouts its inference kernels read (LTE's neuron-major FFN matrices), made
    once per generation instead of once per token. Changes `model` in place: pass a copy."""
    for _, module in nnx.iter_modules(model):
        if hasattr(module, "prepare_inference"):
            module.prepare_inference()
    return nnx.split(model)


def _keys(seed: int) -> Iterator[jax.Array]:
    """One sampling key per token: split off a chain started at `seed`."""
    key = jax.random.key(seed)
    while True:
        key, sub = jax.random.split(key)
        yield sub


# Compiled once per model structure (and sampling options), reused by every later call.
@functools.partial(jax.jit, static_argnums=0)
def _prefill(graphdef, params, tokens_1T, state):
    logits, state = nnx.merge(graphdef, params).decode(tokens_1T, state)
    return logits[0, -1], state


@functools.partial(jax.jit, static_argnums=(0, 1))
def _step(graphdef, sampling: Sampling, params, token, state, key):
    logits, state = nnx.merge(graphdef, params).decode(token.reshape(1, 1), state)
    return sampling(logits[0, -1], key), state


def _decoded(graphdef, params, prompt_ids, sampling, keys, max_new_tokens: int, window):
    """Yields new tokens: the prompt prefilled in pieces, then one jitted step per token; with
    a `window`, a full cache is refilled from the last window // 2 tokens (at least 2)."""

    def prefilled(ids):
        state = nnx.merge(graphdef, params).init_state(1, window)
        for start in range(0, len(ids), PREFILL_PIECE):
            piece = jnp.asarray(ids[None, start : start + PREFILL_PIECE])
            logits, state = _prefill(graphdef, params, piece, state)
        return logits, state

    seen = list(prompt_ids[-(window - 1) :] if window else prompt_ids)
    logits, state = prefilled(np.asarray(seen, np.int32))
    token = sampling(logits, next(keys))
    for i in range(max_new_tokens):
        yield int(token)
        seen.append(int(token))
        if i + 1 == max_new_tokens:
            break
        if window and len(seen) > window:  # the cache is full: start a fresh one
            del seen[: len(seen) - max(2, window // 2)]
            logits, state = prefilled(np.asarray(seen[:-1], np.int32))
        token, state = _step(graphdef, sampling, params, token, state, next(keys))


def _windowed(graphdef, params, prompt_ids, sampling, keys, max_new_tokens: int, window: int):
    """Yields new tokens, each from the whole last `window` tokens recomputed."""
    prompt_ids = prompt_ids[-(window - 1) :]
    buf = np.zeros((1, window), np.int32)
    buf[0, : len(prompt_ids)] = prompt_ids
    length = len(prompt_ids)

    @jax.jit
    def next_token(params, tokens_1T, length, key):
        logits_1TV = nnx.merge(graphdef, params)(tokens_1T).logits
        logits_V = jax.lax.dynamic_index_in_dim(logits_1TV[0], length - 1, axis=0, keepdims=False)
        return sampling(logits_V, key)

    for _ in range(max_new_tokens):
        tok = int(next_token(params, buf, length, next(keys)))
        yield tok
        if length == window:  # slide the window left by one
            buf[0, :-1] = buf[0, 1:]
            length -= 1
        buf[0, length] = tok
        length += 1


def generate(
    run,
    prompt: str,
    *,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    window: int | None = None,
    on_text: Callable[[str], Any] | None = None,
    times: list[float] | None = None,
) -> str:
    """The text a trained run writes after `prompt` (without the prompt). `run`: a
    `menagerie.export.load_run` result or a run folder. `window` (default: the run's
    `train.seq_len`) bounds the context of models whose state grows with it. `on_text` gets
    each piece of text as soon as it is decoded (whole characters only), for streaming;
    `times` gets the `time.perf_counter()` at which each token arrived."""
    if not hasattr(run, "model"):
        from menagerie.export.run import load_run

        run = load_run(run)
    graphdef, params = nnx.split(run.model)
    tokenizer = run.tokenizer
    ids = stream(
        graphdef,
        params,
        tokenizer.encode(prompt),
        max_new_tokens=max_new_tokens,
        window=window or run.cfg.train.seq_len,
        temperature=temperature,
        seed=seed,
        stop_id=tokenizer.eos_id,
        top_k=top_k,
        top_p=top_p,
    )
    if times is not None:
        ids = _timed(ids, times)
    return _emit_text(ids, tokenizer.decode, on_text or (lambda text: None))


def _timed(ids: Iterator[int], times: list[float]) -> Iterator[int]:
    for tok in ids:
        times.append(time.perf_counter())
        yield tok


def _emit_text(ids: Iterator[int], decode: Callable, on_text: Callable[[str], Any]) -> str:
    """Decodes the growing id list, passing on each new piece of text once it no longer ends
    in a partial character (U+FFFD from an incomplete UTF-8 sequence); returns all of it."""
    seen, sent = [], ""
    for tok in ids:
        seen.append(tok)
        text = decode(seen)
        if not text.endswith("\ufffd") and len(text) > len(sent):
            on_text(text[len(sent) :])
            sent = text
    text = decode(seen)
    if len(text) > len(sent):
        on_text(text[len(sent) :])
    return text
