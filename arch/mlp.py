"""The two-matrix MLP FFN: down(gelu(up(x))) (GPT-2, BERT, RoBERTa: the FFNs LTE was first
applied to). GELU is the exact erf form, as torch.nn.GELU() computes it."""

from __future__ import annotations

from typing import ClassVar, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from .axes import Axis, declare
from .config import ModelConfig, check_positive
from .layers import ACT_EMBED, ACT_MLP, BATCH, SEQ, constrain, linear
from .parts import Aux, Ctx, FFNConfig

declare(Axis("mlp", "feature", "tensor", lowrank=True, doc="FFN hidden width"))


class MLPConfig(FFNConfig):
    """Ungated FFN with a GELU; hidden width 4 d_model unless set."""

    neuron_ffn: ClassVar[bool] = True  # hidden/project/expert_weights: LTE can wrap it

    kind: Literal["mlp"] = "mlp"
    """Selects this FFN."""
    hidden_dim: int | None = None
    """Hidden width F. None: 4 * d_model."""

    def dim(self, model: ModelConfig) -> int:
        """The hidden width F."""
        return 4 * model.d_model if self.hidden_dim is None else self.hidden_dim

    def check(self, model: ModelConfig) -> None:
        check_positive(self, "model.ffn.", ints=("hidden_dim",))

    def build(self, model: ModelConfig, *, rngs: nnx.Rngs) -> MLP:
        return MLP(self, model, rngs=rngs)

    def num_params(self, model: ModelConfig) -> int:
        """up [D,F] + down [F,D] = 2 D F."""
        return 2 * model.d_model * self.dim(model)

    def flops_per_token(self, model: ModelConfig, seq_len: int) -> float:
        """6 * 2 D F (two matmuls)."""
        return float(6 * self.num_params(model))


class MLP(nnx.Module):
    """FFN down(gelu(up(x))), split as `project(hidden(x))` like `SwiGLU`."""

    activation = "gelu"  # the `kernels.sparse_ffn` activation of `expert_weights`

    def __init__(self, cfg: MLPConfig, model: ModelConfig, *, rngs: nnx.Rngs):
        d, f = model.d_model, cfg.dim(model)
        self.up = linear(model, d, f, ("embed", "mlp"), rngs=rngs)
        self.down = linear(model, f, d, ("mlp", "embed"), rngs=rngs)

    def hidden(self, x_BTD: jax.Array) -> jax.Array:
        """The F hidden neurons gelu(up(x))."""
        return constrain(jax.nn.gelu(self.up(x_BTD), approximate=False), (BATCH, SEQ, ACT_MLP))

    def project(self, h_BTF: jax.Array) -> jax.Array:
        """down(h)."""
        return constrain(self.down(h_BTF), (BATCH, SEQ, ACT_EMBED))

    def expert_weights(self) -> tuple[jax.Array, jax.Array]:
        """(w_in [1,F,D] = up, neuron-major; w_out [F,D]) as `kernels.sparse_ffn` takes them
        (a transposed copy of the kernel; a leading layer axis when stacked)."""
        w_in_KFD = jnp.swapaxes(self.up.kernel[...], -1, -2)
        return jnp.expand_dims(w_in_KFD, -3), self.down.kernel[...]

    def __call__(self, x_BTD: jax.Array, ctx: Ctx) -> tuple[jax.Array, Aux]:
        del ctx
        with jax.named_scope("ffn"):
            return self.project(self.hidden(x_BTD)), {}
