"""The train step hands every part the whole call context (step, targets, loss mask, training
flag), and parts' aux losses and metrics reach the loss and the logged metrics."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from menagerie.arch import SwiGLU, SwiGLUConfig, TransformerConfig, build
from menagerie.train.step import make_train_step

from ..jit_testing import quick_jit


class CtxProbe(SwiGLU):
    """SwiGLU that reports what it was given through aux."""

    def __call__(self, x_BTD, ctx):
        y_BTD, _ = super().__call__(x_BTD, ctx)
        aux = {
            "step": ctx.step.astype(jnp.float32),
            "target_sum": jnp.sum(ctx.targets * ctx.loss_mask).astype(jnp.float32),
            "training": jnp.float32(not ctx.deterministic),
            "aux_loss": jnp.float32(0.25),
        }
        return y_BTD, aux


class CtxProbeConfig(SwiGLUConfig):
    kind: str = "ctx_probe"

    def build(self, model, *, rngs):
        return CtxProbe(self, model, rngs=rngs)


def _setup():
    cfg = TransformerConfig(vocab_size=64, d_model=32, n_layers=2, ffn=CtxProbeConfig())
    graphdef, params = nnx.split(build(cfg, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(params)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 64, (4, 8)), jnp.int32)
    batch = {
        "tokens": tokens,
        "targets": jnp.roll(tokens, -1, axis=1),
        "positions": jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (4, 8)),
        "segment_ids": jnp.ones((4, 8), jnp.int32),
        "loss_mask": jnp.asarray(rng.integers(0, 2, (4, 8)), jnp.float32),
    }
    return graphdef, params, batch


@pytest.mark.parametrize("microbatches", [1, 2])
def test_parts_see_the_step_targets_and_mask(microbatches):
    graphdef, params, batch = _setup()
    opt = optax.adamw(1e-3)
    step_fn = make_train_step(
        graphdef, opt, lambda s: 1e-3, microbatches=microbatches, z_loss=0.0, clip_norm=None
    )
    state = {
        "step": jnp.int32(7),
        "params": params,
        "opt_state": opt.init(params),
        "bad_steps": jnp.int32(0),
        "skipped": jnp.int32(0),
    }
    _, m = quick_jit(step_fn)(state, batch)
    assert float(m["model/ffn/step"]) == 7.0
    assert float(m["model/ffn/training"]) == 1.0
    # Microbatch metrics are averaged: each microbatch sees its share of the targets.
    expected = float(jnp.sum(batch["targets"] * batch["loss_mask"])) / microbatches
    assert float(m["model/ffn/target_sum"]) == pytest.approx(expected)
    assert float(m["aux_loss"]) == pytest.approx(0.5)  # 2 layers x 0.25, in the loss
