"""GaLore, Fira and APOLLO against their official PyTorch optimizers (PyPI `galore-torch`,
`fira`, `apollo-torch`): same gradients, same hyperparameters, updates equal to float32
rounding at every step over 2+ refresh periods, for tall, wide and stacked matrices and a
full-rank vector; and our APOLLO projector drawn like the official one."""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest
import torch  # the `test` extra pins it (see pyproject.toml)
from menagerie.train import lowrank
from menagerie.train.lowrank import apollo, galore

from .lowrank_testing import DIMS, LOW, canonical_torch_svd, random_params, run_both

# Largest |ours - official| of a step's update, over the largest |official| entry of that leaf:
# measured (2026-11-30) 2.2e-5 GaLore, 1.1e-5 Fira, 1.2e-5 APOLLO, from float32 rounding (Adam's
# bias correction 1 - 0.999^t in float32 alone is 6e-6 at step 1; the official code computes it
# in float64) and the two LAPACKs' SVDs. The tolerances are about 4x those. Weight decay on the
# old weight instead of the updated one is off by lr * wd = 1e-3 of the update.
RTOL = {"galore": 1e-4, "fira": 5e-5, "apollo": 5e-5}


@pytest.fixture(autouse=True)
def _highest_matmul_precision():
    with jax.default_matmul_precision("highest"):
        yield


def test_galore_matches_official_galore_torch(monkeypatch):
    import galore_torch  # the official GaLoreAdamW (test extra)

    monkeypatch.setattr(torch.linalg, "svd", canonical_torch_svd(torch.linalg.svd))
    rank, gap, lr, wd, steps = 6, 3, 0.01, 0.1, 8  # refreshes at 0, 3, 6: 2+ full periods
    params, tp = random_params(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = galore_torch.GaLoreAdamW(
            [
                {
                    "params": [tp[k] for k in LOW],
                    "rank": rank,
                    "update_proj_gap": gap,
                    "scale": 0.25,
                    "proj_type": "std",
                },
                {"params": [tp["vec"]]},
            ],
            lr=lr,
            weight_decay=wd,
        )
    tx = galore(lr, DIMS, rank=rank, update_proj_gap=gap, scale=0.25, weight_decay=wd)
    state, err = run_both(opt, tp, tx, params, steps, seed=1, rtol=RTOL["galore"])
    print(f"galore: max relative difference {err:.2e}")
    # Projected moments really are low rank: [48, 24] tall -> right side, moments [48, r].
    assert state[0].mu["tall"].shape == (48, rank) and state[0].mu["wide"].shape == (rank, 56)
    assert state[0].mu["stack"].shape == (2, 40, rank)


def test_fira_matches_official_fira(monkeypatch):
    from fira import FiraAdamW  # the official optimizer (test extra)

    monkeypatch.setattr(torch.linalg, "svd", canonical_torch_svd(torch.linalg.svd))
    # alpha != 1 exercises the official residual G - alpha Q Q^T G (see train/lowrank.py).
    rank, gap, lr, wd, alpha, steps = 6, 3, 0.01, 0.1, 0.25, 8
    params, tp = random_params(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = FiraAdamW(
            [
                {
                    "params": [tp[k] for k in LOW],
                    "rank": rank,
                    "update_proj_gap": gap,
                    "alpha": alpha,
                    "proj_type": "std",
                },
                {"params": [tp["vec"]]},
            ],
            lr=lr,
            weight_decay=wd,
        )
    tx = galore(
        lr,
        DIMS,
        rank=rank,
        update_proj_gap=gap,
        scale=alpha,
        weight_decay=wd,
        fira=True,
        norm_growth_limit=1.01,
    )
    state, err = run_both(opt, tp, tx, params, steps, seed=3, rtol=RTOL["fira"])
    print(f"fira: max relative difference {err:.2e}")
    assert np.all(np.asarray(state[0].residual_norm["stack"]) > 0)  # the limiter ran


@pytest.mark.parametrize("scaling", ["channel", "tensor"])
def test_apollo_matches_official_apollo(monkeypatch, scaling):
    import apollo_torch
    from apollo_torch import random_projector

    # The official projector is torch.randn from a per-parameter seed chain; ours is a JAX
    # Gaussian from (seed, matrix index, refresh step). Same distribution, different bits: give
    # the official optimizer our matrices, keeping its own layout ([m, r] left, [r, n] right).
    rank, gap, lr, wd, alpha, steps, proj_seed = 6, 3, 0.01, 0.1, 0.5, 8, 7
    # Their distributions are compared in test_apollo_projector_is_drawn_like_the_official_one.
    # Official seeds number the parameters 1, 2, ... in group order: vec is 1, the matrices 2-5.
    index = {i + 2: i for i in range(len(LOW))}
    calls: dict[int, int] = {}

    def ours(self, weights, rank, type, seed):  # noqa: A002 (the official signature)
        first = self.__dict__.setdefault("_first_seed", seed)
        n = calls[id(self)] = calls.get(id(self), -1) + 1
        k = weights.shape[0 if type == "left" else 1]
        q = np.asarray(lowrank.random_projection(proj_seed, index[first], n * gap, k, rank))
        return torch.tensor(q if type == "left" else q.T)

    monkeypatch.setattr(random_projector.GradientProjector, "get_orthogonal_matrix", ours)
    params, tp = random_params(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = apollo_torch.APOLLOAdamW(
            [
                {"params": [tp["vec"]]},
                {
                    "params": [tp[k] for k in LOW],
                    "rank": rank,
                    "proj": "random",
                    "scale_type": scaling,
                    "scale": alpha**2,  # the official code multiplies by sqrt(scale)
                    "update_proj_gap": gap,
                    "proj_type": "std",
                },
            ],
            lr=lr,
            weight_decay=wd,
        )
    tx = apollo(
        lr,
        DIMS,
        rank=rank,
        update_proj_gap=gap,
        scale=alpha,
        scaling=scaling,
        weight_decay=wd,
        seed=proj_seed,
    )
    _, err = run_both(opt, tp, tx, params, steps, seed=5, rtol=RTOL["apollo"])
    print(f"apollo {scaling}: max relative difference {err:.2e}")
    assert len(calls) == len(LOW) and all(c == (steps - 1) // gap for c in calls.values())


def test_apollo_projector_is_drawn_like_the_official_one():
    """Ours (JAX normal from (seed, matrix index, refresh step), over sqrt(r)) against the
    official `GradientProjector` (torch.randn from a per-parameter seed chain that advances at
    every refresh, over sqrt(r)): the same N(0, 1/r) entries, and a fresh, independent matrix
    for every matrix and every refresh. 8 draws of [512, 8] each; bounds at 5 standard errors."""
    from apollo_torch.random_projector import GradientProjector
    from scipy import stats

    k, r, gap = 512, 8, 3
    official = GradientProjector(rank=r, update_proj_gap=gap, seed=11)
    wide = torch.zeros(k, 2 * k)  # the official code projects a wide matrix from the left: [k, r]
    theirs = []
    for t in range(0, 8 * gap, gap):
        official.project(wide, t)
        theirs.append(official.ortho_matrix.numpy())
    ours = [
        np.asarray(lowrank.random_projection(7, index, step, k, r))
        for index in range(2)
        for step in range(0, 4 * gap, gap)
    ]
    n = len(ours) * k * r
    for name, draws in (("ours", ours), ("official", theirs)):
        assert all(q.shape == (k, r) and q.dtype == np.float32 for q in draws), name
        x = np.concatenate([q.ravel() for q in draws])
        assert abs(x.mean()) < 5 * np.sqrt(1 / r / n), name
        assert abs(x.var() * r - 1) < 5 * np.sqrt(2 / n), name  # variance 1/r
        # Independent draws: no two matrices correlated beyond sampling noise.
        corr = np.corrcoef(np.stack([q.ravel() for q in draws]))
        off_diagonal = corr[~np.eye(len(draws), dtype=bool)]
        assert np.abs(off_diagonal).max() < 5 / np.sqrt(k * r), name
    a = np.concatenate([q.ravel() for q in ours])
    b = np.concatenate([q.ravel() for q in theirs])
    assert stats.ks_2samp(a, b).pvalue > 1e-3  # the same distribution, not only two moments
