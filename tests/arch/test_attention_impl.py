"""The attention mixer's implementations and its local window with sinks (`arch/attention.py`):
`impl: interpret` (our Pallas flash kernel, in the interpreter) gives what `xla` gives, forward
and gradients, in a whole model; the window and sinks mean what a mask written here means; the
FLOP count follows the window; bad settings are refused in one line."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from menagerie.arch import TransformerConfig, build
from menagerie.arch.attention import AttentionConfig, _check_unsplit_sequence
from menagerie.kernels.dispatch import KernelUnsupportedError

from tests.cli_testing import TINY, cli
from tests.random_params import random_module

MODEL = dict(d_model=32, n_layers=2, vocab_size=40, vocab_multiple=1)


def _visible(t: int, window: int | None, sinks: int) -> np.ndarray:
    """[T, S] bool, written from the definition: causal; within the last `window` keys (the
    query's own included) or among the first `sinks` positions."""
    q, k = np.arange(t)[:, None], np.arange(t)[None, :]
    keep = k <= q
    if window is not None:
        keep &= (q - k < window) | (k < sinks)
    return keep


def _direct(q, k, v, segment_ids, window, sinks):
    """softmax(q k^T / sqrt(D)) v over the visible pairs of the same segment, GQA by repeat."""
    b, t, h, d = q.shape
    g = h // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d)
    keep = _visible(t, window, sinks)[None] & (segment_ids[:, :, None] == segment_ids[:, None])
    s = np.where(keep[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhts,bshd->bthd", p / p.sum(-1, keepdims=True), v)


def _model(impl: str, **mixer):
    cfg = TransformerConfig(
        **MODEL, mixer=dict(kind="attention", n_heads=4, n_kv_heads=2, impl=impl, **mixer)
    )
    return random_module(lambda: build(cfg, rngs=nnx.Rngs(0)), seed=1)


@pytest.mark.parametrize("impl", ["xla", "interpret"])
@pytest.mark.parametrize("window, sinks", [(None, 0), (5, 0), (6, 2)])
def test_window_and_sinks_mean_the_mask_written_here(impl, window, sinks):
    """The mixer's attention on random q/k/v with two packed documents equals the direct
    computation with the mask written above (xla: the dense reference with a window). Catches:
    a window one key too wide or narrow (LocalWindow(window) instead of window - 1), sinks
    dropped or seen by the queries before them, the segment ids ignored by the kernel path."""
    rng = np.random.default_rng(0)
    b, t, d = 2, 20, 8
    q = rng.standard_normal((b, t, 4, d), np.float32)
    k, v = rng.standard_normal((2, b, t, 2, d), np.float32)
    seg = np.array([[1] * 13 + [2] * 7, [1] * 20], np.int32)
    mixer = _model(impl, window=window, sinks=sinks).blocks.mixer
    got = jax.jit(lambda *a: mixer._attend(*a))(q, k, v, seg)
    np.testing.assert_allclose(got, _direct(q, k, v, seg, window, sinks), atol=2e-5)


@pytest.mark.parametrize("window, sinks", [(None, 0), (6, 2)])
def test_interpret_kernel_model_equals_xla_forward_and_gradients(window, sinks):
    """A 2-layer model with `impl: interpret` (the Pallas kernel's body in the interpreter)
    gives the `xla` model's logits and parameter gradients (same parameters), on packed
    documents. Catches: the kernel path given the wrong scale, the kernel's kv-head mapping
    differing from blocked_attention's, its backward (dq, dk, dv) wrong, segment ids dropped."""
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 40, (2, 24)), jnp.int32)
    seg = jnp.asarray([[1] * 10 + [2] * 14, [1] * 24], jnp.int32)
    pos = jnp.asarray([list(range(10)) + list(range(14)), list(range(24))], jnp.int32)

    def loss_and_grads(impl):
        model = _model(impl, window=window, sinks=sinks)

        def loss(m):
            logits = m(tokens, segment_ids=seg, positions=pos).logits
            return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0]), logits

        (_, logits), grads = nnx.value_and_grad(loss, has_aux=True)(model)
        return logits, jax.tree.leaves(nnx.to_pure_dict(grads))

    want_logits, want_grads = jax.jit(lambda: loss_and_grads("xla"))()
    got_logits, got_grads = jax.jit(lambda: loss_and_grads("interpret"))()
    np.testing.assert_allclose(got_logits, want_logits, atol=1e-4, rtol=1e-4)
    for got, want in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("t, window, sinks", [(16, None, 0), (16, 4, 0), (33, 7, 3), (5, 8, 2)])
def test_flops_count_the_keys_each_query_sees(t, window, sinks):
    """`visible_keys` is the mean row count of the mask above (T/2 without a window, the
    MaxText convention), and the FLOP count scales with it. Catches: the window's FLOPs counted
    as full causal attention, the sinks counted inside the window twice."""
    cfg = AttentionConfig(n_heads=2, window=window, sinks=sinks)
    want = t / 2 if window is None else _visible(t, window, sinks).sum(1).mean()
    assert cfg.visible_keys(t) == pytest.approx(want)
    model = TransformerConfig(**MODEL)
    scores = cfg.flops_per_token(model, t) - 6 * cfg.num_params(model)
    assert scores == pytest.approx(12 * want * 2 * 16)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(sinks=2), "model.mixer.sinks=2 needs model.mixer.window"),
        (dict(window=0), "model.mixer.window"),
        (dict(window=4, impl="cudnn"), "model.mixer.window is not available with impl cudnn"),
    ],
)
def test_bad_window_settings_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        TransformerConfig(**MODEL, mixer=dict(kind="attention", **fields))


def test_a_kernel_that_does_not_split_the_sequence_refuses_a_sequence_mesh():
    """Catches: the sparse kernel (or the dense windowed reference) run on a sequence-split
    mesh, where XLA would gather the whole sequence on every device without a word."""
    mesh = jax.sharding.AbstractMesh((2, 2), ("data", "sequence"))
    with jax.sharding.use_abstract_mesh(mesh):
        with pytest.raises(KernelUnsupportedError, match="mesh.sequence=2"):
            _check_unsplit_sequence("pallas")
    _check_unsplit_sequence("pallas")  # no mesh: fine


def test_pallas_on_cpu_is_one_line_through_the_cli(tmp_path):
    """`model.mixer.impl=pallas` on a CPU-only machine: exit 2 and one line naming the
    alternatives, not a traceback from inside jit."""
    proc = cli(
        "train",
        "-c",
        str(TINY),
        f"run_dir={tmp_path / 'run'}",
        "model.mixer.impl=pallas",
        "train.steps=1",
    )
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr[-2000:]
    assert "impl='pallas' needs a GPU or TPU; on CPU use impl='interpret'" in err[0]
