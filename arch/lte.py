"""LTE: learned structured sparsity for any neuron FFN (Zheng et al., NeurIPS 2024, arXiv
2402.06126), usable from step 0 of pretraining as well as on a converted dense run.

The F hidden neurons of the wrapped FFN (`inner`: SwiGLU or the GELU MLP, any part whose config
sets `neuron_ffn` and whose module has `hidden` / `project` / `expert_weights`) form E = F / S
contiguous experts of S = `expert_size` neurons. A router gives each token and expert a score
G = sigmoid(x W_g + b) and the FFN is

    stage 1 (soft):  project(hidden(x) * G repeated over each expert's neurons)
    stage 2 (hard):  the same with G replaced by 1{G > tau}; routers frozen

so a token uses a varying number of experts (no top-k). Stage 1 adds through `aux_loss`
    eta * L_eff + lambda * L_sep,  L_eff = mean G^2,  L_sep = mean 1 / ((G - tau)^2 + sep_eps)
(means over layers, tokens and experts: the paper's (1/LN) sums). Stage 2 starts at train step
`hard_from_step`, read from the call context; the trainer zeroes the routers' updates from that
step on (`update_rules`), so Adam's momentum and weight decay cannot move them either.

Outside training (`ctx.step` None: generation, export) a model with `hard_from_step` routes hard,
and then runs `kernels.sparse_ffn`, which computes only the active experts' blocks; with the step
given (training, eval) the FFN is the masked dense computation, the same function. The kernel
reads the input matrices neuron-major; generation stores that copy once (`prepare_inference`).

Two baselines route over the same experts, so sparsity and quality compare on equal terms:
- `routing: topk`, MoE: each token takes its `top_k` highest scores, weighted by G (sigmoid
  gating as in DeepSeek-V3), trained through the task loss, no auxiliary loss, no stage 2.
- `routing: dejavu`, a Deja Vu-style predictor (Liu et al. 2023): a low-rank linear map
  x W1 W2 (rank `predictor_rank`, no nonlinearity, as the official `sparse_predictor`) trained
  with binary cross-entropy to predict the `top_k` experts whose hidden activations have the
  largest norm (at expert, not neuron, granularity: Deja Vu labels ReLU neurons that fire, which
  a SwiGLU has none of; its attention labels are likewise the top heads by output norm). Stage
  1 runs the dense FFN, so the labels are the dense model's own activations, and trains the
  predictor beside the model; from `hard_from_step` each token uses the predictor's top_k
  experts (weight 1) and the predictor is frozen. Deja Vu trains its predictor on a frozen
  model; here the model keeps training, as LTE's does in its stage 2.

Metrics per layer: `density` (fraction of experts active, i.e. G > tau, also during stage 1,
logged per layer and averaged), `routing_spread` (0 when the routing is a static pruning, each
expert on for every token of the batch or for none; logged per layer and averaged),
`efficiency_loss`, `separability_loss`, and `flops_saved` (the
training FLOPs per token the dense count includes but the active experts do not need; the
trainer logs the model's active FLOPs per token beside the dense `flops_per_token`).

Choices the paper and its README leave open (the code is unreleased), said here:
- L_eff squares the scores (the formula's |G|^2; the prose says "mean of expert scores").
- L_sep adds `sep_eps` to (G - tau)^2: the paper's 1 / (G - tau)^2 is unbounded at G = tau.
  It is a barrier that pushes each score away from tau, to whichever side it is on, while
  L_eff pulls all of them down.
- The router is a torch.nn.Linear as initialised by default (weight U(+-1/sqrt(D)); the bias
  is `router_bias_init`, default 0), so scores start spread around tau and differ by token.
- From scratch, lambda ramps up over stage 1 (`separability_ramp`). L_sep is a barrier no
  score crosses once it is on: at full weight from step 0 it fixes each expert on or off by
  its initial score (measured: a static pruning of ~55% of the experts, and with global-norm
  clipping its early gradients starved the task loss). The ramp stops the starving but not the
  pruning: on the stdlib bench (README) every from-scratch run with L_sep ended with each
  expert of layers 1-3 on for every token or for none (`routing_spread` 0), the same experts
  whatever eta, the routers' learning rate or bias, and even at lambda 0.05. Per unit weight,
  the barrier's gradient in G reaches 650 (at |G - tau| = sqrt(sep_eps / 3)); L_eff's is at
  most 2. Without L_sep (`separability: 0`) the routing stays per token. The bench's
  from-scratch recipe is lambda 0, eta 0.001 and `router_bias_init` 1 (from a bias of 0 the
  middle layers closed most of their experts: density 0.3). This departs from the paper, whose
  stage 1 always has L_sep: scores are not pushed apart before the switch to hard routing, and
  stage 2 trains the model through the change. A converted dense run keeps some per-token
  routing with L_sep (spread 0.11-0.21 on the bench), but converted without it (eta 0.02) it
  came closer to the dense model at a lower density (README). Watch `routing_spread`.
- All tokens count in the losses and metrics (padding too).
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax
import pydantic
from flax import nnx

from .axes import Axis, declare
from .config import ModelConfig, check_positive
from .layers import Linear, dtype_of, param
from .parts import Aux, Ctx, FFNConfig, UpdateRule
from .swiglu import SwiGLUConfig

declare(
    Axis("lte_expert", "feature", None, doc="LTE experts of an FFN (router outputs)"),
    Axis("lte_rank", "feature", None, doc="inner width of the dejavu predictor"),
)


class LTEConfig(FFNConfig):
    """An FFN split into experts of `expert_size` neurons, each token routed to a learned,
    varying subset (the module docstring has the method)."""

    kind: Literal["lte"] = "lte"
    """Selects this FFN."""
    inner: pydantic.SerializeAsAny[FFNConfig] = SwiGLUConfig()
    """The wrapped FFN (`kind`: swiglu or mlp), whose hidden neurons form the experts."""
    expert_size: int = 32
    """Neurons per expert S; must divide the inner FFN's hidden width."""
    routing: Literal["threshold", "topk", "dejavu"] = "threshold"
    """threshold: LTE (G > tau, varying count); topk: the MoE baseline; dejavu: the Deja Vu
    predictor baseline (both `top_k` experts per token)."""
    top_k: int | None = None
    """Experts per token with routing topk or dejavu (required there, not with threshold)."""
    predictor_rank: int = 64
    """Rank of the dejavu predictor x W1 W2."""
    predictor_weight: float = 1.0
    """Weight of the dejavu predictor's cross-entropy in stage 1."""
    eta: float = 0.1
    """Weight of the efficiency loss L_eff in stage 1 (sets the reached sparsity)."""
    separability: float = 0.5
    """Weight lambda of the separability loss L_sep in stage 1."""
    separability_ramp: bool = True
    """Grow lambda linearly from 0 at step 0 to its value at `hard_from_step` (false, or no
    `hard_from_step`: constant, as in the paper's fine-tuning)."""
    tau: float = 0.5
    """Score threshold of hard routing."""
    sep_eps: float = 1e-2
    """Added to (G - tau)^2 in L_sep (bounds the barrier at tau by 1 / sep_eps)."""
    router_bias_init: float = 0.0
    """Initial router bias (0: scores start around tau)."""
    router_lr_scale: float = 1.0
    """The routers' learning rate as a multiple of the model's (the official fine-tuning gave
    them 0.01 against 1.5e-5 to 5e-5 for the model)."""
    hard_from_step: int | None = None
    """Train step from which routing is hard and the routers frozen (stage 2); None: stage 1
    throughout."""
    all_experts: bool = False
    """Every gate 1: exactly the inner FFN (e.g. to check a conversion from a dense run)."""
    impl: Literal["auto", "gather", "pallas", "interpret", "reference"] = "auto"
    """`kernels.sparse_ffn` implementation of hard routing outside training (auto, reference,
    gather, interpret, pallas)."""

    def n_experts(self, model: ModelConfig) -> int:
        """E = F / expert_size."""
        return self.inner.dim(model) // self.expert_size

    def check(self, model: ModelConfig) -> None:
        if not getattr(type(self.inner), "neuron_ffn", False):
            raise ValueError(
                f"model.ffn.inner.kind={self.inner.kind!r} has no hidden neurons to group into "
                "experts; use swiglu or mlp"
            )
        self.inner.check(model)
        ints = ("expert_size", "top_k", "hard_from_step", "predictor_rank")
        check_positive(self, "model.ffn.", ints=ints)
        check_positive(self, "model.ffn.", floats=("sep_eps", "router_lr_scale"))
        f = self.inner.dim(model)
        if f % self.expert_size:
            raise ValueError(
                f"model.ffn.expert_size={self.expert_size} does not divide the inner FFN's "
                f"hidden width {f}; pick a divisor or set model.ffn.inner.hidden_dim"
            )
        self._check_routing(model)

    def _check_routing(self, model: ModelConfig) -> None:
        if not 0 < self.tau < 1 or min(self.eta, self.separability, self.predictor_weight) < 0:
            raise ValueError(
                "model.ffn: tau must be in (0, 1); eta, separability, predictor_weight >= 0"
            )
        if self.routing == "threshold":
            if self.top_k is not None:
                raise ValueError("model.ffn.top_k is for routing=topk; remove it or set routing")
            return
        if self.top_k is None or self.top_k > self.n_experts(model):
            raise ValueError(
                f"model.ffn.routing={self.routing} needs model.ffn.top_k in "
                f"1..{self.n_experts(model)}"
            )
        if self.routing == "topk" and self.hard_from_step is not None:
            raise ValueError("model.ffn.hard_from_step is for routing=threshold or dejavu")
        if self.routing == "dejavu" and self.hard_from_step is None:
            raise ValueError(
                "model.ffn.routing=dejavu needs model.ffn.hard_from_step (the step from which "
                "the trained predictor routes)"
            )

    def build(self, model: ModelConfig, *, rngs: nnx.Rngs) -> LTE:
        return LTE(self, model, rngs=rngs)

    def router_matrix_params(self, model: ModelConfig) -> int:
        """W_g [D,E], or the dejavu predictor's W1 [D,r] and W2 [r,E]."""
        d, e, r = model.d_model, self.n_experts(model), self.predictor_rank
        return d * e if self.routing != "dejavu" else d * r + r * e

    def num_params(self, model: ModelConfig) -> int:
        """The inner FFN + the router's matrices and its bias [E]."""
        router = self.router_matrix_params(model) + self.n_experts(model)
        return self.inner.num_params(model) + router

    def flops_per_token(self, model: ModelConfig, seq_len: int) -> float:
        """Dense: the inner FFN's + 6 x the router's matrix parameters."""
        return self.inner.flops_per_token(model, seq_len) + 6 * self.router_matrix_params(model)

    def update_rules(self, model: ModelConfig) -> dict[str, UpdateRule]:
        """The routers (the parameters with their axis) learn at `router_lr_scale` times the
        model's rate, and are frozen from `hard_from_step` on (no rule when neither applies)."""
        rule = UpdateRule(scale=self.router_lr_scale, frozen_from=self.hard_from_step)
        if rule == UpdateRule():
            return {}
        return {"lte_expert": rule, "lte_rank": rule}


class InferenceCopy(nnx.Variable):
    """Weights derived from parameters in the layout an inference kernel reads: not a
    `nnx.Param`, so nothing trains or saves it; made by `LTE.prepare_inference`."""


class LTE(nnx.Module):
    """The inner FFN with a router over its experts (see the module docstring)."""

    def __init__(self, cfg: LTEConfig, model: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        e, dtype = cfg.n_experts(model), dtype_of(model.param_dtype)
        self.inner = cfg.inner.build(model, rngs=rngs)
        # torch.nn.Linear's default init, U(+-1/sqrt(fan_in)): logits of O(1) that differ by
        # token from the start (an N(0, init_std) router gives every token the same ~0 scores).
        init = jax.nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
        kw = dict(std=None, init=init, param_dtype=dtype, compute_dtype=jnp.float32, rngs=rngs)
        if cfg.routing == "dejavu":
            r = cfg.predictor_rank
            self.router = Linear(model.d_model, r, ("embed", "lte_rank"), **kw)
            self.router_out = Linear(r, e, ("lte_rank", "lte_expert"), **kw)
        else:
            self.router = Linear(model.d_model, e, ("embed", "lte_expert"), **kw)
        bias_init = jax.nn.initializers.constant(cfg.router_bias_init)
        self.router_bias = param(rngs, (e,), ("lte_expert",), std=None, dtype=dtype, init=bias_init)
        self.n_layers = model.n_layers
        self.inner_flops = cfg.inner.flops_per_token(model, 1)
        self.inference_w_in = nnx.data(None)  # `prepare_inference` sets it

    def prepare_inference(self) -> None:
        """Stores the inner FFN's input matrices neuron-major (`InferenceCopy`), as
        `kernels.sparse_ffn` reads them, so the sparse path does not transpose them on every
        call (generation calls this once, on its own copy of the model). The copy goes stale
        if the parameters change afterwards: call it again then. Nothing to do when generation
        runs the masked path (no hard routing, or every expert on)."""
        if self._hard(None) is True and not self.cfg.all_experts:
            self.inference_w_in = InferenceCopy(self.inner.expert_weights()[0])

    def logits(self, x_BTD: jax.Array) -> jax.Array:
        """x W_g + b (dejavu: x W1 W2 + b): [B,T,E] float32."""
        z_BTE = self.router(x_BTD)
        if self.cfg.routing == "dejavu":
            z_BTE = self.router_out(z_BTE)
        return z_BTE + self.router_bias[...].astype(jnp.float32)

    def scores(self, x_BTD: jax.Array) -> jax.Array:
        """G = sigmoid(logits): [B,T,E] float32."""
        return jax.nn.sigmoid(self.logits(x_BTD))

    def __call__(self, x_BTD: jax.Array, ctx: Ctx) -> tuple[jax.Array, Aux]:
        with jax.named_scope("lte"):
            z_BTE = self.logits(x_BTD)
            g_BTE, hard = jax.nn.sigmoid(z_BTE), self._hard(ctx.step)
            gate_BTE, active_BTE = self._route(g_BTE, hard)
            aux = self._aux(g_BTE, active_BTE, hard, ctx.step)
            if ctx.step is None and hard is True and not self.cfg.all_experts:
                return self._sparse(x_BTD, active_BTE), aux
            h_BTF = self.inner.hidden(x_BTD)
            if self.cfg.routing == "dejavu":
                aux |= self._predictor_aux(z_BTE, h_BTF, active_BTE, hard)
            return self._masked(h_BTF, gate_BTE), aux

    def _hard(self, step: jax.Array | None) -> Any:
        """Whether routing is hard: a Python bool without a step, else a traced bool."""
        start = self.cfg.hard_from_step
        if self.cfg.routing == "topk" or start is None:
            return False
        return True if step is None else step >= start

    def _route(self, g_BTE: jax.Array, hard: Any) -> tuple[jax.Array, jax.Array]:
        """(gate values multiplying each expert, active mask float32), both [B,T,E]."""
        cfg = self.cfg
        if cfg.all_experts:
            ones = jnp.ones_like(g_BTE)
            return ones, ones
        if cfg.routing == "topk":
            active = topk_mask(g_BTE, cfg.top_k)
            return g_BTE * active, active
        if cfg.routing == "dejavu":  # stage 1 dense, stage 2 the predicted experts
            active = topk_mask(g_BTE, cfg.top_k)
            return jnp.where(hard, active, jnp.ones_like(active)), active
        active = (g_BTE > cfg.tau).astype(jnp.float32)
        if hard is False:
            return g_BTE, active
        return jnp.where(hard, active, g_BTE), active

    def _masked(self, h_BTF: jax.Array, gate_BTE: jax.Array) -> jax.Array:
        """The dense FFN's output from its hidden neurons, each expert's scaled by its gate."""
        gate_BTF = jnp.repeat(gate_BTE, self.cfg.expert_size, axis=-1).astype(h_BTF.dtype)
        return self.inner.project(h_BTF * gate_BTF)

    def _sparse(self, x_BTD: jax.Array, active_BTE: jax.Array) -> jax.Array:
        """Hard routing computing only the active experts (`kernels.sparse_ffn`)."""
        from menagerie.kernels.sparse_ffn import sparse_ffn

        b, t, d = x_BTD.shape
        w_in_KFD, w_out_FD = self.inner.expert_weights()
        if self.inference_w_in is not None:  # the transposition above is then dead code
            w_in_KFD = self.inference_w_in[...]
        y_ND = sparse_ffn(
            x_BTD.reshape(b * t, d),
            w_in_KFD,
            w_out_FD,
            active_BTE.reshape(b * t, -1) > 0,
            expert_size=self.cfg.expert_size,
            activation=self.inner.activation,
            impl=self.cfg.impl,
        )
        return y_ND.reshape(b, t, -1).astype(x_BTD.dtype)

    def _aux(self, g_BTE: jax.Array, active_BTE: jax.Array, hard: Any, step=None) -> Aux:
        """Density and FLOPs saved; for LTE (threshold) its stage-1 losses."""
        cfg = self.cfg
        density = jnp.mean(active_BTE)
        aux = {"density": density, "flops_saved": (1.0 - density) * self.inner_flops}
        aux["routing_spread"] = routing_spread(active_BTE)
        if cfg.routing != "threshold" or cfg.all_experts:
            return aux
        eff = jnp.mean(jnp.square(g_BTE))
        sep = jnp.mean(1.0 / (jnp.square(g_BTE - cfg.tau) + cfg.sep_eps))
        stage1 = 1.0 - jnp.asarray(hard, jnp.float32)
        lam = cfg.separability * self._ramp(step)
        loss = stage1 * (cfg.eta * eff + lam * sep) / self.n_layers
        return aux | {"aux_loss": loss, "efficiency_loss": eff, "separability_loss": sep}

    def _ramp(self, step: jax.Array | None) -> Any:
        """The separability weight's factor at `step`: step / hard_from_step up to 1 with the
        ramp, else 1."""
        start = self.cfg.hard_from_step
        if not self.cfg.separability_ramp or start is None or step is None:
            return 1.0
        return jnp.minimum(step.astype(jnp.float32) / start, 1.0)

    def _predictor_aux(self, z_BTE, h_BTF, active_BTE, hard) -> Aux:
        """The dejavu predictor's stage-1 cross-entropy against the top_k experts by hidden
        activation norm, and its recall of them."""
        cfg = self.cfg
        h_BTES = jax.lax.stop_gradient(h_BTF).astype(jnp.float32)
        h_BTES = h_BTES.reshape(*h_BTF.shape[:-1], -1, cfg.expert_size)
        labels_BTE = topk_mask(jnp.sum(jnp.square(h_BTES), axis=-1), cfg.top_k)
        bce = jnp.mean(optax.sigmoid_binary_cross_entropy(z_BTE, labels_BTE))
        stage1 = 1.0 - jnp.asarray(hard, jnp.float32)
        return {
            "aux_loss": stage1 * cfg.predictor_weight * bce / self.n_layers,
            "predictor_loss": bce,
            "predictor_recall": jnp.sum(active_BTE * labels_BTE) / jnp.sum(labels_BTE),
        }


def routing_spread(active_BTE: jax.Array) -> jax.Array:
    """mean over experts of 4 p (1 - p), p = the fraction of the batch's tokens that use the
    expert: 0 when each expert is on for every token or for none (a static pruning, whatever
    the density), 1 when each is on for half of them."""
    p_E = jnp.mean(active_BTE.reshape(-1, active_BTE.shape[-1]), axis=0)
    return jnp.mean(4.0 * p_E * (1.0 - p_E))


def topk_mask(scores_BTE: jax.Array, k: int) -> jax.Array:
    """1.0 at each token's k highest scores (ties to the lower index), else 0."""
    _, idx_BTK = jax.lax.top_k(jax.lax.stop_gradient(scores_BTE), k)
    return jnp.sum(jax.nn.one_hot(idx_BTK, scores_BTE.shape[-1], dtype=jnp.float32), axis=-2)
