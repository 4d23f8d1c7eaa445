"""A toy FFN part, written the way a user adds one: this one file, nothing else edited.

    model:
      ffn: {kind: toy_relu2, hidden_dim: 96}
    imports: [toy_part]          # with this folder on PYTHONPATH

y = down(relu(up(x) + bias)^2) (the squared-ReLU FFN of So et al. 2021, "Primer"), with its own
logical axis for the hidden width, a bias vector, an aux loss and a metric.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx
from menagerie.arch import FFNConfig
from menagerie.arch.axes import Axis, declare
from menagerie.arch.layers import ACT_EMBED, BATCH, SEQ, constrain, dtype_of, linear, param

declare(Axis("toy_hidden", "feature", "tensor", lowrank=True, doc="toy FFN hidden width"))


class ToyReLU2Config(FFNConfig):
    """Squared-ReLU FFN with a bias."""

    kind: Literal["toy_relu2"] = "toy_relu2"
    """Selects this FFN."""
    hidden_dim: int = 96
    """Hidden width F."""
    activation_l2: float = 1e-4
    """Weight of the aux loss mean(h^2) on the hidden activations."""

    def build(self, model, *, rngs):
        return ToyReLU2(self, model, rngs=rngs)

    def num_params(self, model) -> int:
        """up [D,F] + down [F,D] + bias [F]."""
        return 2 * model.d_model * self.hidden_dim + self.hidden_dim

    def flops_per_token(self, model, seq_len: int) -> float:
        """6 * 2 D F (two matmuls)."""
        return float(6 * 2 * model.d_model * self.hidden_dim)


class ToyReLU2(nnx.Module):
    def __init__(self, cfg: ToyReLU2Config, model, *, rngs: nnx.Rngs):
        d, f = model.d_model, cfg.hidden_dim
        self.up = linear(model, d, f, ("embed", "toy_hidden"), rngs=rngs)
        self.down = linear(model, f, d, ("toy_hidden", "embed"), rngs=rngs)
        self.bias = param(rngs, (f,), ("toy_hidden",), std=0.0, dtype=dtype_of(model.param_dtype))
        self.activation_l2 = cfg.activation_l2

    def __call__(self, x_BTD, ctx):
        del ctx
        h_BTF = jnp.square(jax.nn.relu(self.up(x_BTD) + self.bias[...]))
        y_BTD = constrain(self.down(h_BTF), (BATCH, SEQ, ACT_EMBED))
        aux = {
            "aux_loss": self.activation_l2 * jnp.mean(jnp.square(h_BTF.astype(jnp.float32))),
            "active": jnp.mean((h_BTF > 0).astype(jnp.float32)),
        }
        return y_BTD, aux
