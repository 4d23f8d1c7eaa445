"""LTE expert grouping: balanced k-means, the expert permutation, permuting a SwiGLU FFN."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from menagerie.arch import SwiGLU, SwiGLUConfig, TransformerConfig
from menagerie.arch.lte_grouping import (
    balanced_assignment,
    balanced_kmeans,
    expert_permutation,
    permute_ffn,
)
from menagerie.arch.parts import Ctx
from menagerie.arch.stack import run_layers, stack_layers
from scipy.optimize import linear_sum_assignment

D, F, S = 16, 64, 8  # d_model, FFN width, expert size: 8 experts


def _unit_rows(x_FD: np.ndarray) -> np.ndarray:
    return x_FD / np.linalg.norm(x_FD, axis=1, keepdims=True)


def _planted(n_clusters: int, size: int, dim: int, noise: float, seed: int):
    """(rows [E*S, D], planted cluster id [E*S]): S noisy copies of E random directions,
    shuffled."""
    rng = np.random.default_rng(seed)
    centers_ED = _unit_rows(rng.standard_normal((n_clusters, dim)))
    labels_F = np.repeat(np.arange(n_clusters), size)
    x_FD = centers_ED[labels_F] + noise * rng.standard_normal((labels_F.size, dim))
    order = rng.permutation(labels_F.size)
    return x_FD[order].astype(np.float32), labels_F[order]


def _same_partition(a_F: np.ndarray, b_F: np.ndarray) -> bool:
    """Whether two labelings group the rows alike (up to renaming the clusters)."""
    return np.array_equal(a_F[:, None] == a_F[None, :], b_F[:, None] == b_F[None, :])


def _cohesion(x_FD: np.ndarray, labels_F: np.ndarray) -> float:
    """Mean cosine similarity of each unit row to its cluster's mean direction."""
    u_FD = _unit_rows(x_FD)
    means_KD = np.stack([u_FD[labels_F == k].mean(0) for k in range(labels_F.max() + 1)])
    return float(np.mean(np.sum(u_FD * _unit_rows(means_KD)[labels_F], axis=1)))


def _inertia(x_FD: np.ndarray, labels_F: np.ndarray) -> float:
    """Sum of squared distances of the rows to their cluster means."""
    means_KD = np.stack([x_FD[labels_F == k].mean(0) for k in range(labels_F.max() + 1)])
    return float(np.sum(np.square(x_FD - means_KD[labels_F])))


@pytest.mark.parametrize("f, size", [(96, 8), (64, 32), (40, 1), (24, 24)])
def test_groups_are_balanced_and_contiguous(f, size):
    """Every expert has exactly `size` neurons and the permutation lists them expert by expert.
    Catches: a column accepting more than `size` bids (rank test off by one); an argsort that
    is not a permutation of 0..F-1 or does not group experts contiguously."""
    x_FD = np.random.default_rng(0).standard_normal((f, 12)).astype(np.float32)
    labels_F = balanced_kmeans(x_FD, f // size)
    assert np.all(np.bincount(labels_F, minlength=f // size) == size)
    perm_F = expert_permutation(x_FD, size)
    np.testing.assert_array_equal(np.sort(perm_F), np.arange(f))
    blocks_ES = balanced_kmeans(_unit_rows(x_FD), f // size)[perm_F].reshape(-1, size)
    assert np.all(blocks_ES == blocks_ES[:, :1])


@pytest.mark.parametrize("f, e, seed", [(24, 3, 0), (64, 8, 1), (60, 60, 2), (48, 2, 3)])
def test_balanced_assignment_is_optimal(f, e, seed):
    """The auction's total benefit equals linear_sum_assignment's against each column repeated
    F/E times. Catches: an overbid (more than the margin over the second-best slot plus eps:
    eps-complementary slackness breaks); stopping after the first, coarse eps phase."""
    benefit_FE = np.random.default_rng(seed).standard_normal((f, e))
    cols_F, _ = balanced_assignment(benefit_FE, f // e)
    assert np.all(np.bincount(cols_F, minlength=e) == f // e)
    rows, slots = linear_sum_assignment(np.repeat(benefit_FE, f // e, axis=1), maximize=True)
    best = benefit_FE[rows, slots // (f // e)].sum()
    np.testing.assert_allclose(benefit_FE[np.arange(f), cols_F].sum(), best, rtol=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_planted_clusters(seed):
    """Well-separated planted groups come back exactly. Catches: a flipped benefit sign
    (nearest becomes farthest); centroids averaged over the wrong rows; the inverse permutation
    returned. (A uniform instead of k-means++ draw still passes: with every cluster forced to
    S members, a doubly seeded group hands its extra centroid to an unseeded one.)"""
    x_FD, planted_F = _planted(n_clusters=12, size=8, dim=32, noise=0.05, seed=seed)
    assert _same_partition(balanced_kmeans(x_FD, 12, seed=seed), planted_F)
    perm_F = expert_permutation(x_FD, 8, seed=seed)
    assert np.all(planted_F[perm_F].reshape(12, 8) == planted_F[perm_F][::8, None])


def test_cohesion_beats_random_grouping():
    """On random gate-like weights (correlated rows, spread of norms) the experts are more
    cohesive (cosine to their mean direction) than a random balanced grouping, and Lloyd
    iterations lower the k-means cost below the first assignment's. Catches: the inverse
    permutation returned (experts become random sets); no centroid update between
    assignments, or the iteration loop run once."""
    rng = np.random.default_rng(0)
    mix_DD = np.eye(32) + 0.3 * rng.standard_normal((32, 32))
    x_FD = (rng.standard_normal((256, 32)) @ mix_DD) * rng.lognormal(0, 0.5, (256, 1))
    labels_F = np.argsort(expert_permutation(x_FD, 16)) // 16  # expert of each neuron
    random_F = rng.permutation(256) // 16
    assert _cohesion(x_FD, labels_F) > _cohesion(x_FD, random_F) + 0.05
    u_FD = _unit_rows(x_FD)
    assert _inertia(u_FD, balanced_kmeans(u_FD, 16)) < _inertia(
        u_FD, balanced_kmeans(u_FD, 16, iters=1)
    )


def test_expert_permutation_ignores_row_norms():
    """Grouping is by direction: scaling neurons by positive factors changes nothing. Catches:
    a missing L2 normalisation (k-means would then group by norm as much as by direction)."""
    x_FD, _ = _planted(n_clusters=8, size=8, dim=16, noise=0.6, seed=4)
    scale_F1 = np.random.default_rng(5).lognormal(0, 1.0, (64, 1)).astype(np.float32)
    np.testing.assert_array_equal(
        expert_permutation(x_FD * scale_F1, 8), expert_permutation(x_FD, 8)
    )


def test_deterministic_under_seed():
    """The same seed gives the same labels whatever numpy's global random state; clusters are
    numbered by their lowest neuron. Catches: drawing from np.random's global generator;
    cluster ids left in k-means++ draw order."""
    x_FD = np.random.default_rng(6).standard_normal((128, 16)).astype(np.float32)
    np.random.seed(1)
    first_F = balanced_kmeans(x_FD, 16, seed=3)
    np.random.seed(2)
    np.testing.assert_array_equal(balanced_kmeans(x_FD, 16, seed=3), first_F)
    _, first_seen = np.unique(first_F, return_index=True)
    assert np.all(np.diff(first_seen) > 0) and first_F[0] == 0


def _model(n_layers: int = 1) -> TransformerConfig:
    return TransformerConfig(vocab_size=32, d_model=D, n_layers=n_layers)


def _random_weights(module: nnx.Module, seed: int) -> nnx.Module:
    """The module with N(0, 0.3) weights drawn by numpy (eager nnx init compiles per shape)."""
    graphdef, state = nnx.split(module)
    rng = np.random.default_rng(seed)
    pure = nnx.to_pure_dict(state)
    pure = {k: _fill(v, rng) for k, v in pure.items()}
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def _fill(tree, rng):
    if isinstance(tree, dict):
        return {k: _fill(v, rng) for k, v in tree.items()}
    return jnp.asarray(rng.normal(0, 0.3, tree.shape), tree.dtype)


def _permuted(module: nnx.Module, perm, **kw) -> nnx.Module:
    graphdef, state = nnx.split(module)
    nnx.replace_by_pure_dict(state, permute_ffn(nnx.to_pure_dict(state), perm, **kw))
    return nnx.merge(graphdef, state)


def _gate_perm(gate_DF: np.ndarray) -> np.ndarray:
    return expert_permutation(np.asarray(gate_DF).T, S)


def test_permuted_swiglu_matches():
    """The permuted SwiGLU computes the same function, and expert e is columns [e*S, (e+1)*S)
    of the permuted gate. Catches: the down kernel permuted on its D axis or by the inverse
    permutation; up left unpermuted; perm applied as its inverse to the gate."""
    cfg = SwiGLUConfig(hidden_dim=F)
    ffn = _random_weights(nnx.eval_shape(lambda: SwiGLU(cfg, _model(), rngs=nnx.Rngs(0))), 0)
    gate_DF = np.asarray(ffn.gate.kernel[...])
    perm_F = _gate_perm(gate_DF)
    assert not np.array_equal(perm_F, np.arange(F))
    new = _permuted(ffn, perm_F)
    np.testing.assert_array_equal(np.asarray(new.gate.kernel[...]), gate_DF[:, perm_F])
    x_BTD = jnp.asarray(np.random.default_rng(1).standard_normal((2, 5, D)), jnp.float32)
    ctx = Ctx.make(jnp.zeros((2, 5), jnp.int32))
    np.testing.assert_allclose(new(x_BTD, ctx)[0], ffn(x_BTD, ctx)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("per_layer", [True, False])
def test_permuted_stacked_swiglu_matches(per_layer):
    """Scanned layers ([L, D, F] kernels): perm [L, F] permutes each layer by its own row;
    perm [F] with axis_offset=1 permutes all alike. Either way the stack's output is unchanged.
    Catches: layer 0's permutation applied to every layer (the output alone cannot: any
    permutation keeps it; the kernels are compared); the layer axis taken for D."""
    model = _model(n_layers=3)
    cfg = SwiGLUConfig(hidden_dim=F)
    stack = nnx.eval_shape(
        lambda: stack_layers(lambda r: SwiGLU(cfg, model, rngs=r), model, rngs=nnx.Rngs(0))
    )
    stack = _random_weights(stack, 2)
    gate_LDF = np.asarray(stack.gate.kernel[...])
    if per_layer:
        perm, kw = np.stack([_gate_perm(g_DF) for g_DF in gate_LDF]), {}
        assert not np.array_equal(perm[0], perm[1])
    else:
        perm, kw = _gate_perm(gate_LDF[0]), {"axis_offset": 1}
    new = _permuted(stack, perm, **kw)
    perm_LF = np.broadcast_to(perm, (3, F))
    want_LDF = np.stack([g_DF[:, p_F] for g_DF, p_F in zip(gate_LDF, perm_LF, strict=True)])
    np.testing.assert_array_equal(np.asarray(new.gate.kernel[...]), want_LDF)
    x_BTD = jnp.asarray(np.random.default_rng(3).standard_normal((2, 5, D)), jnp.float32)
    ctx = Ctx.make(jnp.zeros((2, 5), jnp.int32))
    want = run_layers(stack, x_BTD, ctx, model)[0]  # float32 rounding of a different sum order
    atol = 1e-6 * float(jnp.abs(want).max())
    np.testing.assert_allclose(run_layers(new, x_BTD, ctx, model)[0], want, rtol=1e-5, atol=atol)


def _ffn_dict(lead=()):
    z = np.zeros
    return {
        "gate": {"kernel": z((*lead, 4, 8))},
        "up": {"kernel": z((*lead, 4, 8))},
        "down": {"kernel": z((*lead, 8, 4))},
    }


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: expert_permutation(np.ones((100, 4)), 32), "F=100 neurons do not split"),
        (lambda: balanced_kmeans(np.ones((8, 4)), 9), "F=8 rows do not split into 9"),
        (lambda: balanced_kmeans(np.ones((8, 4)), 0), "F=8 rows do not split into 0"),
        (lambda: balanced_kmeans(np.ones(8), 2), r"expected vectors \[F, D\]"),
        (lambda: permute_ffn({"gate": {}}, np.arange(8)), r"no \['up', 'down'\]"),
        (lambda: permute_ffn(_ffn_dict(), np.arange(6)), "kernel has F=8, perm 6"),
        (lambda: permute_ffn(_ffn_dict((3,)), np.zeros((2, 8), int)), r"shape \(3, 4, 8\)"),
    ],
)
def test_bad_input_is_one_line_value_error(call, match):
    """Each misuse is a ValueError with a one-line message naming the sizes. Catches: an
    assert or a numpy reshape error in place of the check; a silent wrong split."""
    with pytest.raises(ValueError, match=match) as err:
        call()
    assert "\n" not in str(err.value)
