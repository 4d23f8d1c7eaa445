"""The sampler (`train.generate.sample`) on models with incremental decoding."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from menagerie.arch import MegalodonConfig, TransformerConfig, build
from menagerie.train import generate

# Megalodon chunks of 8 tokens: a 10-token prompt and 14 new tokens cross three boundaries.
CONFIGS = {
    "megalodon": MegalodonConfig(
        d_model=16,
        n_layers=2,
        num_heads=2,
        z_dim=8,
        value_dim=12,
        ffn_hidden_dim=24,
        cema_ndim=3,
        chunk_size=8,
        norm_num_groups=4,
        vocab_size=50,
        vocab_multiple=1,
    ),
    "transformer-gqa-looped": TransformerConfig(
        d_model=16,
        n_layers=2,
        vocab_size=50,
        vocab_multiple=1,
        scan_layers=False,
        tie_embeddings=False,
        mixer=dict(kind="attention", n_heads=4, n_kv_heads=2),
    ),
}


def _random_model(cfg):
    """The model with every parameter N(0, 0.5) (nothing compiled to build it): clear
    argmax gaps."""
    graphdef, shapes = nnx.split(nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(5)
    fill = lambda a: jnp.asarray(0.5 * rng.standard_normal(a.shape), a.dtype)  # noqa: E731
    return graphdef, jax.tree.map(fill, shapes)


def _greedy_by_full_forward(graphdef, params, prompt, n: int) -> list[int]:
    """Each next token the argmax of the full forward pass over everything so far (a
    right-padded buffer: the model is causal), asserting each argmax is clear."""
    forward = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t).logits[0])
    buf = np.zeros((1, len(prompt) + n), np.int32)
    buf[0, : len(prompt)] = prompt
    for t in range(len(prompt), len(prompt) + n):
        logits = np.asarray(forward(params, jnp.asarray(buf)))[t - 1]
        top2 = np.sort(logits)[-2:]
        assert top2[1] - top2[0] > 1e-3, "a near-tie: pick another seed"
        buf[0, t] = int(np.argmax(logits))
    return buf[0, len(prompt) :].tolist()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_greedy_decoding_with_the_state_equals_the_full_forward_and_compiles_once(name, caplog):
    """Greedy sampling through the model's `decode` (prompt prefilled, then one step per
    token) gives the tokens of greedy decoding by the full forward pass, and the decode step
    is compiled once for all 14 tokens. Window 16: the transformer's KV cache fills after 7
    new tokens and is refilled from the last 8 (so only those 7 must match, and the refill
    is one more prefill shape); Megalodon's state has no window, so all 14 match. Catches:
    the sampler dropping the carried state (each step from an empty state), feeding the
    previous token twice or skipping one, the first new token not taken from the prompt's
    last logits, a step compiled per token (a position or shape that changes each call), a
    KV cache written at the wrong position, a full cache not refilled."""
    cfg = CONFIGS[name]
    graphdef, params = _random_model(cfg)
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, 10)
    expected = _greedy_by_full_forward(graphdef, params, prompt, 14)
    caplog.set_level(logging.WARNING, logger="jax._src.interpreters.pxla")
    with jax.log_compiles():
        got = generate.sample(
            graphdef, params, prompt, max_new_tokens=14, window=16, temperature=0.0
        )
    compiled = [r.getMessage().split()[1] for r in caplog.records if "Compiling" in r.getMessage()]
    assert compiled.count("jit(step)") == 1, compiled
    if name == "megalodon":
        assert got.tolist() == expected and compiled.count("jit(prefill)") == 1, compiled
    else:
        assert len(got) == 14 and got.tolist()[:7] == expected[:7]
        assert compiled.count("jit(prefill)") == 2, compiled
