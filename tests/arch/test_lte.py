"""The LTE FFN (arch/lte.py): every routing mode computes the function it claims, against
definitions written out expert by expert; stage 2 freezes the routers in the train step; bad
configs give one line."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from menagerie.arch import Ctx, TransformerConfig, build
from menagerie.arch.lte import LTE, InferenceCopy
from menagerie.arch.parts import UpdateRule, reduce_aux
from menagerie.train.step import apply_update_rules

from tests.jit_testing import quick_jit

D, F, S = 32, 128, 16  # 8 experts


def _model_cfg(**ffn):
    ffn = {"kind": "lte", "inner": {"kind": "swiglu", "hidden_dim": F}, "expert_size": S} | ffn
    return TransformerConfig(vocab_size=64, d_model=D, n_layers=2, ffn=ffn)


def _lte(seed=0, **ffn):
    """A built LTE part with a random (not initial) router bias, so scores spread around tau."""
    model = _model_cfg(**ffn)
    lte = model.ffn.build(model, rngs=nnx.Rngs(seed))
    bias = jax.random.normal(jax.random.key(seed + 1), lte.router_bias.shape)
    lte.router_bias[...] = bias
    return lte


def _x(seed=2, b=2, t=5):
    return jax.random.normal(jax.random.key(seed), (b, t, D))


def _ctx(x, step=None):
    return Ctx.make(x[..., 0].astype(jnp.int32), step=None if step is None else jnp.int32(step))


def _expert_sum(lte, x_BTD, gate_BTE):
    """sum_i gate_i * E_i(x), each expert's FFN built from its own slices of the weights."""
    inner, y = lte.inner, 0.0
    for i in range(F // S):
        blk = slice(i * S, (i + 1) * S)
        h = jax.nn.silu(x_BTD @ inner.gate.kernel[:, blk]) * (x_BTD @ inner.up.kernel[:, blk])
        y = y + gate_BTE[..., i : i + 1] * (h @ inner.down.kernel[blk, :])
    return y


def test_all_gates_on_is_the_inner_ffn():
    """Bug caught: any scaling left on the forced-on path (e.g. G applied as well) would make a
    converted model differ from the dense one."""
    lte, x = _lte(all_experts=True), _x()
    y, aux = lte(x, _ctx(x, step=0))
    dense, _ = lte.inner(x, _ctx(x))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(dense))
    assert float(aux["density"]) == 1.0 and "aux_loss" not in aux


def test_soft_routing_scales_each_expert_by_its_score():
    """Bug caught: gates tiled over neurons instead of repeated per expert (jnp.tile for
    jnp.repeat) mixes experts; a missing router bias shifts every score."""
    lte, x = _lte(), _x()
    y, _ = lte(x, _ctx(x, step=0))
    np.testing.assert_allclose(y, _expert_sum(lte, x, lte.scores(x)), rtol=2e-5, atol=2e-6)


def test_hard_routing_zeroes_the_inactive_experts_neurons():
    """Bug caught: a >= / > slip at tau, or stage 2 still scaling by G."""
    lte, x = _lte(hard_from_step=3), _x()
    g = lte.scores(x)
    active = (g > 0.5).astype(jnp.float32)
    assert 0 < float(jnp.mean(active)) < 1  # a real mix of active and inactive experts
    y, aux = lte(x, _ctx(x, step=3))
    np.testing.assert_allclose(y, _expert_sum(lte, x, active), rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(float(aux["density"]), float(jnp.mean(active)))
    assert float(aux["aux_loss"]) == 0.0  # stage 2 trains on the task loss only
    y1, aux1 = lte(x, _ctx(x, step=2))  # a step before: still soft, with the losses
    np.testing.assert_allclose(y1, _expert_sum(lte, x, g), rtol=2e-5, atol=2e-6)
    assert float(aux1["aux_loss"]) > 0


def test_stage_one_losses_are_the_papers_means():
    """Bug caught: the losses summed over experts or layers instead of averaged (eta would then
    depend on the width and depth), or the separability barrier not bounded by sep_eps."""
    lte, x = _lte(eta=0.3, separability=0.7), _x()
    g = lte.scores(x)
    _, aux = lte(x, _ctx(x, step=0))
    eff = jnp.mean(g**2)
    sep = jnp.mean(1 / ((g - 0.5) ** 2 + 1e-2))
    np.testing.assert_allclose(aux["efficiency_loss"], eff, rtol=1e-6)
    np.testing.assert_allclose(aux["separability_loss"], sep, rtol=1e-6)
    np.testing.assert_allclose(aux["aux_loss"], (0.3 * eff + 0.7 * sep) / 2, rtol=1e-6)


def test_separability_weight_ramps_up_over_stage_one():
    """Bug caught: the ramp applied to the efficiency loss too, or not reaching full weight at
    the switch (stage 2 would threshold scores still near tau)."""
    lte, x = _lte(eta=0.3, separability=0.7, hard_from_step=8), _x()
    _, aux = lte(x, _ctx(x, step=2))
    eff, sep = aux["efficiency_loss"], aux["separability_loss"]
    np.testing.assert_allclose(aux["aux_loss"], (0.3 * eff + 0.7 * 0.25 * sep) / 2, rtol=1e-6)
    flat = _lte(eta=0.3, separability=0.7, hard_from_step=8, separability_ramp=False)
    _, aux = flat(x, _ctx(x, step=2))
    np.testing.assert_allclose(aux["aux_loss"], (0.3 * eff + 0.7 * sep) / 2, rtol=1e-6)


def test_stage_two_gives_the_router_no_gradient_and_stage_one_does():
    """Bug caught: a hard gate that leaks G's gradient (straight-through) or a stage 1 that
    detaches the router would train the wrong parameters."""
    lte, x = _lte(hard_from_step=3), _x()
    graphdef, params = nnx.split(lte, nnx.Param)

    def router_grad(step):
        def loss(p):
            y, aux = nnx.merge(graphdef, p)(x, _ctx(x, step=step))
            return jnp.sum(y**2) + aux["aux_loss"]

        g = jax.grad(loss)(params)
        return max(
            float(jnp.abs(g["router"]["kernel"][...]).max()),
            float(jnp.abs(g["router_bias"][...]).max()),
        )

    assert router_grad(2) > 0
    assert router_grad(3) == 0


def test_topk_routing_uses_exactly_k_experts_weighted_by_their_scores():
    """Bug caught: top-k over the wrong axis, or the mask without the score weights."""
    lte, x = _lte(routing="topk", top_k=3), _x()
    y, aux = lte(x, _ctx(x, step=0))
    g = lte.scores(x)
    kth = jnp.sort(g, axis=-1)[..., -3:-2]
    gate = jnp.where(g >= kth, g, 0.0)
    np.testing.assert_allclose(y, _expert_sum(lte, x, gate), rtol=2e-5, atol=2e-6)
    assert float(aux["density"]) == 3 / (F // S) and "aux_loss" not in aux


def test_gelu_mlp_can_be_wrapped():
    """Bug caught: LTE assuming SwiGLU's gate/up (the GELU MLP has one input matrix)."""
    model = TransformerConfig(
        vocab_size=64,
        d_model=D,
        n_layers=1,
        ffn={"kind": "lte", "inner": {"kind": "mlp", "hidden_dim": F}, "expert_size": S},
    )
    lte, x = model.ffn.build(model, rngs=nnx.Rngs(0)), _x()
    g = lte.scores(x)
    y, _ = lte(x, _ctx(x, step=0))
    up, down = lte.inner.up.kernel[...], lte.inner.down.kernel[...]
    h = jax.nn.gelu(x @ up, approximate=False) * jnp.repeat(g, S, axis=-1)
    np.testing.assert_allclose(y, h @ down, rtol=2e-5, atol=2e-6)


def test_model_metrics_report_density_per_layer_and_the_flops_saved():
    """Bug caught: FLOPs saved averaged over layers (the active count would be off by the
    depth), or the per-layer density lost in the mean."""
    cfg = _model_cfg(hard_from_step=1)
    model = build(cfg, rngs=nnx.Rngs(0))
    bias = model.blocks.ffn.router_bias
    bias[...] = jax.random.normal(jax.random.key(0), bias.shape)  # some experts off
    tok = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
    graphdef, state = nnx.split(model)
    run = quick_jit(lambda st: nnx.merge(graphdef, st)(tok, Ctx.make(tok, step=jnp.int32(0))))
    m = run(state).metrics
    per_layer = [float(m[f"ffn/density/layer{i}"]) for i in range(2)]
    np.testing.assert_allclose(float(m["ffn/density"]), np.mean(per_layer), rtol=1e-6)
    inner_flops = cfg.ffn.inner.flops_per_token(cfg, 6)
    saved = sum((1 - d) * inner_flops for d in per_layer)
    assert 0.2 < np.mean(per_layer) < 0.8
    np.testing.assert_allclose(float(m["ffn/flops_saved"]), saved, rtol=1e-5)


def test_reduce_aux_sums_losses_and_flops_and_averages_the_rest():
    """Bug caught: a change to reduce_aux that averages the aux loss or sums a metric."""
    aux = {"ffn": {"aux_loss": jnp.array([1.0, 2.0]), "flops_saved": jnp.array([3.0, 5.0])}}
    aux["ffn"]["density"] = jnp.array([0.2, 0.6])
    loss, m = reduce_aux(aux, stacked=True)
    assert float(loss) == 3.0 and float(m["ffn/flops_saved"]) == 8.0
    np.testing.assert_allclose(float(m["ffn/density"]), 0.4)
    assert float(m["ffn/density/layer1"]) == pytest.approx(0.6)


def test_update_rules_scale_then_freeze_after_the_optimizer():
    """Bug caught: freezing by zeroing gradients only (Adam momentum and weight decay would
    still move the routers after the switch); the lr scale applied to other parameters."""
    params = {"router": jnp.ones(3), "other": jnp.ones(3)}
    opt = optax.adamw(0.1, weight_decay=0.5)
    state = opt.init(params)
    grads = {"router": jnp.ones(3), "other": jnp.ones(3)}
    updates, state = opt.update(grads, state, params)  # momentum built before the switch
    zero = {"router": jnp.zeros(3), "other": jnp.zeros(3)}
    updates, state = opt.update(zero, state, params)
    rules = [({"router": True, "other": False}, UpdateRule(scale=3.0, frozen_from=5))]
    before = apply_update_rules(updates, rules, jnp.int32(4))
    after = apply_update_rules(updates, rules, jnp.int32(5))
    np.testing.assert_allclose(before["router"], 3.0 * updates["router"], rtol=1e-6)
    assert float(jnp.abs(after["router"]).max()) == 0
    np.testing.assert_array_equal(after["other"], updates["other"])


def test_only_the_routers_carry_the_frozen_axis():
    """Bug caught: the frozen axis also named on the inner FFN (stage 2 would freeze the whole
    FFN) or missing from the router bias; a no-op rule left in the train step."""
    cfg = _model_cfg(hard_from_step=7, router_lr_scale=4.0)
    assert cfg.update_rules()["lte_expert"] == UpdateRule(scale=4.0, frozen_from=7)
    assert _model_cfg(routing="topk", top_k=2).update_rules() == {}  # nothing to scale
    model = nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0)))
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    frozen = {"/".join(map(str, k)) for k, v in flat if "lte_expert" in v.out_sharding}
    assert frozen == {"blocks/ffn/router/kernel", "blocks/ffn/router_bias"}


@pytest.mark.parametrize(
    "ffn, message",
    [
        ({"inner": {"kind": "persistent_memory"}}, "no hidden neurons"),
        ({"expert_size": 48}, "does not divide"),
        ({"routing": "topk"}, "needs model.ffn.top_k"),
        ({"routing": "dejavu", "top_k": 2}, "dejavu needs model.ffn.hard_from_step"),
        ({"routing": "topk", "top_k": 9}, "needs model.ffn.top_k in 1..8"),
        ({"top_k": 2}, "is for routing=topk"),
        ({"routing": "topk", "top_k": 2, "hard_from_step": 5}, "is for routing=threshold or"),
        ({"tau": 1.0}, "tau must be in (0, 1)"),
        ({"hard_from_step": 0}, "hard_from_step=0 must be a positive"),
    ],
)
def test_bad_configs_name_the_key(ffn, message):
    """Bug caught: a config that builds a model with a ragged last expert or silent nonsense."""
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _model_cfg(**ffn)


def test_eval_step_routes_as_the_train_step_would_at_its_step():
    """Bug caught: eval without the train step (a stage-1 model evaluated with hard routing, so
    the run's eval and `menagerie eval` measure a model that was never trained)."""
    from menagerie.train.step import make_eval_step, token_losses

    cfg = _model_cfg(hard_from_step=5)
    model = build(cfg, rngs=nnx.Rngs(0))
    bias = model.blocks.ffn.router_bias
    bias[...] = jax.random.normal(jax.random.key(0), bias.shape)
    graphdef, params = nnx.split(model, nnx.Param)
    tok = jax.random.randint(jax.random.key(1), (2, 9), 0, 64)
    batch = {"tokens": tok[:, :-1], "targets": tok[:, 1:], "loss_mask": jnp.ones((2, 8))}
    batch |= {
        "positions": jnp.broadcast_to(jnp.arange(8), (2, 8)),
        "segment_ids": jnp.ones((2, 8), jnp.int32),
    }
    eval_step = quick_jit(make_eval_step(graphdef, jnp.ones(64)))
    for step in (4, 5):
        out = model(batch["tokens"], Ctx.make(batch["tokens"], step=jnp.int32(step)))
        want = jnp.sum(token_losses(out.logits, batch["targets"])[0])
        got = eval_step(params, batch, jnp.int32(step))["nll"]
        np.testing.assert_allclose(got, want, rtol=1e-5)
    assert float(eval_step(params, batch, jnp.int32(4))["nll"]) != float(got)


@pytest.mark.parametrize("inner", ["swiglu", "mlp"])
@pytest.mark.parametrize("impl", ["gather", "interpret"])
def test_generation_computes_only_the_active_experts_and_agrees(inner, impl):
    """Bug caught: the sparse inference path (what generation runs, `ctx.step` None) fed the
    gate/up matrices in the wrong order, the wrong activation, or a mask of another layout
    than the masked training path."""
    lte = _lte(hard_from_step=3, impl=impl, inner={"kind": inner, "hidden_dim": F})
    x = _x(t=6)
    graphdef, state = nnx.split(lte)

    @quick_jit
    def both(state):
        part = nnx.merge(graphdef, state)
        return part(x, _ctx(x))[0], part(x, _ctx(x, step=3))[0]

    sparse, masked = both(state)
    np.testing.assert_allclose(sparse, masked, rtol=2e-5, atol=2e-6)


def test_dejavu_predictor_learns_the_top_experts_by_activation_then_routes_by_them():
    """Bugs caught: labels from the wrong axis (experts mixed with neurons), a stage 1 that is
    not the dense FFN (the labels would not be the dense model's), a stage 2 that does not use
    the predictor's top_k, or that keeps training it."""
    lte, x = _lte(routing="dejavu", top_k=3, hard_from_step=4, predictor_rank=8), _x()
    g = lte.scores(x)
    y1, aux1 = lte(x, _ctx(x, step=0))
    dense, _ = lte.inner(x, _ctx(x))
    np.testing.assert_allclose(y1, dense, rtol=1e-6)
    inner = lte.inner
    h = jax.nn.silu(x @ inner.gate.kernel[...]) * (x @ inner.up.kernel[...])
    norms = jnp.linalg.norm(h.reshape(2, 5, F // S, S), axis=-1)
    labels = (norms >= jnp.sort(norms, axis=-1)[..., -3:-2]).astype(jnp.float32)
    logits = jnp.log(g) - jnp.log1p(-g)
    bce = -jnp.mean(
        labels * jax.nn.log_sigmoid(logits) + (1 - labels) * jax.nn.log_sigmoid(-logits)
    )
    np.testing.assert_allclose(aux1["predictor_loss"], bce, rtol=1e-4)
    np.testing.assert_allclose(aux1["aux_loss"], bce / 2, rtol=1e-4)
    predicted = (g >= jnp.sort(g, axis=-1)[..., -3:-2]).astype(jnp.float32)
    y2, aux2 = lte(x, _ctx(x, step=4))
    np.testing.assert_allclose(y2, _expert_sum(lte, x, predicted), rtol=2e-5, atol=2e-6)
    assert float(aux2["aux_loss"]) == 0 and float(aux2["density"]) == 3 / (F // S)
    recall = jnp.sum(predicted * labels) / jnp.sum(labels)
    np.testing.assert_allclose(aux2["predictor_recall"], recall, rtol=1e-6)


@pytest.mark.parametrize(
    "ffn",
    [{}, {"routing": "topk", "top_k": 2}, {"routing": "dejavu", "top_k": 2, "hard_from_step": 1}],
)
def test_counts_are_exact_for_every_routing(ffn):
    """Bug caught: the dejavu predictor's two matrices counted as one D x E router."""
    cfg = _model_cfg(**ffn)
    part = nnx.eval_shape(lambda: cfg.ffn.build(cfg, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(part, nnx.Param))
    assert cfg.ffn.num_params(cfg) == sum(x.size for x in leaves)
    router = cfg.ffn.num_params(cfg) - cfg.ffn.inner.num_params(cfg) - F // S
    assert cfg.ffn.flops_per_token(cfg, 8) == cfg.ffn.inner.flops_per_token(cfg, 8) + 6 * router


def test_generation_reads_the_prepared_neuron_major_copy_layer_by_layer():
    """`train.generate.prepared` on a scanned 2-layer model: each LTE layer holds its own
    neuron-major copy [L, K, F, D] of gate/up, and the sparse path through it gives the masked
    path's logits. Catches the copy stacked with the layer axis second (with L = K = 2 the scan
    silently hands layer 1 both layers' gate matrices), the copy made but never read (every
    token transposing the matrices again), and a copy of the wrong orientation."""
    from menagerie.train.generate import prepared

    cfg = _model_cfg(hard_from_step=3, impl="gather").model_copy(update={"scan_layers": True})
    model = build(cfg, rngs=nnx.Rngs(0))
    for _, m in nnx.iter_modules(model):  # scores spread around tau
        if hasattr(m, "router_bias"):
            m.router_bias[...] = jax.random.normal(jax.random.key(5), m.router_bias.shape)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 64, (2, 7)), jnp.int32)
    masked = model(tokens, Ctx.make(tokens, step=jnp.int32(3))).logits
    graphdef, state = prepared(nnx.clone(model))
    copies = nnx.state(nnx.merge(graphdef, state), InferenceCopy)
    (copy,) = jax.tree.leaves(copies)
    assert copy.shape == (2, 2, F, D)
    logits = quick_jit(lambda s: nnx.merge(graphdef, s)(tokens).logits)
    np.testing.assert_allclose(logits(state), masked, rtol=2e-5, atol=2e-5)
    doubled = nnx.merge(graphdef, state)
    for _, m in nnx.iter_modules(doubled):
        if isinstance(m, LTE):
            m.inference_w_in[...] = m.inference_w_in[...] * 2
    assert np.abs(np.asarray(logits(nnx.state(doubled))) - np.asarray(masked)).max() > 1e-3


def test_routing_spread_is_zero_for_a_static_pruning_and_per_expert_otherwise():
    """Half the experts forced on and half off for every token (density 0.5) give spread 0;
    random scores give the per-expert mean of 4 p (1 - p) computed here. Catches the spread
    taken over all (token, expert) pairs (1.0 for that static pruning, the case the metric
    exists to show) or over tokens per expert without the 4 p (1 - p) form."""
    model = build(_model_cfg(hard_from_step=1), rngs=nnx.Rngs(0))
    bias = model.blocks.ffn.router_bias
    tok = jnp.arange(24, dtype=jnp.int32).reshape(2, 12)
    graphdef, _ = nnx.split(model)
    run = quick_jit(lambda st: nnx.merge(graphdef, st)(tok, Ctx.make(tok, step=jnp.int32(0))))
    bias[...] = jnp.tile(jnp.asarray([100.0, -100.0]), (2, F // S // 2))
    m = run(nnx.state(model)).metrics
    assert float(m["ffn/density"]) == 0.5
    assert float(m["ffn/routing_spread"]) == 0.0
    lte = _lte(seed=3)
    x = _x(t=40)
    active = np.asarray(lte.scores(x)) > 0.5
    p = active.reshape(-1, active.shape[-1]).mean(0)
    assert 0 < p.min() or p.max() < 1
    _, aux = lte(x, _ctx(x, step=0))
    np.testing.assert_allclose(float(aux["routing_spread"]), np.mean(4 * p * (1 - p)), rtol=1e-6)
    assert 0.1 < float(aux["routing_spread"]) < 1.0


def test_the_from_scratch_recipe_sets_the_bias_and_drops_the_barrier():
    """The README's from-scratch recipe (`separability: 0`, `router_bias_init: 1`) rests on two
    keys. Catches the bias init ignored (scores at x = 0 would be sigmoid(0) = 0.5, not
    sigmoid(1)) and L_sep still counted at lambda 0 (aux_loss above eta L_eff / layers)."""
    model = _model_cfg(router_bias_init=1.0, separability=0.0, eta=0.3)
    lte = model.ffn.build(model, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(lte.scores(jnp.zeros((1, 3, D))), jax.nn.sigmoid(1.0), rtol=1e-6)
    x = _x()
    _, aux = lte(x, _ctx(x, step=0))
    assert float(aux["separability_loss"]) > 0
    np.testing.assert_allclose(aux["aux_loss"], 0.3 * aux["efficiency_loss"] / 2, rtol=1e-6)
