"""Schedules and the weight-decay mask."""

import numpy as np
import pytest
from menagerie.train.optim import AdamWConfig, decay_mask, make_schedule


def _lrs(cfg, total):
    sched = make_schedule(cfg, total)
    return np.array([float(sched(s)) for s in range(total + 1)])


def test_warmup_cosine():
    cfg = AdamWConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    lr = _lrs(cfg, 100)
    np.testing.assert_allclose(lr[:11], np.linspace(0, 1, 11), atol=1e-6)
    assert np.all(np.diff(lr[10:]) <= 1e-7)  # non-increasing after warmup
    assert lr[100] == pytest.approx(0.1, abs=1e-6)
    assert lr[55] == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-3)  # cosine midpoint


def test_warmup_stable_decay():
    cfg = AdamWConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    lr = _lrs(cfg, 100)
    np.testing.assert_allclose(lr[10:81], 1.0, atol=1e-6)  # stable until the last 20%
    np.testing.assert_allclose(lr[80:], np.linspace(1, 0, 21), atol=1e-6)


def test_constant_and_warmup_longer_than_run():
    lr = _lrs(AdamWConfig(lr=2.0, warmup_steps=4, schedule="constant"), 10)
    np.testing.assert_allclose(lr, [0, 0.5, 1, 1.5] + [2.0] * 7, atol=1e-6)
    lr = _lrs(AdamWConfig(lr=1.0, warmup_steps=50, schedule="cosine"), 10)
    assert np.all(np.isfinite(lr)) and lr.max() <= 1.0


def test_decay_mask_by_logical_names():
    names = {
        "embed": {"table": ("vocab", "embed")},
        "blocks": {
            "attn": {"q": {"kernel": ("layers", "embed", "heads", "head_dim")}},
            "norm": {"scale": ("layers", "norm")},
        },
        "final_norm": {"scale": ("norm",)},
    }
    mask = decay_mask(names)
    assert mask == {
        "embed": {"table": True},
        "blocks": {"attn": {"q": {"kernel": True}}, "norm": {"scale": False}},
        "final_norm": {"scale": False},
    }
