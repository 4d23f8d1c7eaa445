"""The SwiGLU FFN: down(silu(gate(x)) * up(x)) (Shazeer 2020, as in Llama)."""

from __future__ import annotations

from typing import Literal

import jax
from flax import nnx

from .axes import Axis, declare
from .config import ModelConfig, check_positive, round_up
from .layers import ACT_EMBED, ACT_MLP, BATCH, SEQ, constrain, linear
from .parts import Aux, Ctx, FFNConfig

declare(Axis("mlp", "feature", "tensor", lowrank=True, doc="FFN hidden width"))


class SwiGLUConfig(FFNConfig):
    """Gated FFN with a SiLU gate; hidden width by Llama's 8/3 rule unless set."""

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
    """FFN down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: SwiGLUConfig, model: ModelConfig, *, rngs: nnx.Rngs):
        d, f = model.d_model, cfg.dim(model)
        self.gate = linear(model, d, f, ("embed", "mlp"), rngs=rngs)
        self.up = linear(model, d, f, ("embed", "mlp"), rngs=rngs)
        self.down = linear(model, f, d, ("mlp", "embed"), rngs=rngs)

    def __call__(self, x_BTD: jax.Array, ctx: Ctx) -> tuple[jax.Array, Aux]:
        del ctx
        with jax.named_scope("ffn"):
            h_BTF = jax.nn.silu(self.gate(x_BTD)) * self.up(x_BTD)
            h_BTF = constrain(h_BTF, (BATCH, SEQ, ACT_MLP))
            y_BTD = constrain(self.down(h_BTF), (BATCH, SEQ, ACT_EMBED))
        return y_BTD, {}
