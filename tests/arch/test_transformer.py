"""Transformer: counts, shapes, masking, GQA, scan vs loop, remat, logical names, HLO size."""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from menagerie.arch import (
    AttentionConfig,
    FFNConfig,
    SwiGLU,
    SwiGLUConfig,
    TransformerConfig,
    build,
)

from tests.jit_testing import quick_jit

TINY = dict(vocab_size=128, d_model=32, n_layers=2, n_heads=4, mlp_dim=64)
PARAM_NAMES = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm", "layers"}
_ATTENTION = ("n_heads", "n_kv_heads", "head_dim")


def _cfg(**overrides) -> TransformerConfig:
    """The tiny transformer; attention sizes and mlp_dim given flat, as keyword overrides."""
    kw = TINY | overrides
    mixer = AttentionConfig(**{k: kw.pop(k) for k in _ATTENTION if k in kw})
    ffn = kw.pop("ffn", None) or SwiGLUConfig(hidden_dim=kw.pop("mlp_dim"))
    kw.pop("mlp_dim", None)
    return TransformerConfig(mixer=mixer, ffn=ffn, **kw)


def _abstract(**overrides):
    """(graphdef, abstract Param state) without running any initialiser."""
    cfg = _cfg(**overrides)
    return nnx.split(nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0))), nnx.Param)


@functools.cache
def _weights(**overrides) -> dict:
    """Random weights as a pure dict, drawn with numpy: eager nnx init costs seconds per config
    on a 2-core CPU. Norm scales are random too, so tests see them. Real init is covered by
    test_forward_shapes_and_dtypes."""
    rng = np.random.default_rng(0)
    pure = nnx.to_pure_dict(_abstract(**overrides)[1])
    return jax.tree.map(
        lambda a: jnp.asarray(rng.normal(0, 0.3 if a.ndim == 1 else 0.1, a.shape), a.dtype), pure
    )


def _model_from(pure: dict, **overrides) -> nnx.Module:
    graphdef, state = _abstract(**overrides)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def _model(**overrides) -> nnx.Module:
    return _model_from(_weights(**overrides), **overrides)


@functools.partial(quick_jit, static_argnums=0)
def _apply(graphdef, state, tokens, kw):
    return nnx.merge(graphdef, state)(tokens, **kw).logits


def _logits(model, tokens, **kw):
    graphdef, state = nnx.split(model)
    return _apply(graphdef, state, tokens, kw)


def _tokens(b=2, t=16, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, TINY["vocab_size"], jnp.int32)


def _loss_fn(graphdef):
    def loss(state, tokens):
        out = nnx.merge(graphdef, state)(tokens[:, :-1])
        logp = jax.nn.log_softmax(out.logits)
        nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)
        return jnp.mean(nll) + out.aux_loss

    return loss


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(tie_embeddings=False),
        dict(n_kv_heads=2, tie_embeddings=False),
        dict(n_kv_heads=1, scan_layers=False, head_dim=16),
    ],
)
def test_num_params_matches_built_model(overrides):
    _, state = _abstract(**overrides)
    counted = sum(x.size for x in jax.tree.leaves(state))
    assert counted == _cfg(**overrides).num_params()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_forward_shapes_and_dtypes(dtype):
    cfg = _cfg(param_dtype=dtype, compute_dtype=dtype)

    @nnx.jit
    def init_and_apply(tokens):  # init under jit, as the trainer does
        model = build(cfg, rngs=nnx.Rngs(0))
        return model(tokens), model

    out, model = init_and_apply(_tokens())
    assert out.logits.shape == (2, 16, 128) and out.logits.dtype == jnp.float32
    assert out.aux_loss.shape == () and out.aux_loss.dtype == jnp.float32
    assert out.metrics == {}
    assert bool(jnp.all(jnp.isfinite(out.logits)))
    assert model.embed.table[...].dtype == jnp.dtype(dtype)
    q_std = float(model.blocks.mixer.q.kernel[...].astype(jnp.float32).std())
    assert q_std == pytest.approx(cfg.init_std, rel=0.15)


def test_causal():
    model = _model()
    a = _tokens()
    b = a.at[:, 10:].set((a[:, 10:] + 1) % 128)
    la, lb = _logits(model, a), _logits(model, b)
    np.testing.assert_allclose(la[:, :10], lb[:, :10], atol=1e-6)
    assert not np.allclose(la[:, 10:], lb[:, 10:])


def test_packed_documents_match_documents_alone():
    model = _model()
    doc1, doc2 = _tokens(1, 6, seed=1), _tokens(1, 10, seed=2)
    packed = jnp.concatenate([doc1, doc2], axis=1)
    positions = jnp.concatenate([jnp.arange(6), jnp.arange(10)])[None].astype(jnp.int32)
    segment_ids = jnp.array([[1] * 6 + [2] * 10], jnp.int32)
    lp = _logits(model, packed, positions=positions, segment_ids=segment_ids)
    np.testing.assert_allclose(lp[:, 6:], _logits(model, doc2), atol=1e-5)
    np.testing.assert_allclose(lp[:, :6], _logits(model, doc1), atol=1e-5)


def test_gqa_equals_mha_with_repeated_kv():
    pure = _weights(n_kv_heads=2)
    gqa = _model_from(pure, n_kv_heads=2)
    pure = jax.tree.map(lambda a: a, pure)  # copy the nesting before editing
    for name in ("k", "v"):  # kernels [L, D, K, Dh]; query head h reads kv head h // G
        kernel = pure["blocks"]["mixer"][name]["kernel"]
        pure["blocks"]["mixer"][name]["kernel"] = jnp.repeat(kernel, 2, axis=2)
    mha = _model_from(pure)
    tokens = _tokens()
    np.testing.assert_allclose(_logits(gqa, tokens), _logits(mha, tokens), atol=1e-5)


def _scanned_to_loop(pure: dict, n_layers: int) -> dict:
    stacked = pure["blocks"]
    layers = [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(n_layers)]
    return pure | {"blocks": dict(enumerate(layers))}


def test_scan_equals_loop():
    pure = _weights()
    scanned = _model_from(pure)
    looped = _model_from(_scanned_to_loop(pure, TINY["n_layers"]), scan_layers=False)
    tokens = _tokens()
    np.testing.assert_allclose(_logits(scanned, tokens), _logits(looped, tokens), atol=1e-5)


def test_remat_variants_same_loss_and_grads():
    pure = _weights()
    tokens = _tokens(t=17)
    results = []
    for remat in ("none", "full", "dots"):
        graphdef, state = nnx.split(_model_from(pure, remat=remat), nnx.Param)
        loss, grads = quick_jit(jax.value_and_grad(_loss_fn(graphdef)))(state, tokens)
        results.append((loss, nnx.to_pure_dict(grads)))
    for loss, grads in results[1:]:
        np.testing.assert_allclose(loss, results[0][0], rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, results[0][1])


def _saved_for_backward(remat, scan_layers, tokens):
    """Shapes of the residuals the forward pass keeps for the backward pass (the leaves of
    `jax.vjp`'s closure, traced with eval_shape: nothing runs) and their total bytes."""
    graphdef, state = nnx.split(
        _model_from(_weights(scan_layers=scan_layers), remat=remat, scan_layers=scan_layers),
        nnx.Param,
    )
    vjp = jax.eval_shape(lambda s, t: jax.vjp(_loss_fn(graphdef), s, t)[1], state, tokens)
    leaves = jax.tree.leaves(vjp)
    return [a.shape for a in leaves], sum(a.size * a.dtype.itemsize for a in leaves)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_remat_policy_decides_what_is_saved_for_the_backward(scan_layers):
    """remat="full" keeps only each layer's input [B, T, D] for the backward pass; "dots" also
    the outputs of its matmuls without batch dims (not the attention scores, which have batch
    dims); "none" every intermediate. Same loss and gradients (the test above), less saved."""
    b, t, d, h, f, n = 3, 16, TINY["d_model"], TINY["n_heads"], TINY["mlp_dim"], TINY["n_layers"]
    tokens = _tokens(b=b, t=t + 1)
    saved = {r: _saved_for_backward(r, scan_layers, tokens) for r in ("none", "full", "dots")}
    nbytes = {r: v[1] for r, v in saved.items()}
    assert nbytes["none"] > nbytes["dots"] > nbytes["full"], nbytes
    # dots adds per layer q, k, v [B, T, H, Dh], o [B, T, D], gate, up [B, T, F]; not down,
    # whose output is only added to the residual stream (its backward needs nothing).
    assert nbytes["dots"] - nbytes["full"] == n * b * t * 4 * (4 * d + 2 * f)  # float32
    if scan_layers:  # per-layer residuals come stacked [L, B, ...] (B = 3 != L = 2)
        lead = {(n, b), (n, b * t)}  # Linear saves its [B*T, out] matmul output, unreshaped
        stacked = {
            r: sorted(s for s in shapes if s[:2] in lead) for r, (shapes, _) in saved.items()
        }
        assert stacked["full"] == [(n, b, t, d)]
        assert set(stacked["dots"]) == {(n, b, t, d), (n, b * t, h * (d // h)), (n, b * t, f)}
        assert len(stacked["none"]) > len(stacked["dots"])


def test_every_param_has_logical_names():
    for scan in (True, False):
        _, state = _abstract(scan_layers=scan, tie_embeddings=False)
        for path, var in nnx.to_flat_state(state):
            names = var.get_metadata().get("out_sharding")
            assert names is not None and len(names) == len(var.shape), (path, names)
            assert set(names) <= PARAM_NAMES, (path, names)
            assert (names[0] == "layers") == (scan and path[0] == "blocks"), (path, names)
    specs = nnx.get_partition_spec(_abstract()[1])
    assert specs["embed"]["table"].get_value() == jax.P("vocab", "embed")
    assert specs["blocks"]["mixer"]["q"]["kernel"].get_value() == jax.P(
        "layers", "embed", "heads", "head_dim"
    )


class AuxSwiGLU(SwiGLU):
    def __call__(self, x_BTD, ctx):
        y, _ = super().__call__(x_BTD, ctx)
        return y, {"aux_loss": jnp.float32(0.5), "density": jnp.mean(x_BTD > 0)}


class AuxSwiGLUConfig(SwiGLUConfig):
    kind: str = "aux_test"  # registers the part (a plain str: it is not offered in YAML docs)

    def build(self, model, *, rngs):
        return AuxSwiGLU(self, model, rngs=rngs)


def test_aux_from_parts_flows_through_scan():
    assert FFNConfig.choices["aux_test"] is AuxSwiGLUConfig
    for scan in (True, False):
        cfg = _cfg(n_layers=3, scan_layers=scan, ffn=AuxSwiGLUConfig(hidden_dim=64))
        model = nnx.eval_shape(lambda cfg=cfg: build(cfg, rngs=nnx.Rngs(0)))
        out = nnx.eval_shape(lambda m, t: m(t), model, _tokens())
        assert out.aux_loss.shape == () and out.metrics["ffn/density"].shape == ()
        per_layer = {f"ffn/density/layer{i}" for i in range(3)}  # parts.PER_LAYER
        assert set(out.metrics) == {"ffn/aux_loss", "ffn/density", *per_layer}
        graphdef, state = nnx.split(model)
        state = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), state)
        out = nnx.jit(lambda m, t: m(t))(nnx.merge(graphdef, state), _tokens())
        np.testing.assert_allclose(out.aux_loss, 1.5)  # 3 layers x 0.5
        np.testing.assert_allclose(out.metrics["ffn/aux_loss"], 1.5)


def test_hlo_size_independent_of_depth():
    def lowered_text(n_layers):
        cfg = _cfg(n_layers=n_layers, remat="dots")
        graphdef, state = nnx.split(nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0))), nnx.Param)
        tokens = jax.ShapeDtypeStruct((2, 17), jnp.int32)
        lowered = jax.jit(jax.value_and_grad(_loss_fn(graphdef))).lower(state, tokens)
        start = time.perf_counter()
        lowered.compile()
        return len(lowered.as_text()), time.perf_counter() - start

    size2, t2 = lowered_text(2)
    size16, t16 = lowered_text(16)
    print(
        f"\nHLO chars: 2 layers {size2}, 16 layers {size16} (ratio {size16 / size2:.3f}); "
        f"compile s: 2 layers {t2:.2f}, 16 layers {t16:.2f}"
    )
    assert size16 <= 1.2 * size2
