"""Memory Mosaics (issue 12) at component level: the linear-time leaky average against its
T x T definition, the whole model against the official equations (float64, with the official
quadratic matrices), gradients of the efficient path against a jnp quadratic one, causality,
exact parameter counts, the parts inside the Transformer family, and config errors.

The definitions are in `mosaics_reference.py`. Parameters are random (not the
initialisation), so every scalar, the kernel-scale clamp and both memories move the logits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import mosaics_reference as ref  # beside this file (tests/arch is on sys.path)
import numpy as np
import pydantic
import pytest
from flax import nnx
from menagerie.arch import Ctx, MosaicsConfig, TransformerConfig, build, mosaics

from tests.jit_testing import quick_jit
from tests.random_params import random_module

MIXER = {"kind": "context_memory", "n_heads": 2}
FFN = {"kind": "persistent_memory", "n_heads": 2, "size": 24, "copies": 2}
TINY = dict(d_model=16, n_layers=2, scan_layers=False, mixer=MIXER, ffn=FFN)


def tiny(**changes) -> MosaicsConfig:
    return MosaicsConfig(**(TINY | changes)).with_vocab(64)


def random_model(cfg, seed: int = 0):
    return random_module(lambda: build(cfg, rngs=nnx.Rngs(0)), seed)


def params_of(model) -> dict:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def close(actual, expected, tol, what=""):
    """Max abs error <= tol * (1 + max |expected|)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    err = np.abs(actual - expected).max()
    bound = tol * (1 + np.abs(expected).max())
    assert err <= bound, f"{what}: max |error| {err:.3g} > {bound:.3g}"


def test_leaky_average_equals_the_matrix_definition():
    """The associative scan equals the official T x T matrix (1 - e^-b) e^{-b (t-s)}, s <= t,
    per head. Catches: the (1 - e^-b) factor dropped, the decay applied one step late, heads
    given each other's rates."""
    rng = np.random.default_rng(0)
    k = rng.standard_normal((2, 37, 3, 4))
    beta = np.array([0.3, 2.0, 5.0])
    got = quick_jit(mosaics.leaky_average)(jnp.asarray(k, jnp.float32), jnp.asarray(beta))
    want = np.stack([ref.leaky_matrix(beta[h], 37) @ k[:, :, h] for h in range(3)], axis=2)
    close(got, want, 1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_logits_equal_the_official_equations(tied):
    """Our float32 logits equal the float64 official equations (quadratic leaky matrix, row-0
    zero, one-step-ahead values, squared pmem key scale, LayerNorm without bias, head / sqrt D)
    within 1e-4, at T = 13. Catches: a causal instead of strictly causal mask, values looking
    back instead of ahead, the pmem scale not squared, the clamp at 5 skipped, heads merged in
    the wrong order, the logit scale missing."""
    cfg = tiny(tie_embeddings=tied)
    model = random_model(cfg, seed=1)
    tokens = np.random.default_rng(2).integers(0, 64, (2, 13))
    with jax.default_matmul_precision("highest"):
        got = quick_jit(lambda t: model(t).logits)(jnp.asarray(tokens, jnp.int32))
    p = params_of(model)
    want = ref.logits(p, tokens, n_heads=2) if tied else _untied_logits(p, tokens)
    close(got, want, 1e-4)


def _untied_logits(p, tokens):
    table, head = ref.a64(p["embed"]["table"]), ref.a64(p["head"]["kernel"])
    x = table[tokens]
    for layer in p["blocks"].values():
        x = x + ref.context_memory(layer["mixer"], ref.layer_norm(x, layer["ln1"]["scale"]), 2)
        x = x + ref.persistent_memory(layer["ffn"], ref.layer_norm(x, layer["ln2"]["scale"]), 2)
    return ref.layer_norm(x, p["ln_out"]["scale"]) @ head / np.sqrt(table.shape[1])


def _quadratic_context_memory(module, x, gap=0):
    """The contextual memory in jnp from the equations, with T x T matrices: the averaging
    matrix A[t, s] (v1: (1 - e^-b) e^{-b (t-s)}; gated: g_s prod_{s<i<=t} lam_i), the visible
    pairs (s < t - gap, and s >= t - window), the bandwidth (v1: e^{2 min(10 kb, 5)}; adaptive:
    that n^alpha + beta0 with n the visible pairs counted from the mask), a dense softmax and
    zeros for a row that sees nothing. What `jax.grad` differentiates as the definition."""
    t = x.shape[1]
    kt = module.keys.wk(x)
    lag = jnp.arange(t)[:, None] - jnp.arange(t)[None, :]
    if module.keys.gated:
        log_lam = -jnp.abs(module.keys.decay(x))  # [B,T,H]
        c = jnp.cumsum(log_lam, axis=1)
        diff = c[:, :, None, :] - c[:, None, :, :]  # [B,t,s,H]: sum_{s<i<=t} log lam_i
        gain = jnp.exp(module.keys.gate(x))[:, None, :, :]
        a = jnp.where((lag >= 0)[None, :, :, None], jnp.exp(jnp.minimum(diff, 0)) * gain, 0.0)
        kbar = jnp.einsum("btsh,bshd->bthd", a, kt)
    else:
        beta = 10 * jnp.abs(module.keys.leaky_key_beta[...])
        decay = jnp.exp(-beta[:, None, None] * jnp.maximum(lag, 0)[None])
        a = jnp.where(lag[None] >= 0, (1 - jnp.exp(-beta))[:, None, None] * decay, 0.0)
        kbar = jnp.einsum("hts,bshd->bthd", a, kt)
    scale = mosaics._kernel_scale(module.keys.kernel_beta[...])  # [H,1]
    k = mosaics.unit(kbar)
    v = module.values(x)
    mask = lag > gap
    if module.window is not None:
        mask = mask & (lag <= module.window)
    bandwidth = jnp.square(scale)  # [H,1]: the same for every query
    if module.adaptive:
        n = jnp.maximum(mask.sum(-1), 1).astype(jnp.float32)  # [T]
        alpha, beta0 = module.bandwidth_power[...], module.bandwidth_offset[...]
        bandwidth = jnp.square(scale) * n[None, :] ** alpha[:, None] + beta0[:, None]  # [H,T]
    s = bandwidth[None, :, :, None] * jnp.einsum("bthd,bshd->bhts", k, k)
    w = jnp.where(mask, jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1), 0.0)
    w = jnp.where(mask.any(-1)[:, None], w, 0.0)
    return module.c_proj(jnp.einsum("bhts,bshd->bthd", w, v))


V2_OPTIONS = {
    "v1": {},
    "gated-keys": {"keys": "gated"},
    "adaptive-bandwidth": {"bandwidth": "adaptive"},
    "short-term-window": {"window": 3},
    "long-term-gap": {"gap": 2},
    "all-v2": {"keys": "gated", "bandwidth": "adaptive", "window": 6, "gap": 1},
}


def _memory(options, seed):
    cfg = tiny(mixer=MIXER | options)
    return random_module(lambda: cfg.mixer.build(cfg, rngs=nnx.Rngs(0)), seed=seed)


@pytest.mark.parametrize("name", sorted(V2_OPTIONS))
def test_context_memory_equals_the_quadratic_definition(name):
    """Outputs, and gradients of every parameter and of the input, through the scan and the
    masked retrieval equal the T x T definition from the equations, for v1 and each v2
    option (1e-4). Catches: a stop_gradient on the decay, the scan's combine written for the
    forward only, NaN from an empty row; the gate and the decay swapped or the decay's sign
    lost (gated); n counted with the query itself or before the window/gap (adaptive); the
    window one pair too wide or narrow, the gap off by one."""
    module = _memory(V2_OPTIONS[name], seed=3)
    graphdef, state = nnx.split(module)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 11, 16)), jnp.float32)
    ct = jnp.asarray(np.random.default_rng(5).standard_normal((2, 11, 16)), jnp.float32)
    gap = V2_OPTIONS[name].get("gap", 0)

    def loss(fn):
        return lambda s, x: jnp.vdot(fn(nnx.merge(graphdef, s), x), ct)

    fast = lambda m, x: m(x, None)[0]  # noqa: E731
    slow = lambda m, x: _quadratic_context_memory(m, x, gap)  # noqa: E731
    with jax.default_matmul_precision("highest"):
        close(quick_jit(fast)(module, x), quick_jit(slow)(module, x), 1e-5, "forward")
        got = quick_jit(jax.grad(loss(fast), argnums=(0, 1)))(state, x)
        want = quick_jit(jax.grad(loss(slow), argnums=(0, 1)))(state, x)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert np.isfinite(np.asarray(g)).all()
        close(g, w, 1e-4)


def test_training_draws_the_long_term_gap_per_step_and_evaluation_uses_gap():
    """With gap=1, gap_max=4: a training call (deterministic False) equals the definition at
    one gap in [1, 4], fixed by the step (the same step twice gives the same output); the
    steps 0..11 draw more than one gap; an evaluation call uses gap=1. Catches: the gap drawn
    outside [gap, gap_max], drawn at evaluation, or not reproducible from the step."""
    module = _memory({"gap": 1, "gap_max": 4}, seed=8)
    x = jnp.asarray(np.random.default_rng(9).standard_normal((1, 12, 16)), jnp.float32)
    tokens = jnp.zeros((1, 12), jnp.int32)

    @functools.partial(quick_jit, static_argnums=3)
    def call(m, x, step, deterministic):
        return m(x, Ctx.make(tokens, step=step, deterministic=deterministic))[0]

    with jax.default_matmul_precision("highest"):
        defs = {g: np.asarray(_quadratic_context_memory(module, x, g)) for g in range(0, 7)}
        close(call(module, x, jnp.int32(0), True), defs[1], 1e-5, "evaluation")
        drawn = set()
        for step in range(12):
            out = np.asarray(call(module, x, jnp.int32(step), False))
            again = np.asarray(call(module, x, jnp.int32(step), False))
            np.testing.assert_array_equal(out, again)
            match = [g for g, d in defs.items() if np.abs(out - d).max() < 1e-5]
            assert len(match) == 1 and 1 <= match[0] <= 4, (step, match)
            drawn.add(match[0])
    assert len(drawn) > 1, drawn


def test_changing_token_t_leaves_earlier_logits_unchanged():
    """The value at s mixes x_{s+1}, but it is read only by t > s: logits at positions < 7
    do not depend on tokens >= 7. Catches: the non-strict mask (t reads its own v, which
    holds x_{t+1}), the leaky average running backwards."""
    model = random_model(tiny(), seed=6)
    tokens = np.random.default_rng(7).integers(0, 64, (1, 12))
    other = tokens.copy()
    other[0, 7:] = (other[0, 7:] + 5) % 64
    fwd = quick_jit(lambda t: model(t).logits)
    a, b = fwd(jnp.asarray(tokens)), fwd(jnp.asarray(other))
    np.testing.assert_array_equal(np.asarray(a)[0, :7], np.asarray(b)[0, :7])
    assert not np.allclose(np.asarray(a)[0, 7:], np.asarray(b)[0, 7:])


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"tie_embeddings": False},
        {"ffn": FFN | {"size": None, "copies": 1}},
        {"mixer": MIXER | {"keys": "gated", "bandwidth": "adaptive"}},
        {"mixer": {"kind": "memory_levels", "short": MIXER, "long": MIXER | {"keys": "gated"}}},
    ],
)
def test_num_params_is_exact(changes):
    """num_params counts the built model (the official 5 D^2 + 2 copies P D + 2 D + 7 H per
    block with both memories). Catches: a memory's copies or slots left out of the count."""
    cfg = tiny(**changes)
    model = nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0)))
    built = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert cfg.num_params() == built


def test_memories_are_parts_of_the_transformer_family_too():
    """The two memories fill the Transformer's mixer and FFN slots: it builds, runs, and counts
    its parameters exactly."""
    cfg = TransformerConfig(d_model=16, n_layers=2, mixer=MIXER, ffn=FFN).with_vocab(64)
    model = build(cfg, rngs=nnx.Rngs(0))
    built = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert cfg.num_params() == built
    logits = model(jnp.zeros((1, 5), jnp.int32)).logits
    assert logits.shape == (1, 5, cfg.padded_vocab) and np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"mixer": MIXER | {"n_heads": 3}}, "model.mixer.n_heads=3 does not divide"),
        ({"ffn": FFN | {"copies": 0}}, "model.ffn.copies"),
        ({"mixer": MIXER | {"gap": 4, "gap_max": 2}}, "model.mixer.gap_max=2 is below"),
        (
            {"mixer": {"kind": "memory_levels", "short": MIXER | {"window": 0}}},
            "model.mixer.short.window=0 must be a positive integer",
        ),
    ],
)
def test_bad_config_is_one_clear_error(changes, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        tiny(**changes)


def test_key_scale_exponent_is_clamped_at_5():
    """The official kernel_beta_upbound: keys are scaled by e^{min(10 kb, 5)} (the persistent
    memory by its square). Past the clamp the softmax is saturated either way, so the logits
    cannot show it; the scale and its zero gradient do. Catches: the clamp dropped."""
    kb = jnp.array([0.8, 0.1])
    grad = jax.grad(lambda b: mosaics._kernel_scale(b).sum())(kb)
    close(mosaics._kernel_scale(kb)[:, 0], np.exp([5.0, 1.0]), 1e-6)
    assert float(grad[0]) == 0.0 and float(grad[1]) > 0


DECODE_CASES = {
    "mosaics-looped": dict(),
    "mosaics-scanned-untied": dict(scan_layers=True, tie_embeddings=False),
    "attention-mixer": dict(mixer={"kind": "attention", "n_heads": 2}),
    "swiglu-ffn": dict(ffn={"kind": "swiglu"}),
    "v2-levels": dict(
        mixer={
            "kind": "memory_levels",
            "short": MIXER | {"window": 3, "keys": "gated", "bandwidth": "adaptive"},
            "long": MIXER | {"gap": 2, "gap_max": 5, "bandwidth": "adaptive"},
        },
        ffn={"kind": "swiglu"},
    ),
}


def _decoded_logits(model, tokens, pieces, max_len):
    decode = quick_jit(lambda m, t, s: m.decode(t, s))
    state, got, start = model.init_state(tokens.shape[0], max_len), [], 0
    for size in pieces:
        logits, state = decode(model, tokens[:, start : start + size], state)
        got.append(np.asarray(logits))
        start += size
    assert int(state.position) == start
    return np.concatenate(got, axis=1)


@pytest.mark.parametrize("name", sorted(DECODE_CASES))
def test_incremental_decoding_gives_the_full_forward_logits(name):
    """`init_state`, then `decode` of prompt pieces (1, 4 and 6 tokens: the first piece is a
    single token at position 0) and single tokens, gives the full forward pass's logits at all
    18 positions (float32, 1e-5 relative): memories grown token by token equal the whole
    sequence at once. Catches: the leaky average restarted per piece (or its carried state
    decayed once too often or too rarely), a value made before the next token's raw value was
    seen (the look-ahead lost at piece ends), a query seeing its own pair (causal instead of
    strictly causal), position 0 not zero, the persistent memory's average not carried, the
    layers' caches mixed up."""
    cfg = tiny(**DECODE_CASES[name])
    model = random_model(cfg, seed=5)
    tokens = jnp.asarray(np.random.default_rng(6).integers(0, 64, (2, 18)), jnp.int32)
    with jax.default_matmul_precision("highest"):
        full = np.asarray(quick_jit(lambda m, t: m(t).logits)(model, tokens))
        got = _decoded_logits(model, tokens, [1, 4, 6] + [1] * 7, max_len=20)
    close(got, full, 1e-5)


def test_transformer_with_a_persistent_memory_ffn_decodes_with_its_state():
    """The transformer family carries a stateful FFN's cache too: with the persistent memory
    as its FFN, decoding token by token equals the forward pass. Catches: the block calling a
    sequence-reading FFN per piece with no state (each piece's leaky average restarting)."""
    cfg = TransformerConfig(
        d_model=16,
        n_layers=2,
        vocab_size=64,
        vocab_multiple=1,
        scan_layers=True,
        mixer={"kind": "attention", "n_heads": 2},
        ffn=FFN,
    )
    model = random_model(cfg, seed=7)
    tokens = jnp.asarray(np.random.default_rng(8).integers(0, 64, (1, 12)), jnp.int32)
    with jax.default_matmul_precision("highest"):
        full = np.asarray(quick_jit(lambda m, t: m(t).logits)(model, tokens))
        got = _decoded_logits(model, tokens, [5] + [1] * 7, max_len=12)
    close(got, full, 1e-5)
