"""Schedules and the weight-decay mask."""

import numpy as np
import pytest
from menagerie.train.optim import AdamWConfig, decay_mask, make_schedule


def _lrs(cfg, total):
    sched = make_schedule(cfg, total)
    return np.array([float(sched(s)) for s in range(total + 1)])


def test_warmup_cosine():
    """Linear warmup from 0 to lr, then cosine from lr down to lr * min_lr_ratio at the last
    step (lr != 1, so a ratio taken as an absolute lr shows)."""
    cfg = AdamWConfig(lr=2.0, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    lr = _lrs(cfg, 100)
    np.testing.assert_allclose(lr[:11], np.linspace(0, 2, 11), atol=1e-6)
    progress = (np.arange(10, 101) - 10) / 90
    np.testing.assert_allclose(lr[10:], 0.2 + 0.9 * (1 + np.cos(np.pi * progress)), atol=1e-5)


def test_warmup_stable_decay():
    """Warmup, the peak held, then linear decay to lr * min_lr_ratio over the last
    decay_fraction of the run."""
    cfg = AdamWConfig(lr=2.0, warmup_steps=10, min_lr_ratio=0.1, schedule="wsd", decay_fraction=0.2)
    lr = _lrs(cfg, 100)
    np.testing.assert_allclose(lr[:11], np.linspace(0, 2, 11), atol=1e-6)
    np.testing.assert_allclose(lr[10:81], 2.0, atol=1e-6)  # stable until the last 20%
    np.testing.assert_allclose(lr[80:], np.linspace(2, 0.2, 21), atol=1e-6)


def test_constant_schedule():
    """Linear warmup from 0 to lr, then lr to the end."""
    lr = _lrs(AdamWConfig(lr=2.0, warmup_steps=4, schedule="constant"), 10)
    np.testing.assert_allclose(lr, [0, 0.5, 1, 1.5] + [2.0] * 7, atol=1e-6)


@pytest.mark.parametrize("schedule", ["cosine", "constant", "wsd"])
def test_warmup_longer_than_the_run_is_clamped_to_it(schedule):
    """warmup_steps > train.steps: the warmup is clamped to the run, so lr rises linearly over
    the whole run to its peak at step train.steps (not to 10/50 of it), and the phases after
    the warmup, zero steps long, divide by nothing."""
    cfg = AdamWConfig(lr=2.0, warmup_steps=50, min_lr_ratio=0.1, schedule=schedule)
    np.testing.assert_allclose(_lrs(cfg, 10), np.linspace(0, 2, 11), atol=1e-6)


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
