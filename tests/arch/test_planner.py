"""The lookahead heads (arch/planner.py): the planner never reads the block it plans, the whole
model stays causal, every loss equals a direct per-offset computation written out here (with a
document boundary, loss-mask zeros and a partial last block), the heads are the LM head without
targets, the counts are exact, bad configs give one line, and a tiny planner trains."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pydantic
import pytest
from flax import nnx
from menagerie.arch import Ctx, TransformerConfig, build, planner
from menagerie.arch.stack import run_layers

from tests.jit_testing import quick_jit

V, D, T, P = 64, 32, 13, 4  # blocks 0..3, the last one partial (position 12 only)
SEGMENTS = np.array([[1] * 6 + [2] * 7, [1] * 13], np.int32)  # row 0: a document boundary at 6
MASK = np.ones((2, T), np.float32)
MASK[0, 5] = 0  # the last token of document 1: its target is the next document's first token
MASK[0, 9] = MASK[1, 2] = MASK[1, 10] = 0  # targets excluded by the task (loss_mask zeros)


def _cfg(tie=True, **head):
    if head.get("kind", "lm") != "lm":  # a lookahead head with small blocks
        head = {"n_heads": 4, "hidden_dim": 64} | head
    ffn = {"hidden_dim": 64}  # looped layers: jax.jacrev can run them (nnx.scan needs nnx's)
    return TransformerConfig(
        vocab_size=V,
        d_model=D,
        n_layers=1,
        scan_layers=False,
        tie_embeddings=tie,
        ffn=ffn,
        head=head,
    )


def _model(seed=0, **head):
    model = build(_cfg(**head), rngs=nnx.Rngs(seed))
    cond = getattr(model.head, "condition", None)
    if cond is not None:  # a trained W_c and open gate: their initial zeros would hide any leak
        cond.kernel[...] = 0.3 * jax.random.normal(jax.random.key(seed + 7), cond.kernel.shape)
    gate = getattr(model.head, "condition_gate", None)
    if gate is not None:
        gate[...] = jnp.asarray(0.7, gate.dtype)
    return model


def _jitted(model, fn):
    """fn(model) compiled once (eager tiny ops cost more than the test)."""
    graphdef, state = nnx.split(model)
    return quick_jit(lambda state: fn(nnx.merge(graphdef, state)))(state)


def _ctx(seed=1, targets=True):
    """Two rows of T tokens: row 0 holds two documents; (tokens, ctx)."""
    stream = jax.random.randint(jax.random.key(seed), (2, T + 1), 0, V)
    positions = np.stack([np.r_[np.arange(6), np.arange(7)], np.arange(T)]).astype(np.int32)
    more = dict(targets=stream[:, 1:], loss_mask=jnp.asarray(MASK)) if targets else {}
    ctx = Ctx(positions=jnp.asarray(positions), segment_ids=jnp.asarray(SEGMENTS), **more)
    return stream[:, :-1], ctx


def _h(seed=3):
    return jax.random.normal(jax.random.key(seed), (2, T, D))


def _counted(ctx, anchor, target_index):
    """The rule written out: target index s (the token x_{s+1}) counts for a prediction made at
    position `anchor` iff inside the row, in the anchor's document, and loss_mask 1."""
    seg, mask = np.asarray(ctx.segment_ids), np.asarray(ctx.loss_mask)

    def ok(b):
        s = target_index
        return s < T and seg[b, s] == seg[b, anchor] and mask[b, s] > 0

    return ok


def _ce(logits_V, target):
    logits_V = np.asarray(logits_V, np.float64)
    top = logits_V.max()
    return top + np.log(np.sum(np.exp(logits_V - top))) - logits_V[target]


def _direct_loss(logits_fn, ctx, pairs):
    """Mean CE and accuracy over pairs (b, anchor, target index, where) that count; logits_fn(b,
    where) -> [V]."""
    targets = np.asarray(ctx.targets)
    ces, hits = [], []
    for b, anchor, s, where in pairs:
        if _counted(ctx, anchor, s)(b):
            logits = np.asarray(logits_fn(b, where))
            ces.append(_ce(logits, targets[b, s]))
            hits.append(np.argmax(logits) == targets[b, s])
    assert 0 < len(ces) < len(pairs)  # some pairs count, some do not
    return np.mean(ces), np.mean(hits)


def assert_block_loss(aux, name, logits_BNPV, ctx, target_of):
    """aux's `name`_loss and `name`_accuracy equal `_direct_loss` over every row b, block j and
    slot i: anchored at block j's last position, targets[b, target_of(j, i)]."""
    logits = np.asarray(logits_BNPV)
    _, n, p, _ = logits.shape
    pairs = [
        (b, (j + 1) * p - 1, target_of(j, i), (j, i))
        for b in range(2)
        for j in range(n)
        for i in range(p)
    ]
    loss, acc = _direct_loss(lambda b, w: logits[b, w[0], w[1]], ctx, pairs)
    np.testing.assert_allclose(aux[f"{name}_loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(aux[f"{name}_accuracy"], acc, rtol=1e-6)


# ---- the baselines' losses ----------------------------------------------------------------------


def test_parallel_heads_loss_is_the_direct_per_offset_sum():
    """Bug caught: head k scored against x_{t+k-1} or x_{t+k+1} (an off-by-one shift), a target
    across the document boundary or under a loss-mask zero counted, or the heads' losses
    averaged where the docstring says summed."""
    model, h = _model(n_future=3, kind="mtp_parallel", mtp_weight=0.5), _h()
    _, ctx = _ctx()
    (logits, aux), lm, future = _jitted(
        model,
        lambda m: (
            m.head(h, ctx, embed=m.embed),
            m.head.lm(h, ctx, embed=m.embed)[0],
            m.head.future_logits(h, ctx, m.embed),
        ),
    )
    np.testing.assert_array_equal(logits, lm)
    total = 0.0
    for k, lk in enumerate(map(np.asarray, future), start=2):
        pairs = [(b, t, t + k - 1, t) for b in range(2) for t in range(T)]
        loss, acc = _direct_loss(lambda b, t, lk=lk: lk[b, t], ctx, pairs)
        np.testing.assert_allclose(aux[f"offset{k}"]["loss"], loss, rtol=1e-5)
        np.testing.assert_allclose(aux[f"offset{k}"]["accuracy"], acc, rtol=1e-6)
        total += loss
    np.testing.assert_allclose(aux["aux_loss"], 0.5 * total, rtol=1e-5)


def test_sequential_modules_loss_is_the_direct_deepseek_weighting():
    """Bug caught: module k scored against x_{t+k} (the token it reads) instead of x_{t+k+1},
    the loss not weighted lambda / D, or a target across a boundary counted."""
    model, h = _model(depth=2, kind="mtp_sequential", mtp_weight=0.3), _h()
    _, ctx = _ctx()
    aux, modules = _jitted(
        model, lambda m: (m.head(h, ctx, embed=m.embed)[1], m.head.module_logits(h, ctx, m.embed))
    )
    total = 0.0
    for k, lk in enumerate(map(np.asarray, modules), start=1):
        pairs = [(b, t, t + k, t) for b in range(2) for t in range(T)]
        loss, acc = _direct_loss(lambda b, t, lk=lk: lk[b, t], ctx, pairs)
        np.testing.assert_allclose(aux[f"depth{k}"]["loss"], loss, rtol=1e-5)
        np.testing.assert_allclose(aux[f"depth{k}"]["accuracy"], acc, rtol=1e-6)
        total += loss
    np.testing.assert_allclose(aux["aux_loss"], 0.3 / 2 * total, rtol=1e-5)


def test_sequential_module_reads_the_token_k_ahead_but_not_its_target():
    """Bug caught: module k fed Emb(x_{t+k+1}), the very token it predicts (a leak that makes
    its loss trivially small), or fed nothing of the future (Emb(x_t))."""
    model, h = _model(depth=2, kind="mtp_sequential"), _h()
    _, ctx = _ctx()
    t, b = 2, 1
    graphdef, state = nnx.split(model)
    run = quick_jit(
        lambda state, c: (lambda m: m.head.module_logits(h, c, m.embed))(nnx.merge(graphdef, state))
    )
    base = run(state, ctx)
    for k in (1, 2):
        for index, changes in ((t + k - 1, True), (t + k, False)):
            targets = ctx.targets.at[b, index].set((ctx.targets[b, index] + 1) % V)
            moved = run(state, ctx.replace(targets=targets))
            same = np.array_equal(moved[k - 1][b, t], base[k - 1][b, t])
            assert same != changes, (k, index)


# ---- the planner --------------------------------------------------------------------------------


def test_planner_lookahead_and_latent_losses_are_the_direct_computation():
    """Bug caught: the plan of block j scored against block j's own tokens (no offset), against
    the targets of block j+1 (tokens shifted one too far), a target past the row (the partial
    last block), across the document boundary or under a loss-mask zero counted; the latent
    target pooled over the wrong block or over another document."""
    model, h = _model(kind="planner", block=P, latent_weight=0.2, lookahead_weight=0.7), _h()
    _, ctx = _ctx()

    def run(m):
        _, z = m.head.plan(h, ctx)
        return (
            m.head(h, ctx, embed=m.embed)[1],
            m.head.lookahead_logits(z, m.embed),
            m.head.latent(z),
        )

    aux, look, latent = _jitted(model, run)
    n = look.shape[1]
    # x_{(j+1)P+i} = targets[(j+1)P+i-1]
    assert_block_loss(aux, "lookahead", look, ctx, lambda j, i: (j + 1) * P + i - 1)

    hn, zn = np.asarray(h, np.float64), np.asarray(latent, np.float64)
    errs = []
    for b in range(2):
        for j in range(n - 1):
            nxt = range((j + 1) * P, min((j + 2) * P, T))
            if all(SEGMENTS[b, u] == SEGMENTS[b, (j + 1) * P - 1] for u in nxt):
                d = zn[b, j] - hn[b, list(nxt)].mean(0)
                huber = np.where(np.abs(d) < 1, 0.5 * d**2, np.abs(d) - 0.5)
                errs.append(huber.mean())
    assert 0 < len(errs) < 2 * (n - 1)
    np.testing.assert_allclose(aux["latent_loss"], np.mean(errs), rtol=1e-5)
    expected = 0.7 * aux["lookahead_loss"] + 0.2 * aux["latent_loss"]
    np.testing.assert_allclose(aux["aux_loss"], expected, rtol=1e-6)


def test_block_exact_match_counts_blocks_whose_counted_tokens_are_all_right():
    """Bug caught: a block wrong only where nothing counts scored wrong, a block with one counted
    miss scored right, or blocks without a counted target in the denominator."""
    tokens = np.array([[[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 1, 1], [2, 2, 2]]])  # [1,N=5,P=3]
    predicted = tokens.copy()
    predicted[0, 1, 2] = 0  # block 1: a miss where nothing counts -> right
    predicted[0, 2, 0] = 0  # block 2: a counted miss -> wrong
    predicted[0, 4] = 0  # block 4: all wrong, nothing counted -> not a block
    counted = np.ones_like(tokens)
    counted[0, 1, 2] = 0
    counted[0, 4] = 0
    logits = jax.nn.one_hot(predicted, 10)
    got = planner.block_exact_match(logits, jnp.asarray(tokens), jnp.asarray(counted))
    np.testing.assert_allclose(got, 3 / 4)  # blocks 0, 1, 3 of the four with a counted target


def _trunk(model, x_BTD, ctx):
    """The backbone from embedded inputs: final hidden states [B,T,D]."""
    x_BTD, _ = run_layers(model.blocks, x_BTD, ctx, model.cfg)
    return model.final_norm(x_BTD)


def test_no_token_of_a_block_reaches_its_plan_or_its_lookahead_predictions():
    """Bug caught: a plan conditioning its own block (z_j for block j), pooling that reads the
    next block, a planner attending ahead (non-causal over blocks), or the lookahead decoder fed
    teacher-forced tokens of the block it predicts. Checked by perturbing block j+1's tokens and
    by the Jacobian with respect to its input embeddings (exactly zero; nonzero for block j)."""
    model = _model(kind="planner", block=P, latent_weight=0.1)
    tokens, ctx = _ctx()
    graphdef, state = nnx.split(model)
    j = 1  # z_1 plans block 2, positions 8..11

    def plan_and_predictions(m, x_BTD):
        _, z = m.head.plan(_trunk(m, x_BTD, ctx), ctx)
        look = m.head.lookahead_logits(z, m.embed)
        return z[:, j], look[:, j]

    run = quick_jit(lambda state, x_BTD: plan_and_predictions(nnx.merge(graphdef, state), x_BTD))
    x = model.embed(tokens)
    z, look = run(state, x)
    changed = tokens.at[:, (j + 1) * P : (j + 2) * P].set((tokens[:, 8:12] + 5) % V)
    z2, look2 = run(state, model.embed(changed))
    np.testing.assert_array_equal(z2, z)
    np.testing.assert_array_equal(look2, look)

    def jacobian_probe(lo, hi):
        """w . J for a random cotangent w, J the Jacobian of (z_j, predictions) with respect to
        inputs lo:hi (zero iff J is, for a generic w). One jax.grad, not jax.jacrev: under jit,
        jacrev (vmapped VJPs) of this trunk showed cross-document nonzeros that per-row grads
        do not (seen 2026-12; kept out of this test's way)."""

        def probe(state, x_block):
            m = nnx.merge(graphdef, state)

            def projected(xb):
                z, look = plan_and_predictions(m, x.at[:, lo:hi].set(xb))
                wz, wl = jax.random.normal(jax.random.key(5), z.shape), jnp.cos(look)
                return jnp.sum(wz * z) + jnp.sum(jax.lax.stop_gradient(wl) * look)

            return jax.grad(projected)(x_block)

        return quick_jit(probe)(state, x[:, lo:hi])

    assert float(jnp.abs(jacobian_probe((j + 1) * P, (j + 2) * P)).max()) == 0.0
    own = jacobian_probe(j * P, (j + 1) * P)
    assert float(jnp.abs(own).min(axis=-1).max()) > 0.0  # block j's inputs do reach them


def test_conditioned_logits_are_causal_and_stay_in_their_document():
    """Bug caught: the plan added to its own block (position (j+1)P+i would read later tokens
    of its block through z_{j+1}), pooling or planner attention that ignore documents (a plan
    carrying the previous document into the next): the logits at t read exactly the inputs at
    or before t in t's document (the Jacobian's nonzeros, row 0 holding two documents)."""
    model = _model(kind="planner", block=P)
    tokens, ctx = _ctx(targets=False)
    graphdef, state = nnx.split(model)

    def reads_of(graphdef, state, x_TD):
        """[t, s]: whether the logits at t depend on input s (the Jacobian's nonzeros)."""

        def jac(state, x_TD):
            m = nnx.merge(graphdef, state)
            row = jax.tree.map(lambda a: a[:1], ctx)
            logits = lambda x: m.head(_trunk(m, x[None], row), row, embed=m.embed)[0][0]
            w_TV = jax.random.normal(jax.random.key(4), (T, V))

            def grad_of_row(t):  # one VJP per output position (lax.map: no vmapped VJPs)
                return jax.grad(lambda x: jnp.sum(logits(x)[t] * w_TV[t]))(x_TD)

            return jnp.abs(jax.lax.map(grad_of_row, jnp.arange(T))).max(axis=-1)  # [T,T]

        return np.asarray(quick_jit(jac)(state, x_TD)) > 0

    reads = reads_of(graphdef, state, model.embed(tokens)[0])
    seg = SEGMENTS[0]
    allowed = np.tril(seg[:, None] == seg[None, :])  # earlier tokens of the same document
    np.testing.assert_array_equal(reads, allowed)


# ---- the heads without targets -------------------------------------------------------------------


@pytest.mark.parametrize(
    "head",
    [
        dict(kind="mtp_parallel", n_future=3),
        dict(kind="mtp_sequential", depth=2),
        dict(kind="planner", block=P, condition_lm=False, latent_weight=0.1),
    ],
)
def test_without_targets_the_head_is_the_lm_head(head):
    """Bug caught: an extra head leaking into the LM logits, or a loss computed (and a crash on
    targets None) in generation; a head that stops the model's incremental decoding."""
    model, h = _model(**head), _h()
    _, ctx = _ctx(targets=False)
    _, with_targets = _ctx()
    (logits, aux), lm, trained = _jitted(
        model,
        lambda m: (
            m.head(h, ctx, embed=m.embed),
            m.head.lm(h, ctx, embed=m.embed)[0],
            m.head(h, with_targets, embed=m.embed)[0],
        ),
    )
    np.testing.assert_array_equal(logits, lm)
    assert aux == {} and model.decodes
    np.testing.assert_array_equal(trained, logits)


def test_a_conditioning_planner_ignores_targets():
    """Bug caught: a conditioned planner whose LM logits read ctx.targets. (Its incremental
    decoding: tests/arch/test_decode.py.)"""
    model, h = _model(kind="planner", block=P), _h()
    _, ctx = _ctx()
    no_targets = ctx.replace(targets=None, loss_mask=None)
    (logits, aux), generated, lm = _jitted(
        model,
        lambda m: (
            m.head(h, ctx, embed=m.embed),
            m.head(h, no_targets, embed=m.embed)[0],
            m.head.lm(h, ctx, embed=m.embed)[0],
        ),
    )
    assert "aux_loss" in aux
    np.testing.assert_array_equal(generated, logits)
    assert not np.allclose(logits, lm)  # the plan does condition the LM


@pytest.mark.parametrize(
    "head",
    [
        dict(kind="mtp_parallel", mtp_weight=0.0),
        dict(kind="mtp_sequential", mtp_weight=0.0),
        dict(kind="planner", block=P, condition_lm=False, lookahead_weight=0.0),
        dict(kind="planner", block=P, lookahead_weight=0.0),  # its plan's gate starts shut
        dict(kind="planner", block=P, lookahead_weight=0.0, condition_gate=False),  # W_c at 0
    ],
)
def test_with_zero_weights_the_model_trains_as_the_lm_head(head):
    """Bug caught: an extra head that changes the LM output or the backbone's gradients when
    its loss weight is 0 (e.g. a head computed on a modified h that feeds the logits); a
    conditioning planner whose plan reaches the LM at initialisation (its gate not at zero)."""
    tokens, ctx = _ctx()
    lm, model = build(_cfg(), rngs=nnx.Rngs(0)), build(_cfg(**head), rngs=nnx.Rngs(0))

    def loss_and_grads(m):
        graphdef, params, rest = nnx.split(m, nnx.Param, ...)

        def loss(p):
            out = nnx.merge(graphdef, p, rest)(tokens, ctx)
            ce = optax.softmax_cross_entropy_with_integer_labels(out.logits, ctx.targets)
            return jnp.mean(ce) + out.aux_loss, out.logits

        (_, logits), grads = quick_jit(jax.value_and_grad(loss, has_aux=True))(params)
        return logits, {k: grads[k] for k in ("embed", "blocks", "final_norm")}

    logits, grads = loss_and_grads(model)
    lm_logits, lm_grads = loss_and_grads(lm)
    np.testing.assert_array_equal(logits, lm_logits)
    jax.tree.map(np.testing.assert_array_equal, grads, lm_grads)


# ---- configs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "head",
    [
        dict(kind="planner", block=3, planner_layers=1, decoder_hidden=24),
        dict(kind="planner", block=3, condition_gate=False),
        dict(kind="planner", condition_lm=False, latent_weight=0.5),
        dict(kind="planner", block=3, writer_layers=2, writer_taps=3),
        dict(kind="planner", block=3, writer_layers=2, writer_taps=2, writer_taps_on="keys_values"),
        dict(kind="mtp_parallel", n_future=3),
        dict(kind="mtp_sequential", depth=2),
    ],
)
@pytest.mark.parametrize("tie", [True, False])
def test_num_params_is_exact(head, tie):
    """Bug caught: a count missing W_c or W_l (built only when asked), the offset table, a
    module's norms, the writer (its memory norms, steps, W_p), or the untied LM matrix (and it
    left out of the embedding count)."""
    cfg = _cfg(tie=tie, **head)
    model = nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0)))
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    assert cfg.num_params() == sum(v.get_value().size for _, v in flat)
    vocab = sum(v.get_value().size for _, v in flat if "vocab" in v.out_sharding)
    assert cfg.num_params(include_embeddings=False) == cfg.num_params() - vocab
    assert cfg.flops_per_token(T) > _cfg(tie=tie, kind="lm").flops_per_token(T)


@pytest.mark.parametrize(
    "head, message",
    [
        (dict(kind="planner", block=0), "model.head.block=0 must be a positive integer"),
        (dict(kind="planner", planner_layers=0), "planner_layers=0 must be a positive"),
        (dict(kind="planner", lookahead_weight=-1.0), "lookahead_weight=-1.0 must be >= 0"),
        (dict(kind="planner", writer_layers=-1), "writer_layers=-1 must be >= 0"),
        (dict(kind="planner", writer_weight=-2.0), "writer_weight=-2.0 must be >= 0"),
        (dict(kind="planner", writer_taps=-1), "writer_taps=-1 must be >= 0"),
        (dict(kind="mtp_parallel", n_future=1), "n_future=1 must be at least 2"),
        (dict(kind="mtp_sequential", depth=0), "model.head.depth=0 must be a positive"),
        (dict(kind="mtp_sequential", n_heads=3), "n_heads=3 must divide model.d_model=32"),
        (dict(kind="mtp_parallel", mtp_weight=-0.1), "mtp_weight=-0.1 must be >= 0"),
    ],
)
def test_bad_configs_are_one_clear_error(head, message):
    """Bug caught: a planner with empty blocks or no layers, an MTP head without a future
    offset, or negative weights, building silently."""
    with pytest.raises(pydantic.ValidationError, match=message) as err:
        _cfg(**head)
    assert err.value.error_count() == 1


# ---- training ------------------------------------------------------------------------------------


def test_a_tiny_planner_trains():
    """Bug caught: losses whose gradients do not reach the parameters (e.g. the lookahead loss
    stopped, or the plan detached), or a train step that cannot be compiled with the head."""
    model = build(_cfg(kind="planner", block=P, latent_weight=0.1), rngs=nnx.Rngs(0))
    tokens, ctx = _ctx()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt = optax.adam(1e-2)

    def loss(p):
        out = nnx.merge(graphdef, p, rest)(tokens, ctx)
        ce = optax.softmax_cross_entropy_with_integer_labels(out.logits, ctx.targets)
        return jnp.mean(ce) + out.aux_loss, out.metrics["head/lookahead_loss"]

    @quick_jit
    def step(p, s):
        (value, look), grads = jax.value_and_grad(loss, has_aux=True)(p)
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s, value, look

    state = opt.init(params)
    history = []
    for _ in range(12):
        params, state, value, look = step(params, state)
        history.append((float(value), float(look)))
    (first, first_look), (last, last_look) = history[0], history[-1]
    assert last < 0.7 * first and last_look < 0.8 * first_look, history
