"""The sampler (`train.generate.sample`) on models with incremental decoding."""

from __future__ import annotations

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from menagerie.arch import MegalodonConfig, TransformerConfig, build
from menagerie.export.run import load_run
from menagerie.train import generate
from menagerie.train.cli import main

from ..cli_testing import MEGALODON_TINY_MODEL
from ..export.export_testing import saved_run
from ..random_params import random_module

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
    assert compiled.count("jit(_step)") == 1, compiled
    if name == "megalodon":
        assert got.tolist() == expected and compiled.count("jit(_prefill)") == 1, compiled
    else:
        assert len(got) == 14 and got.tolist()[:7] == expected[:7]
        assert compiled.count("jit(_prefill)") == 2, compiled


def test_top_k_and_top_p_sample_only_from_the_kept_tokens():
    """With probabilities 0.4, 0.3, 0.2, 0.1 (shuffled over the vocabulary): top_k=3 draws
    only the three likeliest and each of them; top_p=0.5 draws only the two whose preceding
    mass is below 0.5; top_k=1 is the argmax. Catches: top-k keeping k+1 or k-1 tokens, the
    nucleus cut one token late or early (or never keeping the first), sampled positions in
    the sorted order returned instead of token ids."""
    logits = jnp.log(jnp.asarray([0.1, 0.3, 0.4, 0.2]))  # likeliest: 2, 1, 3, 0

    def draws(**kw):
        picks = jax.vmap(generate.Sampling(1.0, **kw), in_axes=(None, 0))
        return set(np.asarray(picks(logits, jax.random.split(jax.random.key(0), 300))).tolist())

    assert draws(top_k=3) == {2, 1, 3}
    assert draws(top_p=0.5) == {2, 1}
    assert draws(top_k=1) == {2}


def test_generate_cli_streams_the_text_of_the_python_api(tmp_path, capsys):
    """`menagerie generate` on a Megalodon run (random weights saved as its checkpoint 0)
    prints the prompt and then exactly the text `generate(load_run(run), ...)` returns with
    the same options, and a tokens/s line on stderr; bad options and a folder without a run
    give one `error:` line and exit 2. Catches: a CLI option not passed on (seed, top-k,
    temperature), text lost or repeated while streaming, the stderr count wrong."""
    random = lambda c: random_module(lambda: build(c, rngs=nnx.Rngs(0)), 4)  # noqa: E731
    run = saved_run(tmp_path, MEGALODON_TINY_MODEL, 32, random)
    capsys.readouterr()
    options = dict(max_new_tokens=24, temperature=0.7, top_k=20, seed=3)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    assert main(["generate", str(run), "--prompt", "def f", *flags]) == 0
    printed = capsys.readouterr()
    expected = generate.generate(load_run(run), "def f", **options)
    assert printed.out == "def f" + expected + "\n"
    assert re.search(r"\[\d+ tokens from step 0, [\d.]+ tokens/s", printed.err), printed.err
    assert main(["generate", str(run), "--prompt", "x", "--top-p", "0"]) == 2
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all(e.startswith("error: ") for e in errors), errors
    assert "top-p" in errors[0] and "holds no run" in errors[1]
