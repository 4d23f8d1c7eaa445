"""sparse_ffn: the masked dense reference against a per-token numpy loop, the jnp gather path
against the reference (forward and gradients), and the Pallas kernels (interpreted on CPU)
against the gather path. Each test names a bug it was checked to catch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_testing import jit, normal
from menagerie.kernels import KernelUnsupportedError, sparse_ffn, sparse_ffn_reference
from menagerie.kernels.sparse_ffn import UNION_CHUNK, UNION_TOKENS, block_rows

S, E, D = 8, 6, 32  # expert size, experts, width: F = 48
K = {"swiglu": 2, "gelu": 1}
DENSITIES = [0.0, 0.3, 0.7, 1.0]


def weights(seed, activation, d=D, f=S * E):
    rng = np.random.default_rng(seed)
    w_in = normal(rng, (K[activation], f, d)) * d**-0.5  # neuron-major, as the op takes it
    return w_in, normal(rng, (f, d)) * f**-0.5


def random_active(seed, n, density, e=E):
    """bool [N, E] at `density`; token 0 has every expert, token 1 none (when N > 2)."""
    active = np.random.default_rng(seed).random((n, e)) < density
    if n > 2:
        active[0], active[1] = True, False
    return jnp.asarray(active)


def assert_close(name, x, ref, tol=2e-5):
    x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
    assert x.shape == ref.shape, (name, x.shape, ref.shape)
    err = float(np.abs(x - ref).max()) if x.size else 0.0
    assert err <= tol * (1 + float(np.abs(ref).max())), f"{name}: max abs error {err:.3g}"


def ffn(impl, activation, max_active=None):
    return functools.partial(
        sparse_ffn, expert_size=S, activation=activation, impl=impl, max_active=max_active
    )


def naive_ffn(x, w_in, w_out, active, activation):
    """Per token, in float64: the sum over its active experts of act(x W_in[e]) W_out[e]."""
    x, w_in, w_out, active = (np.asarray(a, np.float64) for a in (x, w_in, w_out, active))
    y = np.zeros_like(x)
    for n, e in zip(*np.nonzero(active), strict=True):
        cols = slice(e * S, (e + 1) * S)
        pre = [w[cols] @ x[n] for w in w_in]
        if activation == "swiglu":
            h = pre[0] / (1 + np.exp(-pre[0])) * pre[1]
        else:
            h = np.asarray(jax.nn.gelu(pre[0], approximate=False), np.float64)
        y[n] += h @ w_out[cols]
    return y


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_reference_matches_per_token_loop(activation):
    """Catches a neuron mask built with tile instead of repeat (expert e owning neurons e, e+E,
    ...), or gelu's tanh approximation in place of the exact form."""
    x = normal(np.random.default_rng(1), (9, D))
    w_in, w_out = weights(2, activation)
    active = random_active(3, 9, 0.5)
    got = sparse_ffn_reference(x, w_in, w_out, active, expert_size=S, activation=activation)
    want = naive_ffn(x, w_in, w_out, active, activation)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("n", [5, 40])
def test_gather_matches_reference_forward_and_gradients(activation, density, n):
    """Forward and d/dx, d/dw_in, d/dw_out; 5 tokens run the decode path (the union of their
    experts, UNION_CHUNK = 4 per iteration: with all 6 experts the second iteration's last two
    slots are padding), 40 tokens the prefill path (64 rows per block: every expert's block has
    padding rows). Catches the union's padding slots left unmasked (expert 0 counted twice), a
    token run through an expert of the union it did not select, the padding rows of a block
    left unmasked (experts whose token count is not a multiple of the block rows count some
    tokens twice), and a backward that adds a block's weight gradient to the wrong expert's
    slice."""
    assert (n <= UNION_TOKENS) == (n == 5) and UNION_CHUNK == 4 and E % UNION_CHUNK
    x = normal(np.random.default_rng(4), (n, D))
    w_in, w_out = weights(5, activation)
    active = random_active(6, n, density)
    dy = normal(np.random.default_rng(7), (n, D))

    def value_and_grads(f):
        def go(x, w_in, w_out):
            y, vjp = jax.vjp(lambda *a: f(*a, active), x, w_in, w_out)
            return y, vjp(dy)

        return jit(go)(x, w_in, w_out)

    y, grads = value_and_grads(ffn("gather", activation))
    y_ref, grads_ref = value_and_grads(ffn("reference", activation))
    assert_close("y", y, y_ref)
    for name, g, g_ref in zip(("dx", "dw_in", "dw_out"), grads, grads_ref, strict=True):
        assert_close(name, g, g_ref, tol=1e-4)
    if density == 0.0:  # only token 0 (every expert) has any
        assert not np.asarray(y)[1:].any()


def test_gather_several_blocks_per_expert():
    """Prefill-sized block rows (256) with 600 tokens: up to 3 blocks per expert. Catches a
    wrong block -> (expert, chunk) table (e.g. every block reading chunk 0)."""
    n = 600
    assert block_rows(n) == 256 and block_rows(1) == 1 and block_rows(5) == 8
    x = normal(np.random.default_rng(8), (n, D))
    w_in, w_out = weights(9, "swiglu")
    active = random_active(10, n, 0.6)
    got = jit(ffn("gather", "swiglu"))(x, w_in, w_out, active)
    assert_close("y", got, ffn("reference", "swiglu")(x, w_in, w_out, active))


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("n", [1, 37])
def test_kernel_matches_gather(activation, density, n, impl):
    """Decode (1 token) and 37 tokens (3 groups of 16, the last padded). Catches the down kernel
    reading w_out rows by slot number instead of the slot's expert, and h not zeroed for tokens
    of the group that did not select the slot's expert (the union applied to every token)."""
    x = normal(np.random.default_rng(11), (n, D))
    w_in, w_out = weights(12, activation)
    active = random_active(13, n, density)
    got = jit(ffn(impl, activation))(x, w_in, w_out, active)
    assert_close("y", got, jit(ffn("gather", activation))(x, w_in, w_out, active))


def test_kernel_output_tiles_and_bf16(impl):
    """D = 256: two column tiles of the down kernel, bf16 in and out. Catches a down kernel that
    ignores its column tile index (both tiles get the first 128 columns)."""
    x = normal(np.random.default_rng(14), (20, 256), jnp.bfloat16)
    w_in, w_out = (w.astype(jnp.bfloat16) for w in weights(15, "swiglu", d=256))
    active = random_active(16, 20, 0.5)
    got = jit(ffn(impl, "swiglu"))(x, w_in, w_out, active)
    assert got.dtype == jnp.bfloat16
    assert_close("y", got, ffn("reference", "swiglu")(x, w_in, w_out, active), tol=2e-2)


@pytest.mark.parametrize("max_active", [1, 3, E])
def test_max_active_stays_exact(max_active, impl):
    """Token 0 has all 6 experts, so max_active < 6 overflows its group: the op must run the
    gather path instead. Catches the kernel run with too few slots (experts dropped). The
    second call (every group within the bound) checks the kernel path itself."""
    n = 40
    x = normal(np.random.default_rng(17), (n, D))
    w_in, w_out = weights(18, "swiglu")
    active = random_active(19, n, 0.5)
    ref = ffn("reference", "swiglu")
    assert_close("y", jit(ffn(impl, "swiglu", max_active))(x, w_in, w_out, active),
                 ref(x, w_in, w_out, active))  # fmt: skip
    sparse = random_active(20, n, 0.0).at[jnp.arange(n), jnp.arange(n) % E].set(True)
    within = jnp.zeros((n, E), bool).at[:, :max_active].set(sparse[:, :max_active])
    assert_close("y", jit(ffn(impl, "swiglu", max_active))(x, w_in, w_out, within),
                 ref(x, w_in, w_out, within))  # fmt: skip


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(w_in=(2, 50, D), w_out=(50, D)), "F=50 is not a multiple of expert_size=8"),
        (dict(w_in=(2, D, S * E)), r"w_in \(2, 32, 48\) \(neuron-major \[K, F, D\]\)"),
        (dict(activation="gelu"), "activation='gelu' takes K=1 input matrices; w_in has K=2"),
        (dict(activation="relu"), "activation='relu' is not one of"),
        (dict(impl="triton"), "impl='triton' is not one of"),
        (dict(impl="pallas"), "impl='pallas' needs a GPU or TPU"),
        (dict(max_active=0), r"max_active=0 must be None or in \[1, E=6\]"),
        (dict(active=(4, 5)), r"active must be \[N, E\] = \[4, 6\]"),
    ],
)
def test_bad_arguments_raise_one_clear_value_error(change, message):
    """Catches a shape error surfacing as an XLA error deep in the loop (or a wrong answer)
    instead of one ValueError naming the argument."""
    if change.get("impl") == "pallas" and jax.default_backend() != "cpu":
        pytest.skip("impl='pallas' is valid on GPU / TPU")
    shapes = dict(w_in=(2, S * E, D), w_out=(S * E, D), active=(4, E))
    kw = dict(expert_size=S) | {k: v for k, v in change.items() if k not in shapes}
    shapes |= {k: v for k, v in change.items() if k in shapes}
    args = [jnp.zeros((4, D)), jnp.zeros(shapes["w_in"]), jnp.zeros(shapes["w_out"])]
    with pytest.raises(ValueError, match=message) as info:
        sparse_ffn(*args, jnp.zeros(shapes["active"], bool), **kw)
    assert "\n" not in str(info.value)
    assert issubclass(KernelUnsupportedError, ValueError)
