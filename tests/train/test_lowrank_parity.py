"""GaLore, Fira and APOLLO against their official PyTorch optimizers (PyPI `galore-torch`,
`fira`, `apollo-torch`): same gradients, same hyperparameters, updates equal within 1e-5
(float32) at every step over 2+ refresh periods, for tall, wide and stacked matrices and a
full-rank vector."""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest
import torch  # the `test` extra pins it (see pyproject.toml)
from menagerie.train import lowrank
from menagerie.train.lowrank import apollo, galore

from .lowrank_testing import DIMS, LOW, canonical_torch_svd, random_params, run_both


@pytest.fixture(autouse=True)
def _highest_matmul_precision():
    with jax.default_matmul_precision("highest"):
        yield


def test_galore_matches_official_galore_torch(monkeypatch):
    import galore_torch  # the official GaLoreAdamW (test extra)

    monkeypatch.setattr(torch.linalg, "svd", canonical_torch_svd(torch.linalg.svd))
    rank, gap, lr, wd, steps = 6, 3, 0.01, 0.05, 8  # refreshes at 0, 3, 6: 2+ full periods
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
    state = run_both(opt, tp, tx, params, steps, seed=1)
    # Projected moments really are low rank: [48, 24] tall -> right side, moments [48, r].
    assert state[0].mu["tall"].shape == (48, rank) and state[0].mu["wide"].shape == (rank, 56)
    assert state[0].mu["stack"].shape == (2, 40, rank)


def test_fira_matches_official_fira(monkeypatch):
    from fira import FiraAdamW  # the official optimizer (test extra)

    monkeypatch.setattr(torch.linalg, "svd", canonical_torch_svd(torch.linalg.svd))
    # alpha != 1 exercises the official residual G - alpha Q Q^T G (see train/lowrank.py).
    rank, gap, lr, wd, alpha, steps = 6, 3, 0.01, 0.05, 0.25, 8
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
    state = run_both(opt, tp, tx, params, steps, seed=3)
    assert np.all(np.asarray(state[0].residual_norm["stack"]) > 0)  # the limiter ran


@pytest.mark.parametrize("scaling", ["channel", "tensor"])
def test_apollo_matches_official_apollo(monkeypatch, scaling):
    import apollo_torch
    from apollo_torch import random_projector

    # The official projector is torch.randn from a per-parameter seed chain; ours is a JAX
    # Gaussian from (seed, matrix index, refresh step). Same distribution, different bits: give
    # the official optimizer our matrices, keeping its own layout ([m, r] left, [r, n] right).
    rank, gap, lr, wd, alpha, steps, proj_seed = 6, 3, 0.01, 0.05, 0.5, 8, 7
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
    run_both(opt, tp, tx, params, steps, seed=5)
    assert len(calls) == len(LOW) and all(c == (steps - 1) // gap for c in calls.values())
