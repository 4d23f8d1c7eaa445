"""Megalodon (issue 11) at component level: each operator against its definition, the official
initialisation, logits equal to the independent `megalodon-jax` port loading our export, the
config's checks, and causality.

The definitions are in `megalodon_reference.py` (float64 numpy loops written from the equations,
plus the same recurrences as float32 `lax.scan` for gradients). Every test names plausible bugs
it catches; bench/mutants/megalodon-*.toml plant at least one of each test's (30 in all), and
`python bench/mutants.py megalodon-...` shows the test failing on each.

Parameters are random (not the zero norm scales and zero imaginary gamma of the
initialisation), so every parameter and both parts of every complex number change the output.
"""

from __future__ import annotations

import functools
import math
from functools import partial

import jax
import jax.numpy as jnp
import megalodon_reference as ref  # beside this file (tests/arch is on sys.path)
import numpy as np
import pydantic
import pytest
from flax import nnx
from menagerie.arch import MegalodonConfig, build
from menagerie.arch import megalodon_ops as ops
from menagerie.arch.megalodon import MegaBlock
from menagerie.kernels.chunked_attention import chunked_attention

from tests.export.export_testing import official_megalodon_logits
from tests.jit_testing import LESS_OPTIMISED
from tests.random_params import random_module

TINY = dict(
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
)


def random_cema_params(rng, d: int, n: int) -> dict:
    return dict(
        alpha=rng.normal(0, 0.5, (d, n)),
        delta=rng.normal(0, 0.5, (d, n)),
        theta=rng.normal(0, 1.0, (d,)),
        gamma=rng.normal(0, 1.0, (d, n, 2)),
        omega=rng.normal(0, 0.5, (d,)),
    )


def f32(tree):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


def quick_jit(fn):
    """`jax.jit(fn)` compiled with LESS_OPTIMISED, once per argument structure and shapes."""
    jitted, compiled = jax.jit(fn), {}

    def call(*args):
        leaves, tree = jax.tree.flatten(args)
        key = (tree, tuple((np.shape(x), str(jnp.result_type(x))) for x in leaves))
        if key not in compiled:
            compiled[key] = jitted.lower(*args).compile(compiler_options=LESS_OPTIMISED)
        return compiled[key](*args)

    return call


def quick_module_fn(fn):
    """quick_jit of fn(module, *args) for an nnx module (split into graph and state)."""
    compiled = quick_jit(lambda graph_state, *args: fn(nnx.merge(*graph_state), *args))
    return lambda module, *args: compiled(nnx.split(module), *args)


def run_cema(x, h0, p, segment: int):
    """Our CEMA from complex h0, `segment` tokens at a time: (y, h complex)."""

    def fn(x, h, alpha, delta, theta, gamma, omega):
        c = ops.cema_coeffs(alpha, delta, theta, gamma, segment)
        return ops.cema(x, h, c, omega, segment=segment)

    names = ("alpha", "delta", "theta", "gamma", "omega")
    args = f32((x, (h0.real, h0.imag), *(p[k] for k in names)))
    y, (h_re, h_im) = quick_jit(fn)(*args)
    return np.asarray(y), np.asarray(h_re) + 1j * np.asarray(h_im)


def timestep_norm(x, w, b, state, *, groups, eps):
    """Our TimestepNorm, compiled."""
    norm = partial(ops.timestep_norm, groups=groups, eps=eps)
    return quick_jit(norm)(x, w, b, state)


def close(actual, expected, tol, what=""):
    """Max abs error <= tol * (1 + max |expected|)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    err = np.abs(actual - expected).max()
    bound = tol * (1 + np.abs(expected).max())
    assert err <= bound, f"{what}: max |error| {err:.3g} > {bound:.3g}"


# 1. Each operator against its definition.


def test_cema_fft_segments_equal_the_recurrence():
    """CEMA by FFT per segment (state carried by the scan, bias from a random complex h0) equals
    the token-by-token recurrence, output and final state, for segments that divide L = 20,
    do not (6: a shorter last segment) and exceed it (32: one short segment). Catches: the
    conjugate of eta in the product, the phase put on the input term too (paper eq. 2, not the
    code), q^(S-1) instead of q^S carrying h across a segment boundary, a circular FFT (length
    L, not 2L), a missing or shifted h0 bias."""
    rng = np.random.default_rng(0)
    b, length, d, n = 2, 20, 5, 3
    p = random_cema_params(rng, d, n)
    x = rng.standard_normal((b, length, d))
    h0 = rng.standard_normal((b, d, n)) + 1j * rng.standard_normal((b, d, n))
    y_ref, h_ref = ref.cema(x, h0, **p)
    for segment in (4, 6, 32):
        y, h = run_cema(x, h0, p, segment)
        close(y, y_ref, 2e-5, f"y, segment {segment}")
        close(h, h_ref, 2e-5, f"final state, segment {segment}")


def test_cema_halves_with_carried_state_equal_one_pass():
    """CEMA on two halves, the first half's final state passed to the second, equals CEMA on
    the whole sequence (how sequence-parallel slices and decoding use it); segments of 6 do
    not line up with the split at 10. Catches: the state of an earlier segment returned, the
    remainder segment's state dropped."""
    rng = np.random.default_rng(1)
    p = random_cema_params(rng, 5, 3)
    x = rng.standard_normal((2, 20, 5))
    zero = np.zeros((2, 5, 3), complex)
    y, h = run_cema(x, zero, p, 6)
    y1, h1 = run_cema(x[:, :10], zero, p, 6)
    y2, h2 = run_cema(x[:, 10:], h1, p, 6)
    close(np.concatenate([y1, y2], axis=1), y, 2e-5, "y")
    close(h2, h, 2e-5, "final state")


def _norm_state(prior):
    count, mean, var = prior
    return ops.NormState(count=jnp.asarray(count, jnp.int32), mean=f32(mean), var=f32(var))


def test_timestep_norm_equals_cumulative_group_statistics():
    """TimestepNorm equals normalising by the mean and population variance of all the group's
    elements so far, with (1 + weight) and bias; from a carried state it equals normalising
    the concatenation with the earlier tokens (count, mean and variance of those tokens), and
    the returned state is the statistics after the last token. Catches: sample instead of
    population variance, the carried state ignored or weighted per element, statistics over
    the whole sequence (not causal), a missing +1 on the scale, groups split the wrong way."""
    rng = np.random.default_rng(2)
    b, length, d, groups, eps = 2, 9, 12, 3, 1e-5
    earlier = 2 + rng.standard_normal((b, 5, d)) * rng.uniform(0.5, 2, d)
    x = 2 + rng.standard_normal((b, length, d)) * rng.uniform(0.5, 2, d)
    w, bias = rng.normal(0, 0.3, d), rng.normal(0, 0.3, d)
    y_ref, (_, mean_ref, var_ref) = ref.timestep_norm(x, w, bias, groups=groups, eps=eps)
    zero = ops.NormState.zeros(b, groups)
    y, st = timestep_norm(f32(x), f32(w), f32(bias), zero, groups=groups, eps=eps)
    close(y, y_ref, 1e-5, "from zero")
    close(st.mean, mean_ref, 1e-5, "mean")
    close(st.var, var_ref, 1e-5, "var")
    assert np.array_equal(st.count, [length] * b)

    mu, var = ref.group_stats(earlier, groups)  # the earlier tokens' state, by hand
    count = np.full(b, earlier.shape[1])
    prior = (count, mu.mean(1), (var + mu**2).mean(1) - mu.mean(1) ** 2)
    both, (_, mean_ref, var_ref) = ref.timestep_norm(
        np.concatenate([earlier, x], 1), w, bias, groups=groups, eps=eps
    )
    y, st = timestep_norm(f32(x), f32(w), f32(bias), _norm_state(prior), groups=groups, eps=eps)
    close(y, both[:, earlier.shape[1] :], 1e-5, "after earlier tokens")
    close(st.mean, mean_ref, 1e-5, "mean")
    close(st.var, var_ref, 1e-5, "var")
    assert np.array_equal(st.count, count + length)


def test_timestep_norm_halves_with_carried_state_equal_one_pass():
    """TimestepNorm on two halves with the state carried equals one pass. Catches: the
    count not advanced (the second half then ignores the first), the state of the wrong
    position returned."""
    rng = np.random.default_rng(3)
    x = f32(1 + rng.standard_normal((2, 13, 8)))
    w, bias = f32(rng.normal(0, 0.3, 8)), f32(rng.normal(0, 0.3, 8))
    norm = lambda x, s: timestep_norm(x, w, bias, s, groups=2, eps=1e-5)
    y, st = norm(x, ops.NormState.zeros(2, 2))
    y1, st1 = norm(x[:, :6], ops.NormState.zeros(2, 2))
    y2, st2 = norm(x[:, 6:], st1)
    close(jnp.concatenate([y1, y2], 1), y, 1e-5, "y")
    close(st2.mean, st.mean, 1e-5, "mean")
    close(st2.var, st.var, 1e-5, "var")
    assert np.array_equal(st2.count, st.count)


def test_chunked_attention_is_block_diagonal_causal_softmax():
    """The chunked attention MegaLayer calls (scale 1, q/k head dim 4 != value head dim 6,
    T = 19 not a multiple of the chunk) equals a dense softmax under the block-diagonal
    causal mask. Catches: a causal mask off by one (a query sees the next key), keys visible
    across a chunk boundary, the last partial chunk mishandled."""
    rng = np.random.default_rng(4)
    q, k = rng.standard_normal((2, 2, 19, 2, 4))
    v = rng.standard_normal((2, 19, 2, 6))
    expected = ref.chunked_causal_attention(q, k, v, chunk=8, scale=1.0)
    attend = quick_jit(partial(chunked_attention, chunk_size=8, causal=True, scale=1.0))
    got = attend(*f32((q, k, v)))
    close(got, expected, 1e-5)


BLOCK = MegalodonConfig(
    **{**TINY, "chunk_size": 4},
    cema_segment=3,
    swiglu=True,
    rescale_nffn=True,
    scan_layers=False,
)


def test_mega_block_equals_the_official_equations():
    """One MegaBlock (MEGA layer, then the NFFN with the two-hop residual) from a carried
    state, L = 11 over three chunks of 4 and CEMA segments of 3, equals the official equations
    in float64, output and outgoing state. Catches: attention scaled by 1/sqrt(d) instead of 1,
    RoPE in the rotate-half layout instead of interleaved pairs, RoPE positions restarting at
    the wrong period (every CEMA segment), v taken from the CEMA output instead of the
    TimestepNorm output, a missing +1 on a norm scale or on gamma, the NFFN residual being the
    MEGA output y instead of the block input x, the reset gate on the wrong input. (Positions
    that never restart, 0..L-1, give the same scores up to rounding: RoPE is relative and
    attention stays inside a chunk. No test here can or needs to tell them apart.)"""
    block = random_module(lambda: MegaBlock(BLOCK, rngs=nnx.Rngs(0), layer=1), seed=5)
    rng = np.random.default_rng(6)
    b, length, d, n, g = 2, 11, BLOCK.d_model, BLOCK.cema_ndim, BLOCK.norm_num_groups
    x = rng.standard_normal((b, length, d))
    prior = (np.array([3, 8]), rng.normal(0, 0.5, (b, g)), rng.uniform(0.5, 2, (b, g)))
    h0 = (rng.standard_normal((b, d, n)) + 1j * rng.standard_normal((b, d, n))) * 0.5
    params = nnx.to_pure_dict(nnx.state(block, nnx.Param))
    expected, (count, mean, var), h = ref.mega_block(params, x, BLOCK, prior, h0)
    state = (_norm_state(prior), f32((h0.real, h0.imag)))
    out, (norm_state, (h_re, h_im)) = quick_module_fn(MegaBlock.step)(block, f32(x), state)
    close(out, expected, 2e-5, "block output")
    close(norm_state.mean, mean, 2e-5, "norm mean")
    close(norm_state.var, var, 2e-5, "norm var")
    assert np.array_equal(norm_state.count, count)
    close(np.asarray(h_re) + 1j * np.asarray(h_im), h, 2e-5, "CEMA state")


def test_cema_gradients_equal_those_of_the_recurrence():
    """jax.grad through our CEMA (coefficients, FFT segments, carried state) equals jax.grad
    through the recurrence as a float32 scan, for x, every CEMA parameter and the incoming
    state. Catches: a stop_gradient on q's powers or the coefficients, a gradient lost
    through the carried state between segments."""
    rng = np.random.default_rng(7)
    b, length, d, n = 2, 10, 4, 3
    p = f32(random_cema_params(rng, d, n))
    args = (f32(rng.standard_normal((b, length, d))), *f32(rng.standard_normal((2, b, d, n))))
    names = ("x", "h0_re", "h0_im", "alpha", "delta", "theta", "gamma", "omega")
    wy, wr, wi = f32(rng.standard_normal((b, length, d))), *f32(rng.standard_normal((2, b, d, n)))

    def ours(x, h_re, h_im, alpha, delta, theta, gamma, omega):
        c = ops.cema_coeffs(alpha, delta, theta, gamma, 4)
        y, (h_re, h_im) = ops.cema(x, (h_re, h_im), c, omega, segment=4)
        return (wy * y).sum() + (wr * h_re).sum() + (wi * h_im).sum()

    def theirs(*a):
        y, h_re, h_im = ref.cema_scan(*a)
        return (wy * y).sum() + (wr * h_re).sum() + (wi * h_im).sum()

    argnums = tuple(range(len(names)))
    a = (*args, p["alpha"], p["delta"], p["theta"], p["gamma"], p["omega"])
    got = quick_jit(jax.grad(ours, argnums))(*a)
    want = quick_jit(jax.grad(theirs, argnums))(*a)
    for name, g, w in zip(names, got, want, strict=True):
        close(g, w, 1e-4, f"d/d{name}")


def test_timestep_norm_gradients_equal_those_of_the_welford_scan():
    """jax.grad through our TimestepNorm (cumulative sums around a stop-gradient anchor)
    equals jax.grad through a token-by-token Welford merge, for x, weight, bias and the
    incoming mean and variance. Catches: a stop_gradient on the running mean or variance
    (forward values unchanged), the anchor's gradient not cancelling."""
    rng = np.random.default_rng(8)
    b, length, d, groups = 2, 7, 8, 2
    x = f32(1 + rng.standard_normal((b, length, d)))
    w, bias = f32(rng.normal(0, 0.3, (2, d)))
    mean, var = f32(rng.normal(0, 0.5, (b, groups))), f32(rng.uniform(0.5, 2, (b, groups)))
    count = jnp.asarray([4, 0], jnp.int32)  # one row with a carried state, one from scratch
    wy, wm, wv = f32(rng.standard_normal((b, length, d))), *f32(rng.standard_normal((2, b, groups)))

    def ours(x, w, bias, mean, var):
        st = ops.NormState(count=count, mean=mean, var=var)
        y, st = ops.timestep_norm(x, w, bias, st, groups=groups, eps=1e-5)
        return (wy * y).sum() + (wm * st.mean).sum() + (wv * st.var).sum()

    def theirs(x, w, bias, mean, var):
        y, m, v = ref.timestep_norm_scan(x, w, bias, count, mean, var, groups=groups, eps=1e-5)
        return (wy * y).sum() + (wm * m).sum() + (wv * v).sum()

    names = ("x", "weight", "bias", "mean", "var")
    got = quick_jit(jax.grad(ours, tuple(range(5))))(x, w, bias, mean, var)
    want = quick_jit(jax.grad(theirs, tuple(range(5))))(x, w, bias, mean, var)
    for name, g, wt in zip(names, got, want, strict=True):
        close(g, wt, 1e-4, f"d/d{name}")


# 2. The official initialisation.


def test_official_initialisation_statistics():
    """A 256-wide model's initial parameters have the official statistics: internal Linears
    N(0, 1/(3 fan_in)) with zero biases; embedding and output truncated N(0, 1/D) at 3 sigma;
    every norm scale and shift 0 (applied as 1 + w); q/k gamma, beta 0; CEMA alpha, delta
    N(0, 0.2), sigmoid(theta) a random permutation of D^(-i/D), gamma's real part N(0, 1) and
    imaginary part 0, omega within [-1, 1] with std about 0.25; NFFN layer scale 0.1 * 0.5^i.
    Catches: torch's default kaiming std sqrt(2/fan_in) or 1/sqrt(fan_in), an untruncated
    embedding, a norm scale stored as 1, theta's frequencies off by one or unpermuted, a
    non-zero imaginary gamma."""
    d, f = 256, 512
    cfg = MegalodonConfig(
        d_model=d,
        n_layers=2,
        num_heads=2,
        z_dim=128,
        value_dim=256,
        ffn_hidden_dim=f,
        cema_ndim=16,
        chunk_size=64,
        norm_num_groups=16,
        vocab_size=1024,
        vocab_multiple=1,
        swiglu=True,
        rescale_nffn=True,
        scan_layers=False,
    )
    model = build(cfg, rngs=nnx.Rngs(0))
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))

    def std_near(a, std, what, rel=0.04):
        assert abs(a.mean()) < 4 * std / math.sqrt(a.size), f"{what}: mean {a.mean():.3g}"
        assert abs(a.std() / std - 1) < rel, f"{what}: std {a.std():.4g}, want {std:.4g}"

    # truncated at +-3 sigma: the std is 0.9866 of the untruncated one
    trunc = math.sqrt(1 - 6 * math.exp(-4.5) / math.sqrt(2 * math.pi) / math.erf(3 / math.sqrt(2)))
    for name, table in (
        ("embed", params["embed"]["table"]),
        ("output", params["output"]["kernel"]),
    ):
        std_near(table, trunc / math.sqrt(d), name, rel=0.02)
        assert np.abs(table).max() <= 3 / math.sqrt(d) * (1 + 1e-6), f"{name} beyond 3 sigma"
        assert np.abs(table).max() > 2.9 / math.sqrt(d), f"{name} truncated too early"
    freqs = np.sort(np.exp(-np.arange(1, d + 1) * math.log(d) / d))
    for i, layer in params["blocks"].items():
        m, nffn = layer["mega"], layer["nffn"]
        for name in ("wz", "wv", "wr", "wh1", "wh2"):
            kernel = m[name]["kernel"]
            std_near(kernel, 1 / math.sqrt(3 * kernel.shape[0]), name)
            assert np.abs(kernel).max() > 3.5 * kernel.std(), f"{name} looks truncated"
            if "bias" in m[name]:
                assert not m[name]["bias"].any(), f"{name} bias"
        for name in ("fc1", "fc2", "fc3"):
            kernel = nffn[name]["kernel"]
            std_near(kernel, 1 / math.sqrt(3 * kernel.shape[0]), name)
        zeros = {
            "timenorm": m["timenorm"],
            "rmsnorm": m["rmsnorm"],
            "gamma": m["gamma"],
            "beta": m["beta"],
            "nffn norm": (nffn["norm_weight"], nffn["norm_bias"]),
        }
        for name, value in zeros.items():
            assert not any(a.any() for a in jax.tree.leaves(value)), f"{name} not zero"
        np.testing.assert_allclose(nffn["alpha"], 0.1 * 0.5**i, rtol=1e-6)
        cema = m["cema"]
        std_near(cema["alpha"], 0.2, "cema alpha")
        std_near(cema["delta"], 0.2, "cema delta")
        sig_theta = 1 / (1 + np.exp(-cema["theta"].astype(np.float64)))
        np.testing.assert_allclose(np.sort(sig_theta), freqs, rtol=1e-5, err_msg="theta")
        assert np.abs(np.corrcoef(sig_theta, freqs[::-1])[0, 1]) < 0.3, "theta not permuted"
        std_near(cema["gamma"][..., 0], 1.0, "cema gamma real")
        assert not cema["gamma"][..., 1].any(), "cema gamma imaginary part not zero"
        omega = cema["omega"]
        assert np.abs(omega).max() <= 1.0 and 0.18 < omega.std() < 0.3, "omega"
    for name in ("weight", "bias"):
        assert not params["final_norm"][name].any(), f"final_norm {name}"


# 3. Equivalence with megalodon-jax loading our export.


PARITY = {
    "untied-silu-scan-h2-seg4": (
        dict(tie_embeddings=False, swiglu=False, scan_layers=True, num_heads=2, cema_segment=4),
        (5, 32),  # below the chunk of 8; 4 chunks (8 CEMA segments)
    ),
    "tied-swiglu-loop-h1-rescale-scaleemb": (
        dict(
            tie_embeddings=True,
            swiglu=True,
            scan_layers=False,
            num_heads=1,
            rescale_nffn=True,
            scale_emb=True,
            rope_base=500.0,
        ),
        (8, 27),  # one chunk exactly; 3.4 chunks
    ),
}
CAUSAL = "untied-silu-scan-h2-seg4"


@functools.cache
def parity_model(name: str):
    """(config, our model with random parameters) of PARITY[name], shared by two tests."""
    cfg = MegalodonConfig(**{**TINY, **PARITY[name][0]})
    return cfg, random_module(lambda: build(cfg, rngs=nnx.Rngs(0)), seed=9)


# Compiled once per shape: the causality test reuses the parity test's compilation.
logits_of = quick_module_fn(lambda model, tokens: model(tokens).logits)


@pytest.mark.parametrize("name", sorted(PARITY))
def test_logits_equal_megalodon_jax_loading_our_export(name, tmp_path):
    """Our float32 logits equal those of `megalodon-jax` (an independent port of the official
    code) loading our `save_official` export (consolidated.pth, config.json) with its strict
    official-format loader, within 1e-4, at lengths below, equal to and several times the
    chunk size (8); tied and untied, SwiGLU or not, scanned or looped layers, 1 or 2 heads.
    All parameters are random, so one exported or computed wrong moves the logits. Catches: a
    square weight exported untransposed (wh1), a layer of a scanned stack exported in the
    wrong slot, any forward deviation from the official model (norm placement, the +1 of a
    scale, RoPE layout, chunking, the tied output, scale_emb, the NFFN layer scale), a
    config.json field lost.

    The loader is `official_megalodon_logits` (tests/export/export_testing.py)."""
    from menagerie.export.megalodon import save_official

    cfg, model = parity_model(name)
    save_official(cfg, nnx.to_pure_dict(nnx.state(model, nnx.Param)), tmp_path)
    theirs = official_megalodon_logits(tmp_path)
    rng = np.random.default_rng(10)
    for length in PARITY[name][1]:
        tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, length)), jnp.int32)
        a, b = np.asarray(logits_of(model, tokens)), theirs(tokens)
        assert a.std() > 0.1, "degenerate logits"
        err = np.abs(a - b).max()
        assert err < 1e-4, f"L={length}: max |ours - megalodon-jax| = {err:.3g}"


# 4. The config.


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_heads=3), "model.num_heads=3 does not divide model.z_dim=64"),
        (dict(num_heads=3, z_dim=48), "model.num_heads=3 does not divide model.value_dim=512"),
        (dict(num_heads=4, z_dim=20), "model.z_dim / num_heads = 5 is odd"),
        (dict(norm_num_groups=24), "model.norm_num_groups=24 does not divide model.d_model=256"),
        (dict(cema_ndim=0), "model.cema_ndim=0 must be a positive integer"),
        (dict(cema_segment=0), "model.cema_segment=0 must be a positive integer"),
        (dict(rescale_nffn=True), "model.rescale_nffn needs a per-layer init"),
    ],
)
def test_config_errors_are_one_line(kwargs, message):
    """Each bad value is refused with one error of one line that names the field. Catches: a
    check that is missing (norm groups, odd RoPE head dim) or raises a bare assertion."""
    with pytest.raises(pydantic.ValidationError) as err:
        MegalodonConfig(**kwargs)
    assert err.value.error_count() == 1
    msg = err.value.errors()[0]["msg"]
    assert message in msg and "\n" not in msg, msg


def test_num_params_swiglu_tied_rescaled():
    """num_params() equals the built model's count with SwiGLU (fc3), tied embeddings (no
    output matrix) and the NFFN layer scale; also without embeddings. Catches: fc3, the
    layer scale or the tied output counted wrong (test_parts covers only the defaults)."""
    cfg = MegalodonConfig(
        **{**TINY, "tie_embeddings": True, "swiglu": True, "rescale_nffn": True},
        scan_layers=False,
    )
    model = nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0)))
    total = sum(a.size for a in jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param))))
    assert cfg.num_params() == total
    assert cfg.num_params(include_embeddings=False) == total - cfg.padded_vocab * cfg.d_model


# 5. Causality.


def test_changing_token_t_leaves_earlier_logits_unchanged():
    """Changing token t leaves every logit before t unchanged (to float32 rounding: the FFT
    mixes all positions numerically) and changes every logit from t on, at L = 32 over 4
    chunks of 8 and 8 CEMA segments of 4; t at a chunk start, mid-chunk, mid-segment, last.
    Catches: a circular FFT convolution (later tokens wrap around to earlier ones), a
    non-causal chunk mask, TimestepNorm statistics over the whole sequence, a normalisation
    anchor taken from a later token."""
    cfg, model = parity_model(CAUSAL)
    rng = np.random.default_rng(12)
    base = rng.integers(0, cfg.vocab_size, 32)
    for t in (3, 8, 13, 31):
        row = base.copy()
        row[t] = (row[t] + 1 + rng.integers(cfg.vocab_size - 1)) % cfg.vocab_size
        logits = np.asarray(logits_of(model, jnp.asarray(np.stack([base, row]), jnp.int32)))
        before = np.abs(logits[1, :t] - logits[0, :t]).max(initial=0.0)
        assert before < 1e-5, f"token {t} changed earlier logits by {before:.3g}"
        after = np.abs(logits[1, t:] - logits[0, t:]).max(axis=-1)
        assert after.min() > 1e-3, f"token {t} did not reach every later position"


# 6. Incremental decoding.

decode_of = quick_module_fn(lambda model, tokens, state: model.decode(tokens, state))


@pytest.mark.parametrize("name", sorted(PARITY))
def test_decoding_gives_the_logits_of_the_full_forward_pass(name):
    """`init_state`, then `decode` of prompt pieces that start mid-chunk and cross chunk
    boundaries (3, 9, 9 tokens), then one token per call across another boundary, give the
    full forward pass's logits (float32, 1e-5 relative) at the longer PARITY length (3.4 or 4
    chunks of 8), for both PARITY models (scanned / looped layers, 2 / 1 heads, tied /
    untied). Catches: the key/value cache kept across a chunk boundary (attention must
    restart per chunk) or cleared mid-chunk, a layer's TimestepNorm or CEMA state not carried
    (or carried into the wrong layer), the final norm's statistics restarted per call, a cache
    slot written at the wrong place. (RoPE at the absolute position instead of the position
    in the chunk is not a bug to catch: within one chunk only the difference of positions
    counts.)"""
    cfg, model = parity_model(name)
    length = PARITY[name][1][-1]
    rng = np.random.default_rng(3)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, length)), jnp.int32)
    full = np.asarray(logits_of(model, tokens))
    state, got, start = model.init_state(2), [], 0
    for size in [3, 9, 9] + [1] * (length - 21):
        logits, state = decode_of(model, tokens[:, start : start + size], state)
        got.append(np.asarray(logits))
        start += size
    close(np.concatenate(got, axis=1), full, 1e-5, name)
    assert int(state.position) == length
