"""The planner's writer (arch/plan_writer.py): its loss is the reverse computation written out
here, each step reads exactly the tokens before it, and the LM it steers stays causal and inside
its document although the tokens it reads are argmax (no gradient shows a leak there, so these
are perturbation tests). Its incremental decoding: tests/arch/test_decode.py; its counts and
config errors beside the planner's in test_planner.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from menagerie.arch import Ctx, TransformerConfig, build

from tests.arch.test_planner import (
    MASK,
    SEGMENTS,
    T,
    V,
    _ctx,
    _h,
    _trunk,
    assert_block_loss,
)
from tests.jit_testing import quick_jit

P = 4  # blocks 0..3 of T = 13 tokens, the last one partial


def _model(seed=0, **head):
    """A planner with a 2-layer writer mixing 2 earlier states into its memory, all parameters
    N(0, 0.5) (W_p, W_c and the taps included: at their zero init no leak through them could
    show)."""
    head = dict(kind="planner", block=P, n_heads=4, hidden_dim=64, writer_layers=2) | head
    head = dict(writer_taps=2) | head
    cfg = TransformerConfig(
        vocab_size=V, d_model=32, n_layers=1, scan_layers=False, ffn={"hidden_dim": 64}, head=head
    )
    graphdef, shapes = nnx.split(nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(seed))))
    rng = np.random.default_rng(seed + 1)
    fill = lambda a: jnp.asarray(0.5 * rng.standard_normal(a.shape), a.dtype)  # noqa: E731
    return nnx.merge(graphdef, jax.tree.map(fill, shapes))


def _teacher(ctx, n):
    """(tokens, counted) [B,N,P] in step order, by the rule written out: step i of block j is
    x_{a_j+P-i}, a_j = (j+1)P - 1, i.e. targets[(j+2)P - 2 - i], counted iff inside the row, in
    a_j's document and under a loss-mask one."""
    targets = np.asarray(ctx.targets)
    tokens, counted = np.zeros((2, n, P), np.int32), np.zeros((2, n, P), np.float32)
    for b in range(2):
        for j in range(n):
            for i in range(P):
                s, anchor = (j + 2) * P - 2 - i, (j + 1) * P - 1
                if s < T:
                    tokens[b, j, i] = targets[b, s]
                    same = SEGMENTS[b, s] == SEGMENTS[b, min(anchor, T - 1)]
                    counted[b, j, i] = float(same and MASK[b, s] > 0)
    return jnp.asarray(tokens), jnp.asarray(counted)


def test_the_writer_loss_is_the_direct_reverse_computation():
    """Bug caught: the block written first to last (step i scored against x_{a_j+1+i}), shifted
    by one token either way, a target past the row, across the document boundary or under a
    loss-mask zero counted, or the writer's loss not weighted into aux_loss."""
    model, h = _model(lookahead_weight=0.7, writer_weight=0.4), _h()
    _, ctx = _ctx()
    n = -(-T // P)
    teacher = _teacher(ctx, n)

    def run(m):
        _, z = m.head.plan(h, ctx)
        return m.head(h, ctx, embed=m.embed)[1], m.head.writing(z, h, ctx, m.embed)(teacher)[0]

    aux, logits = _jitted(model, run)
    # step i of block j: x_{a_j+P-i} = targets[(j+2)P - 2 - i]
    assert_block_loss(aux, "writer", logits, ctx, lambda j, i: (j + 2) * P - 2 - i)
    expected = 0.7 * aux["lookahead_loss"] + 0.4 * aux["writer_loss"]
    np.testing.assert_allclose(aux["aux_loss"], expected, rtol=1e-6)


def _jitted(model, fn):
    graphdef, state = nnx.split(model)
    return quick_jit(lambda state: fn(nnx.merge(graphdef, state)))(state)


def test_each_step_reads_exactly_the_tokens_before_it():
    """Bug caught: step i fed its own target (teacher[i]: a leak that makes the loss trivial) or
    the token two steps back, a teacher token read where it does not count (greedy writing
    cannot know it), or greedy writing that does not feed its own tokens back."""
    model, h = _model(), _h()
    _, ctx = _ctx(targets=False)
    n = -(-T // P)
    other = jax.random.randint(jax.random.key(9), (2, n, P), 0, V)
    ones, zeros = jnp.ones((2, n, P)), jnp.zeros((2, n, P))

    def run(m):
        _, z = m.head.plan(h, ctx)
        write = m.head.writing(z, h, ctx, m.embed)
        greedy, tokens = write()
        return greedy, write((tokens, ones))[0], write((other, zeros))[0], write((other, ones))[0]

    greedy, own, unknown, forced = map(np.asarray, _jitted(model, run))
    np.testing.assert_array_equal(own, greedy)  # its own tokens as teacher: the same steps
    np.testing.assert_array_equal(unknown, greedy)  # nothing counts: greedy writing
    np.testing.assert_array_equal(forced[:, :, 0], greedy[:, :, 0])  # step 0 reads the plan
    assert not np.allclose(forced[:, :, 1:], greedy[:, :, 1:])


def _logits_and_plan(model, tokens_BT, ctx):
    """The model's logits [B,T,V] (no targets: as generating) and its writer's greedy tokens."""
    graphdef, state = nnx.split(model)

    def run(state, tokens_BT):
        m = nnx.merge(graphdef, state)
        h = _trunk(m, m.embed(tokens_BT), ctx)
        _, z = m.head.plan(h, ctx)
        return m.head(h, ctx, embed=m.embed)[0], m.head.writing(z, h, ctx, m.embed)()[1]

    return quick_jit(run)(state, tokens_BT)


def test_the_lm_steered_by_the_writer_stays_causal_and_in_its_document():
    """Bug caught: the block written at a_j read from a_j - 1 on (a token steered by a plan that
    read it), the writer's memory reaching past a_j, a plan read past its block or into the next
    document, a memory that ignores documents, or key or value taps that mix in a later position
    or one of the previous document (the taps here are on keys and values; the state taps are
    the exact sum of the next test). Each input token in turn is changed: no logit
    before it, nor in another document, may move; the written tokens must move somewhere (the
    check is not vacuous)."""
    model, seg = _model(writer_taps_on="keys_values"), SEGMENTS
    tokens, ctx = _ctx(targets=False)
    ctx = Ctx(positions=ctx.positions, segment_ids=ctx.segment_ids)
    base, plan = map(np.asarray, _logits_and_plan(model, tokens, ctx))
    plans_moved = 0
    for s in range(T):
        changed = tokens.at[:, s].set((tokens[:, s] + 7) % V)
        logits, moved = map(np.asarray, _logits_and_plan(model, changed, ctx))
        for b in range(2):
            fixed = (np.arange(T) < s) | (seg[b] != seg[b, s])
            np.testing.assert_array_equal(logits[b, fixed], base[b, fixed], err_msg=f"{b} {s}")
        plans_moved += int(not np.array_equal(moved, plan))
    assert plans_moved >= T // 2, plans_moved


def test_the_memory_taps_are_the_direct_causal_sum_in_the_document():
    """Bug caught: a tap dropped (the loop one short), tap k applied at distance k + 1, or a
    state of the previous document mixed in."""
    model, h = _model(writer_taps=3), np.asarray(_h(), np.float64)
    taps = np.asarray(model.head.writer.taps[...], np.float64)
    got = np.asarray(_jitted(model, lambda m: m.head.writer.mix(_h(), jnp.asarray(SEGMENTS))))
    want = h.copy()
    for b in range(2):
        for t in range(T):
            for k in range(1, 4):
                if t - k >= 0 and SEGMENTS[b, t - k] == SEGMENTS[b, t]:
                    want[b, t] += taps[k - 1] * h[b, t - k]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_the_key_and_value_taps_are_the_direct_causal_sums_in_the_document():
    """Bug caught: the key taps applied to the values (or one set to both), a tap dropped or
    applied at distance k + 1, a key of the previous document mixed in, or the taps applied
    before the projections (to the states) when they are on keys and values."""
    model = _model(writer_taps=3, writer_taps_on="keys_values")
    assert model.head.writer.taps is None

    def run(m):
        layer = m.head.writer.layers[1]
        m_BTD = layer.memory_norm(m.head.writer.mix(_h(), jnp.asarray(SEGMENTS)))
        raw = layer.k(m_BTD), layer.v(m_BTD)
        return raw, layer.memory(_h(), jnp.asarray(SEGMENTS)), layer.kv_taps[...]

    raw, got, taps = jax.tree.map(lambda a: np.asarray(a, np.float64), _jitted(model, run))
    for x, mixed, c in zip(raw, got, taps, strict=True):
        want = x.copy()
        for b, t, k in np.ndindex(2, T, 4):
            if 0 < k <= t and SEGMENTS[b, t - k] == SEGMENTS[b, t]:
                want[b, t] += c[k - 1] * x[b, t - k]
        np.testing.assert_allclose(mixed, want, rtol=1e-5, atol=1e-5)


def test_the_taps_start_at_writer_tap_init():
    """Bug caught: `writer_tap_init` not reaching the writer's state taps or its value taps, or
    `writer_key_tap_init` not reaching its key taps (they then start at zero, the saddle the
    options are there to leave, or as the values), or the defaults no longer zero and
    `writer_tap_init` for the keys."""
    kv = {"writer_tap_init": 0.5, "writer_taps_on": "keys_values"}
    cases = (({}, 0.0, 0.0), ({"writer_tap_init": 0.75}, 0.75, 0.75), (kv, 0.5, 0.5))
    cases += ((kv | {"writer_key_tap_init": 0.25}, 0.25, 0.5),)
    for extra, keys, values in cases:
        head = dict(kind="planner", block=P, n_heads=4, hidden_dim=64, writer_layers=1)
        head |= dict(writer_taps=2) | extra
        cfg = TransformerConfig(vocab_size=V, d_model=32, n_layers=1, head=head)
        writer = build(cfg, rngs=nnx.Rngs(0)).head.writer
        if writer.taps is not None:
            want = np.full((2, 32), values, np.float32)
            np.testing.assert_array_equal(np.asarray(writer.taps[...]), want)
            continue
        want = np.stack([np.full((2, 4, 8), c, np.float32) for c in (keys, values)])
        np.testing.assert_array_equal(np.asarray(writer.layers[0].kv_taps[...]), want)
