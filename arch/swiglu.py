"""The SwiGLU FFN: down(silu(gate(x)) * up(x)) (Shazeer 2020, as in Llama)."""

from __future__ import annotations

from typing import ClassVar, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from .axes import Axis, declare
from .config import ModelConfig, check_positive, round_up
from .layers import ACT_EMBED, ACT_MLP, BATCH, SEQ, constrain, linear
from .parts import Aux, Ctx, FFNConfig

declare(Axis("mlp", "feature", "tensor", lowrank=True, doc="FFN hidden width"))


class SwiGLUConfig(FFNConfig):
    """Gated FFN with a SiLU gate; hidden width by Llama's 8/3 rule unless set."""

    neuron_ffn: ClassVar[bool] = True  # hidden/project/expert_weights: LTE can wrap it

    kind: Literal["swiglu"] = "swiglu"
    """Selects this FFN."""
    hidden_dim: int | None = None
    """Hidden width F. None: Llama's rule, 8/3 * d_model rounded up to `hidden_multiple`."""
    hidden_multiple: int = 256
    """Multiple the default hidden width is rounded up to."""

    def dim(self, model: ModelConfig) -> int:
        """The hidden width F."""
        if self.hidden_dim is not None:
            return self.hidden_dim
        return round_up(int(8 * model.d_model / 3), self.hidden_multiple)

    def check(self, model: ModelConfig) -> None:
        check_positive(self, "model.ffn.", ints=("hidden_dim", "hidden_multiple"))

    def build(self, model: ModelConfig, *, rngs: nnx.Rngs) -> SwiGLU:
        return SwiGLU(self, model, rngs=rngs)

    def num_params(self, model: ModelConfig) -> int:
        """gate, up [D,F] + down [F,D] = 3 D F."""
        return 3 * model.d_model * self.dim(model)

    def flops_per_token(self, model: ModelConfig, seq_len: int) -> float:
        """6 * 3 D F (three matmuls; elementwise gating counts nothing)."""
        return float(6 * self.num_params(model))


class SwiGLU(nnx.Module):
    """FFN down(silu(gate(x)) * up(x)), split as `project(hidden(x))` for parts that act on the
    hidden neurons (`arch.lte`)."""

    activation = "swiglu"  # the `kernels.sparse_ffn` activation of `expert_weights`

    def __init__(self, cfg: SwiGLUConfig, model: ModelConfig, *, rngs: nnx.Rngs):
        d, f = model.d_model, cfg.dim(model)
        self.gate = linear(model, d, f, ("embed", "mlp"), rngs=rngs)
        self.up = linear(model, d, f, ("embed", "mlp"), rngs=rngs)
        self.down = linear(model, f, d, ("mlp", "embed"), rngs=rngs)

    def hidden(self, x_BTD: jax.Array) -> jax.Array:
        """The F hidden neurons silu(gate(x)) * up(x)."""
        h_BTF = jax.nn.silu(self.gate(x_BTD)) * self.up(x_BTD)
        return constrain(h_BTF, (BATCH, SEQ, ACT_MLP))

    def project(self, h_BTF: jax.Array) -> jax.Array:
        """down(h): the hidden neurons back to the residual width."""
        return constrain(self.down(h_BTF), (BATCH, SEQ, ACT_EMBED))

    def expert_weights(self) -> tuple[jax.Array, jax.Array]:
        """(w_in [2,F,D] = gate, up, neuron-major; w_out [F,D]) as `kernels.sparse_ffn` takes
        them (a transposed copy of the kernels; a leading layer axis when stacked)."""
        w_in_KDF = jnp.stack([self.gate.kernel[...], self.up.kernel[...]], axis=-3)
        return jnp.swapaxes(w_in_KDF, -1, -2), self.down.kernel[...]

    def __call__(self, x_BTD: jax.Array, ctx: Ctx) -> tuple[jax.Array, Aux]:
        del ctx
        with jax.named_scope("ffn"):
            return self.project(self.hidden(x_BTD)), {}
