"""Incremental decoding of the transformer family (Megalodon's is in test_megalodon.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from menagerie.arch import TransformerConfig, build

from tests.jit_testing import quick_jit

CONFIGS = {
    "scanned-tied-gqa": dict(scan_layers=True, tie_embeddings=True, n_kv_heads=2),
    "looped-untied-mha": dict(scan_layers=False, tie_embeddings=False, n_kv_heads=None),
    "window-sinks": dict(scan_layers=True, tie_embeddings=True, n_kv_heads=2, window=6, sinks=2),
    # LTE over SwiGLU routing hard at inference (the gather path): position-wise, so decoding
    # must route each new token as the full forward routes it
    # A planner whose plan conditions the LM (blocks of 4: the pieces below cross block ends
    # inside a piece and at its edges); a head with its own decoding state
    "planner": dict(
        scan_layers=False,
        tie_embeddings=False,
        n_kv_heads=2,
        head=dict(kind="planner", block=4, n_heads=2, hidden_dim=24, planner_layers=2),
    ),
    # A planner with a writer (arch.plan_writer): the block it writes at a block's end steers
    # the LM from that token on; with and without the plan's own conditioning
    "planner-writer": dict(
        scan_layers=False,
        tie_embeddings=True,
        n_kv_heads=2,
        head=dict(
            kind="planner",
            block=4,
            n_heads=2,
            hidden_dim=24,
            writer_layers=2,
            writer_taps=2,
            condition_gate=False,  # the ungated plan (W_c alone)
        ),
    ),
    "planner-writer-only": dict(
        scan_layers=True,
        tie_embeddings=False,
        n_kv_heads=2,
        head=dict(
            kind="planner",
            block=3,
            n_heads=2,
            hidden_dim=24,
            condition_lm=False,
            writer_layers=1,
            writer_taps=2,  # on the keys and values, from 0.5 (at zero they would do nothing)
            writer_taps_on="keys_values",
            writer_tap_init=0.5,
        ),
    ),
    # An MTP head: at inference the LM head alone (its extra modules read ctx.targets)
    "mtp-sequential": dict(
        scan_layers=True, tie_embeddings=True, n_kv_heads=2, head=dict(kind="mtp_sequential")
    ),
    "lte-hard": dict(
        scan_layers=True,
        tie_embeddings=True,
        n_kv_heads=2,
        ffn=dict(
            kind="lte",
            inner=dict(kind="swiglu", hidden_dim=32),
            expert_size=4,
            hard_from_step=1,
            impl="gather",
        ),
    ),
}


def _model(scan_layers: bool, tie_embeddings: bool, n_kv_heads, ffn=None, head=None, **window):
    """A 2-layer model with every parameter N(0, 0.5), so a misplaced cache entry shows."""
    cfg = TransformerConfig(
        d_model=16,
        n_layers=2,
        vocab_size=50,
        vocab_multiple=1,
        scan_layers=scan_layers,
        tie_embeddings=tie_embeddings,
        mixer=dict(kind="attention", n_heads=4, n_kv_heads=n_kv_heads, **window),
        **({} if ffn is None else {"ffn": ffn}),
        **({} if head is None else {"head": head}),
    )
    graphdef, shapes = nnx.split(nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(1)
    fill = lambda a: jnp.asarray(0.5 * rng.standard_normal(a.shape), a.dtype)  # noqa: E731
    return nnx.merge(graphdef, jax.tree.map(fill, shapes))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_decoding_with_the_kv_cache_gives_the_full_forward_logits(name):
    """`init_state(batch, max_len)`, then `decode` of prompt pieces (3, then 9 tokens) and
    single tokens, gives the full forward pass's float32 logits at all 20 positions (1e-5
    relative), scanned and looped layers, GQA and MHA, tied and untied. Catches: keys or
    values written at the wrong cache slot, RoPE at the position in the piece instead of in
    the sequence, a query seeing empty slots ahead of it (or not seeing its own piece), a
    layer reading another layer's cache, the position not advanced between calls; with a
    window of 6 and 2 sinks, a decode step that sees the whole cache (or drops the sinks); with
    a conditioning planner, a token given its own block's plan (or none), the block sum not
    reset at a block's end, the planner's block caches written at the wrong block."""
    model = _model(**CONFIGS[name])
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 50, (2, 20)), jnp.int32)
    full = np.asarray(quick_jit(lambda m, t: m(t).logits)(model, tokens))
    decode = quick_jit(lambda m, t, s: m.decode(t, s))
    state, got, start = model.init_state(2, 24), [], 0
    for size in [3, 9] + [1] * 8:
        logits, state = decode(model, tokens[:, start : start + size], state)
        got.append(np.asarray(logits))
        start += size
    got = np.concatenate(got, axis=1)
    err = np.abs(got - full).max()
    assert err <= 1e-5 * (1 + np.abs(full).max()), f"max |error| {err:.3g}"
    assert int(state.position) == 20
