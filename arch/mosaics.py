"""Memory Mosaics (Zhang, Nolte, Sadhukhan, Chen, Bottou; ICLR 2025): associative memories as
two parts, the contextual memory (a mixer) and the persistent memory (an FFN), and the
official `StackAssoMem` as the family `mosaics`.

Written from the official naive model (facebookresearch/MemoryMosaics @ 1fff63b,
`Library/memory_mosaics/models/memory_mosaics.py` and `memory.py`). Per head h of width
hs = D / H, with every per-head scalar exponent-scaled by 10 as in the code:

    k~_t   = x_t W_k                                     (the official Conv1d of kernel 1)
    kbar_t = (1 - e^-b) sum_{s<=t} e^{-b (t-s)} k~_s      b = 10 |leaky_key_beta_h|
    k_t    = e^{min(10 kernel_beta_h, 5)} kbar_t / |kbar_t|
    v~_t   = x_t W_v,  u_t = (1 - lam_h) v~_{t+1} + lam_h v~_t   (v~_T = 0: one step ahead)
    v_t    = e^{10 value_beta_h} u_t / |u_t|
    y_t    = sum_{s<t} softmax_s(k_t . k_s) v_s  (y_0 = 0),  out = y W_c

The persistent memory has its own W_k, leaky average and scalars, keys scaled by the square
e^{2 min(10 kernel_beta, 5)} and not normalised after, and reads pmem_count fixed memories:
y = e^{10 value_beta} mean_j softmax(k M_k^j^T) M_v^j, out = y W_c. The family is pre-norm
blocks x + ctx(LN1 x), x + pmem(LN2 x) (LayerNorm without bias), no positional embedding, a
final LayerNorm and the tied head with logits / sqrt(D). Initialisation: matrices N(0,
1/fan_in), both c_proj N(0, 1/(D n_layers)), memories N(0, 1/hs), the embedding (tied)
N(0, 1/D), leaky_key_beta linspace(0.5, 5, H) / 10, kernel_beta 0.1, value_beta -0.05, lam
U(0, 1). Per-head scalars are "vector" axes: not weight-decayed, as the official split (dim < 2).

Computed differently, with the same numbers:
- The leaky average is the recurrence h_t = e^-b h_{t-1} + (1 - e^-b) k~_t run by
  `lax.associative_scan`: linear in T (the official builds a T x T matrix).
- Retrieval goes through `kernels.sparse_attention` with `masks.StrictlyCausal()` (scale 1) on
  GPU (the Pallas kernel), and elsewhere through `kernels.blocked_attention` with offset 1
  (blocks of strictly causal queries, FlashAttention-style backward); row 0 sees nothing and
  gets zeros.

v2 options (Memory Mosaics at scale, arXiv 2507.03285; no official v2 code is public, so these
follow the paper's equations, with the choices it leaves open stated), each a switch of the
contextual memory whose default is v1:
- `keys: gated`: kbar_t = g_t k~_t + lam_t kbar_{t-1}, g_t = exp(x_t W_g), lam_t =
  exp(-|x_t W_lam|); one gate and one decay per head and token (W_g, W_lam [D,H], N(0, 1/D)).
  The same associative scan with per-token rates.
- `bandwidth: adaptive`: beta(n) = beta1 n^alpha + beta0 replaces v1's e^{2 min(10 kb, 5)}, n
  the number of pairs the query sees (after the window and the gap; at least 1). beta1 is v1's
  factor, alpha and beta0 are per-head parameters initialised to 0, so training starts from v1.
  The query becomes k_t (n^alpha + beta0 / beta1); keys are unchanged.
- `window` (short-term: pairs s >= t - window) and `gap` / `gap_max` (long-term: pairs s < t - m,
  m drawn per training step from [gap, gap_max], one draw for all layers, from the step;
  `gap` at evaluation and decoding). The mixer `memory_levels` sums a short- and a long-term
  memory (the same as splitting heads between them with one output map); with a SwiGLU FFN
  as the persistent memory this is the v2 block. Static masks go through
  `kernels.sparse_attention`; a drawn gap has no static mask and uses the dense jnp path.

Incremental decoding (`Mosaics.init_state` / `decode`): each contextual memory keeps its scaled
keys, raw values v~ and the keys' running average; a value is made when it is read, since v_s
needs v~_{s+1}. The persistent memory keeps its running average. Token by token this equals the
forward pass.

Deviations:
- No dropout (the official recipe has 0.05 on the attention weights and residuals).
- The L2 norms floor the squared norm at 1e-30 (the official divides as is: NaN for a zero
  vector); nothing else changes.
- Packed documents are not separated: like the official training on windows of one stream,
  `ctx.segment_ids` is not read.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import pydantic
from flax import nnx, struct
from menagerie.kernels import masks
from menagerie.kernels.blocked_attention import blocked_attention
from menagerie.kernels.dispatch import platform
from menagerie.kernels.sparse_attention import attention_reference, sparse_attention

from . import attention as _attention  # noqa: F401 - declares the "heads" and "head_dim" axes
from .axes import Axis, declare
from .config import ModelConfig, check_positive
from .layers import ACT_EMBED, BATCH, SEQ, Embed, Linear, constrain, dtype_of, param
from .parts import (
    Aux,
    Ctx,
    FFNConfig,
    MixerConfig,
    Output,
    decode_pre_norm_block,
    init_block_cache,
    reduce_aux,
)
from .stack import DecodeState, decode_layers, run_layers, stack_layers, stacked

declare(
    Axis("mem_heads", "vector", None, doc="per-head scalars of a memory (rates, scales)"),
    Axis("pmem_copies", "feature", None, doc="independent persistent memories, averaged"),
    Axis("pmem_slots", "feature", "tensor", doc="key/value pairs of a persistent memory"),
)

EXP_SCALE = 10.0  # every per-head scalar enters as exp(10 p) or 10 |p| (official exp_param_scale)
KERNEL_BETA_MAX = 5.0  # the clamp on 10 kernel_beta (official kernel_beta_upbound)


def _check_heads(cfg, model: ModelConfig, prefix: str) -> None:
    """n_heads positive and a divisor of d_model (one line naming the keys otherwise)."""
    check_positive(cfg, prefix, ints=("n_heads",))
    if model.d_model % cfg.n_heads:
        raise ValueError(
            f"{prefix}n_heads={cfg.n_heads} does not divide model.d_model={model.d_model}"
        )


class ContextMemoryConfig(MixerConfig):
    """The contextual associative memory (official `InContextAssoMemBlock`), with the v2
    options (arXiv 2507.03285) as switches; the defaults are v1."""

    kind: Literal["context_memory"] = "context_memory"
    """Selects this mixer."""
    n_heads: int = 4
    """Memory heads H; each has its own leak rate and scales on D / H features."""
    keys: Literal["leaky", "gated"] = "leaky"
    """Key extractor. leaky (v1): kbar_t = e^-b kbar_{t-1} + (1 - e^-b) k~_t, one rate b per
    head. gated (v2): kbar_t = g_t k~_t + lam_t kbar_{t-1} with g_t = exp(x_t W_g) and
    lam_t = exp(-|x_t W_lam|), per head and token (W_g, W_lam [D,H])."""
    bandwidth: Literal["fixed", "adaptive"] = "fixed"
    """Kernel bandwidth. fixed (v1): scores e^{2 min(10 kernel_beta, 5)} unit(k_t) . unit(k_s).
    adaptive (v2): beta(n) = beta1 n^alpha + beta0 in place of that factor, n the number of
    pairs the query sees; beta1 is v1's factor, alpha and beta0 per-head parameters starting
    at 0 (so the model starts as v1)."""
    window: int | None = None
    """Short-term memory (v2; 256 there): a query at t sees only pairs s >= t - window. None:
    every earlier pair."""
    gap: int | None = None
    """Long-term memory (v2; 64 at inference there): a query at t sees only pairs s < t - gap.
    None: 0 (every earlier pair)."""
    gap_max: int | None = None
    """With `gap`: training draws the gap per step uniformly from [gap, gap_max] (v2: 64..256;
    one draw shared by the layers, from the step, so runs are reproducible); evaluation and
    decoding use `gap`. None: always `gap`. A drawn gap has no static mask, so such training
    retrieves with the dense jnp path, not the Pallas kernel."""
    impl: Literal["auto", "xla", "reference", "pallas", "interpret"] = "auto"
    """Retrieval. xla: `kernels.blocked_attention` with offset 1 (strictly causal query blocks
    that skip the masked upper blocks; with a `window`, the dense reference instead). Else a
    `kernels.sparse_attention` impl. auto: the Pallas kernel on GPU, xla elsewhere."""

    def check(self, model: ModelConfig, prefix: str = "model.mixer.") -> None:
        _check_heads(self, model, prefix)
        check_positive(self, prefix, ints=("window", "gap_max"))
        if self.gap is not None and self.gap < 0:
            raise ValueError(f"{prefix}gap={self.gap} must be >= 0 (or null)")
        if self.gap_max is not None and self.gap_max < (self.gap or 0):
            raise ValueError(
                f"{prefix}gap_max={self.gap_max} is below {prefix}gap={self.gap}: "
                "the training gap is drawn from [gap, gap_max]"
            )

    def build(self, model: ModelConfig, *, rngs: nnx.Rngs) -> ContextMemory:
        return ContextMemory(self, model, rngs=rngs)

    def num_params(self, model: ModelConfig) -> int:
        """W_k, W_v, W_c [D,D] and per head: kernel_beta, value_beta, lam, and the leak rate
        (leaky) or W_g, W_lam [D,H] (gated); alpha and beta0 with the adaptive bandwidth."""
        d, h = model.d_model, self.n_heads
        keys = 2 * d * h if self.keys == "gated" else h
        return 3 * d * d + 3 * h + keys + (2 * h if self.bandwidth == "adaptive" else 0)

    def flops_per_token(self, model: ModelConfig, seq_len: int) -> float:
        """6 x the matmul parameters (3 D^2, and 2 D H gated), and 12 D per pair a query
        reads (k k^T and the weighted sum of v): T / 2 pairs on average without a window or a
        gap (the attention part's causal convention, 6 T D), else the exact mean."""
        d = model.d_model
        matmuls = 3 * d * d + (2 * d * self.n_heads if self.keys == "gated" else 0)
        return float(6 * matmuls + 12 * self.mean_pairs(seq_len) * d)

    def mean_pairs(self, seq_len: int) -> float:
        """Pairs a query sees, averaged over positions 0..T-1 (T / 2 for plain v1)."""
        if self.window is None and self.gap is None:
            return seq_len / 2
        t = np.arange(seq_len)
        lo = 0 if self.window is None else np.maximum(t - self.window, 0)
        return float(np.mean(np.maximum(t - (self.gap or 0) - lo, 0)))


class MemoryLevelsConfig(MixerConfig):
    """v2's contextual memory levels in one mixer: a short-term and a long-term contextual
    memory side by side, their outputs summed (the same as splitting the heads between the
    levels with one output projection). With `model.ffn.kind: swiglu` as the persistent
    memory this is the v2 block."""

    kind: Literal["memory_levels"] = "memory_levels"
    """Selects this mixer."""
    short: ContextMemoryConfig = ContextMemoryConfig(window=256)
    """The short-term memory (v2: the last 256 pairs)."""
    long: ContextMemoryConfig = ContextMemoryConfig(gap=64, gap_max=256)
    """The long-term memory (v2: pairs older than a gap of 64..256 in training, 64 after)."""

    def check(self, model: ModelConfig) -> None:
        self.short.check(model, "model.mixer.short.")
        self.long.check(model, "model.mixer.long.")

    def build(self, model: ModelConfig, *, rngs: nnx.Rngs) -> MemoryLevels:
        return MemoryLevels(self, model, rngs=rngs)

    def num_params(self, model: ModelConfig) -> int:
        return self.short.num_params(model) + self.long.num_params(model)

    def flops_per_token(self, model: ModelConfig, seq_len: int) -> float:
        return self.short.flops_per_token(model, seq_len) + self.long.flops_per_token(
            model, seq_len
        )


class PersistentMemoryConfig(FFNConfig):
    """The persistent associative memory (official `PersistentAssoMemBlock` + `Pmem`)."""

    kind: Literal["persistent_memory"] = "persistent_memory"
    """Selects this FFN."""
    n_heads: int = 4
    """Memory heads H; each has its own leak rate and scales on D / H features."""
    size: int | None = None
    """Key/value pairs P per memory. None: round(3.5 D), the official match to an MLP."""
    copies: int = 1
    """Independent memories averaged (official `pmem_count`)."""

    def slots(self, model: ModelConfig) -> int:
        return round(3.5 * model.d_model) if self.size is None else self.size

    def check(self, model: ModelConfig) -> None:
        _check_heads(self, model, "model.ffn.")
        check_positive(self, "model.ffn.", ints=("size", "copies"))

    def build(self, model: ModelConfig, *, rngs: nnx.Rngs) -> PersistentMemory:
        return PersistentMemory(self, model, rngs=rngs)

    def num_params(self, model: ModelConfig) -> int:
        """W_k, W_c [D,D], copies x (M_k, M_v) [H,P,hs] and three scalars per head."""
        d = model.d_model
        return 2 * d * d + 2 * self.copies * self.slots(model) * d + 3 * self.n_heads

    def flops_per_token(self, model: ModelConfig, seq_len: int) -> float:
        """6 * (2 D^2 + 2 copies P D): the two projections and, per copy, k M_k^T and p M_v."""
        d = model.d_model
        return float(6 * (2 * d * d + 2 * self.copies * self.slots(model) * d))


def _scalar(rngs: nnx.Rngs, model: ModelConfig, values: jax.Array) -> nnx.Param:
    """A per-head scalar parameter [H] initialised to `values`."""
    init = lambda key, shape, dtype: jnp.broadcast_to(values, shape).astype(dtype)  # noqa: E731
    return param(rngs, values.shape, ("mem_heads",), std=None, dtype=_pdt(model), init=init)


def _pdt(model: ModelConfig):
    return dtype_of(model.param_dtype)


def _heads_linear(model: ModelConfig, h: int, *, rngs: nnx.Rngs, out: bool = False) -> Linear:
    """W [D,H,hs] (a key or value map, std 1/sqrt(D)), or with `out` the output map c_proj
    [H,hs,D] (std 1/sqrt(D n_layers))."""
    d, hs = model.d_model, model.d_model // h
    std = 1 / math.sqrt(d * (model.n_layers if out else 1))
    in_shape, out_shape = ((h, hs), d) if out else (d, (h, hs))
    names = ("heads", "head_dim", "embed") if out else ("embed", "heads", "head_dim")
    return Linear(
        in_shape,
        out_shape,
        names,
        std=std,
        param_dtype=_pdt(model),
        compute_dtype=dtype_of(model.compute_dtype),
        rngs=rngs,
    )


def leaky_average(
    k_BTHD: jax.Array, beta_H: jax.Array, initial_BHD: jax.Array | None = None
) -> jax.Array:
    """kbar_t = (1 - e^-b) sum_{s<=t} e^{-b (t-s)} k_s per head: `decayed_sum` with a = e^-b
    and gain 1 - a. O(T), no T x T matrix. float32. `initial_BHD`: the average before these
    T tokens (decoding); zeros if None."""
    beta_H = beta_H.astype(jnp.float32)
    gain_H = 1.0 - jnp.exp(-beta_H)
    return decayed_sum(k_BTHD, -beta_H[None, None, :], gain_H[None, None, :], initial_BHD)


def decayed_sum(k_BTHD, log_a_BTH, gain_BTH, initial_BHD=None) -> jax.Array:
    """h_t = a_t h_{t-1} + g_t k_t per head (a_t = e^{log_a_t}; [B,T,H] arrays or broadcastable
    to them), by `lax.associative_scan`: O(T) work, O(log T) depth. h_{-1} = `initial_BHD`
    (zeros if None). float32 [B,T,H,hs]."""
    k = k_BTHD.astype(jnp.float32)
    log_a = jnp.broadcast_to(log_a_BTH.astype(jnp.float32), k.shape[:3])
    b = gain_BTH.astype(jnp.float32)[..., None] * k

    def combine(left, right):
        (a1, b1), (a2, b2) = left, right
        return a1 * a2, a2 * b1 + b2

    a = jnp.broadcast_to(jnp.exp(log_a)[..., None], k.shape)
    h = jax.lax.associative_scan(combine, (a, b), axis=1)[1]
    if initial_BHD is None:
        return h
    return h + jnp.exp(jnp.cumsum(log_a, axis=1))[..., None] * initial_BHD[:, None]


def unit(x: jax.Array) -> jax.Array:
    """x / |x| over the last axis (float32; the squared norm floored at 1e-30)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-30))


def _kernel_scale(kernel_beta_H: jax.Array) -> jax.Array:
    """e^{min(10 kernel_beta, 5)} per head [H,1] (float32)."""
    kb = EXP_SCALE * kernel_beta_H.astype(jnp.float32)
    return jnp.exp(jnp.minimum(kb, KERNEL_BETA_MAX))[:, None]


def _value_scale(value_beta_H: jax.Array) -> jax.Array:
    """e^{10 value_beta} per head [H,1] (float32)."""
    return jnp.exp(EXP_SCALE * value_beta_H.astype(jnp.float32))[:, None]


class _Keys(nnx.Module):
    """A memory's key extractor: W_k, then the per-head average over time (v1's leaky average,
    or v2's gated one), then unit length."""

    def __init__(self, model: ModelConfig, h: int, *, rngs: nnx.Rngs, gated: bool = False):
        self.wk = _heads_linear(model, h, rngs=rngs)
        self.head_shape = (h, model.d_model // h)
        self.kernel_beta = _scalar(rngs, model, jnp.full((h,), 0.1))
        if gated:  # g_t = exp(x_t W_g), lam_t = exp(-|x_t W_lam|), per head
            self.gate = _gate_linear(model, h, rngs=rngs)
            self.decay = _gate_linear(model, h, rngs=rngs)
        else:
            self.leaky_key_beta = _scalar(rngs, model, jnp.linspace(0.5, 5.0, h) / EXP_SCALE)
        self.gated = gated

    def __call__(self, x_BTD: jax.Array, initial_BHD: jax.Array | None = None):
        """Unit keys [B,T,H,hs] float32 (scaled by the caller). With `initial_BHD`, the average
        before these tokens (decoding): (unit keys, the average after them)."""
        k = self.wk(x_BTD)
        if self.gated:
            log_a = -jnp.abs(self.decay(x_BTD, out_dtype=jnp.float32))
            gain = jnp.exp(self.gate(x_BTD, out_dtype=jnp.float32))
            kbar = decayed_sum(k, log_a, gain, initial_BHD)
        else:
            beta = EXP_SCALE * jnp.abs(self.leaky_key_beta[...])
            kbar = leaky_average(k, beta, initial_BHD)
        return unit(kbar) if initial_BHD is None else (unit(kbar), kbar[:, -1])

    def empty_average(self, batch: int) -> jax.Array:
        """The average before the first token: zeros [B,H,hs] float32."""
        return jnp.zeros((batch, *self.head_shape), jnp.float32)


def _gate_linear(model: ModelConfig, h: int, *, rngs: nnx.Rngs) -> Linear:
    """A per-head gate map [D,H] of the gated key extractor (std 1/sqrt(D))."""
    return Linear(
        model.d_model,
        h,
        ("embed", "heads"),
        std=1 / math.sqrt(model.d_model),
        param_dtype=_pdt(model),
        compute_dtype=dtype_of(model.compute_dtype),
        rngs=rngs,
    )


class ContextMemory(nnx.Module):
    """y_t = sum_{s<t} softmax_s(k_t . k_s) v_s with one-step-ahead values, and the v2 options
    (gated keys, adaptive bandwidth, window, gap); see the module docstring."""

    def __init__(self, cfg: ContextMemoryConfig, model: ModelConfig, *, rngs: nnx.Rngs):
        h = cfg.n_heads
        self.keys = _Keys(model, h, rngs=rngs, gated=cfg.keys == "gated")
        self.wv = _heads_linear(model, h, rngs=rngs)
        self.coef = param(
            rngs, (h,), ("mem_heads",), std=None, dtype=_pdt(model), init=jax.random.uniform
        )
        self.value_beta = _scalar(rngs, model, jnp.full((h,), -0.05))
        if cfg.bandwidth == "adaptive":  # beta(n) = e^{2 min(10 kernel_beta, 5)} n^alpha + beta0
            self.bandwidth_power = _scalar(rngs, model, jnp.zeros((h,)))
            self.bandwidth_offset = _scalar(rngs, model, jnp.zeros((h,)))
        self.c_proj = _heads_linear(model, h, rngs=rngs, out=True)
        self.adaptive = cfg.bandwidth == "adaptive"
        self.window, self.gap, self.gap_max = cfg.window, cfg.gap or 0, cfg.gap_max
        self.impl = cfg.impl

    def values(self, x_BTD: jax.Array) -> jax.Array:
        """v_t = e^{10 value_beta} unit((1 - lam) v~_{t+1} + lam v~_t), v~_T = 0: [B,T,H,hs]."""
        return self._peek(self.wv(x_BTD).astype(jnp.float32))

    def _peek(self, v_BTHD: jax.Array) -> jax.Array:
        """The values of raw values v~ [B,T,H,hs] float32 (v~_T = 0)."""
        ahead = jnp.concatenate([v_BTHD[:, 1:], jnp.zeros_like(v_BTHD[:, :1])], axis=1)
        lam = self.coef[...].astype(jnp.float32)[:, None]
        return _value_scale(self.value_beta[...]) * unit((1 - lam) * ahead + lam * v_BTHD)

    def __call__(self, x_BTD: jax.Array, ctx: Ctx) -> tuple[jax.Array, Aux]:
        with jax.named_scope("context_memory"):
            k = _kernel_scale(self.keys.kernel_beta[...]) * self.keys(x_BTD)
            v = self.values(x_BTD)
            dt, gap = x_BTD.dtype, self._gap(ctx)
            q = self._query(k, jnp.arange(x_BTD.shape[1]), gap).astype(dt)
            k, v = k.astype(dt), v.astype(dt)
            out = constrain(self.c_proj(self._retrieve(q, k, v, gap)), (BATCH, SEQ, ACT_EMBED))
        return out, {}

    def _retrieve(self, q_BTHD, k_BTHD, v_BTHD, gap) -> jax.Array:
        """sum over the visible pairs of softmax(q . k) v (scale 1), by the configured impl."""
        if not isinstance(gap, int):  # a gap drawn at run time: the mask is not static
            positions = jnp.arange(q_BTHD.shape[1])
            keep = self._keep(positions, positions, gap)[None, None, None]
            return attention_reference(q_BTHD, k_BTHD, v_BTHD, keep, scale=1.0)
        xla = self.impl == "xla" or (self.impl == "auto" and platform() != "gpu")
        if xla and self.window is None:
            ones = jnp.ones(q_BTHD.shape[:2], jnp.int32)
            return blocked_attention(q_BTHD, k_BTHD, v_BTHD, ones, offset=gap + 1, scale=1.0)
        impl = "reference" if xla else self.impl
        return sparse_attention(q_BTHD, k_BTHD, v_BTHD, mask=self._mask(gap), scale=1.0, impl=impl)

    def _gap(self, ctx: Ctx) -> int | jax.Array:
        """The long-term gap m: drawn per training step from [gap, gap_max] (traced), else the
        configured one (static)."""
        if self.gap_max is None or ctx is None or ctx.deterministic or ctx.step is None:
            return self.gap
        key = jax.random.fold_in(jax.random.key(0), ctx.step)
        return jax.random.randint(key, (), self.gap, self.gap_max + 1)

    def _mask(self, gap: int) -> masks.Mask:
        """The static mask: pairs s < t - gap, and s >= t - window with a window."""
        mask = masks.StrictlyCausal() if gap == 0 else masks.Causal(offset=-(gap + 1))
        return mask if self.window is None else mask & masks.LocalWindow(self.window, None)

    def _keep(self, q_pos_T: jax.Array, k_pos_S: jax.Array, gap) -> jax.Array:
        """`_mask` as a [T,S] bool array of query and key positions (traced gap allowed)."""
        keep = k_pos_S[None, :] < q_pos_T[:, None] - gap
        if self.window is not None:
            keep = keep & (k_pos_S[None, :] >= q_pos_T[:, None] - self.window)
        return keep

    def _query(self, k_BTHD: jax.Array, q_pos_T: jax.Array, gap) -> jax.Array:
        """The query: the key itself, or with the adaptive bandwidth the key times
        n^alpha + beta0 / e^{2 min(10 kernel_beta, 5)}, n the pairs position t sees (at least
        1), so that q . k = beta(n) unit(k_t) . unit(k_s)."""
        if not self.adaptive:
            return k_BTHD
        hi = jnp.maximum(q_pos_T - gap, 0)
        lo = 0 if self.window is None else jnp.maximum(q_pos_T - self.window, 0)
        n_T = jnp.maximum(hi - lo, 1).astype(jnp.float32)
        alpha_H = self.bandwidth_power[...].astype(jnp.float32)
        beta0_H = self.bandwidth_offset[...].astype(jnp.float32)
        sq = jnp.square(_kernel_scale(self.keys.kernel_beta[...]))[:, 0]
        factor_TH = n_T[:, None] ** alpha_H[None, :] + beta0_H / sq
        return k_BTHD * factor_TH[None, :, :, None]

    def init_cache(self, batch: int, max_len: int) -> MemoryCache:
        """An empty memory for `batch` sequences of at most `max_len` tokens."""
        zeros = jnp.zeros((batch, max_len, *self.keys.head_shape), jnp.float32)
        return MemoryCache(zeros, zeros, self.keys.empty_average(batch))

    def decode(self, x_BTD: jax.Array, cache: MemoryCache, start) -> tuple[jax.Array, MemoryCache]:
        """`__call__` for T tokens at positions start..start+T-1 whose earlier tokens fill
        `cache`: stores their keys and raw values, continues the keys' average, and retrieves
        from the pairs each token sees (the configured gap: decoding is inference). Values are
        made from the raw ones at each call: the value of the last token seen needs the next
        token's."""
        keys, average = self.keys(x_BTD, cache.average)
        k = _kernel_scale(self.keys.kernel_beta[...]) * keys
        write = lambda c, new: jax.lax.dynamic_update_slice_in_dim(c, new, start, 1)  # noqa: E731
        raw = self.wv(x_BTD).astype(jnp.float32)
        cache = MemoryCache(write(cache.keys, k), write(cache.raw_values, raw), average)
        q_pos = start + jnp.arange(x_BTD.shape[1])
        keep = self._keep(q_pos, jnp.arange(cache.keys.shape[1]), self.gap)
        dt = x_BTD.dtype
        q = self._query(k, q_pos, self.gap).astype(dt)
        values = self._peek(cache.raw_values).astype(dt)
        y = attention_reference(q, cache.keys.astype(dt), values, keep[None, None, None], scale=1.0)
        return self.c_proj(y), cache


@struct.dataclass
class MemoryCache:
    """A contextual memory's decoding state: scaled unit keys and raw values v~ of positions
    0..S-1 ([B,S,H,hs] float32; position p's slot is p) and the leaky average of the keys after
    the last token seen ([B,H,hs])."""

    keys: jax.Array
    raw_values: jax.Array
    average: jax.Array


class MemoryLevels(nnx.Module):
    """The short- and the long-term contextual memory, outputs summed (`MemoryLevelsConfig`)."""

    def __init__(self, cfg: MemoryLevelsConfig, model: ModelConfig, *, rngs: nnx.Rngs):
        self.short = ContextMemory(cfg.short, model, rngs=rngs)
        self.long = ContextMemory(cfg.long, model, rngs=rngs)

    def __call__(self, x_BTD: jax.Array, ctx: Ctx) -> tuple[jax.Array, Aux]:
        (short, _), (long, _) = self.short(x_BTD, ctx), self.long(x_BTD, ctx)
        return short + long, {}

    def init_cache(self, batch: int, max_len: int) -> tuple[MemoryCache, MemoryCache]:
        return self.short.init_cache(batch, max_len), self.long.init_cache(batch, max_len)

    def decode(self, x_BTD: jax.Array, cache, start) -> tuple[jax.Array, Any]:
        short, short_cache = self.short.decode(x_BTD, cache[0], start)
        long, long_cache = self.long.decode(x_BTD, cache[1], start)
        return short + long, (short_cache, long_cache)


class PersistentMemory(nnx.Module):
    """y = e^{10 value_beta} mean_j softmax(k M_k^j^T) M_v^j with leaky-averaged keys; see the
    module docstring."""

    def __init__(self, cfg: PersistentMemoryConfig, model: ModelConfig, *, rngs: nnx.Rngs):
        h, p = cfg.n_heads, cfg.slots(model)
        hs = model.d_model // h
        self.keys = _Keys(model, h, rngs=rngs)
        names = ("pmem_copies", "heads", "pmem_slots", "head_dim")
        shape = (cfg.copies, h, p, hs)
        self.mem_k = param(rngs, shape, names, std=1 / math.sqrt(hs), dtype=_pdt(model))
        self.mem_v = param(rngs, shape, names, std=1 / math.sqrt(hs), dtype=_pdt(model))
        self.value_beta = _scalar(rngs, model, jnp.full((h,), -0.05))
        self.c_proj = _heads_linear(model, h, rngs=rngs, out=True)

    def __call__(self, x_BTD: jax.Array, ctx: Ctx) -> tuple[jax.Array, Aux]:
        del ctx
        with jax.named_scope("persistent_memory"):
            return self._read(self.keys(x_BTD), x_BTD.dtype), {}

    def init_cache(self, batch: int, max_len: int) -> jax.Array:
        """The decoding state: the keys' leaky average [B,H,hs] (no growing memory)."""
        del max_len
        return self.keys.empty_average(batch)

    def decode(self, x_BTD: jax.Array, average: jax.Array, start) -> tuple[jax.Array, jax.Array]:
        """`__call__` for T tokens continuing the leaky average `average` of earlier ones."""
        del start
        keys, average = self.keys(x_BTD, average)
        return self._read(keys, x_BTD.dtype), average

    def _read(self, keys_BTHD: jax.Array, dtype) -> jax.Array:
        """The memories read with unit keys [B,T,H,hs]: [B,T,D] in `dtype`."""
        k = jnp.square(_kernel_scale(self.keys.kernel_beta[...])) * keys_BTHD
        mk = self.mem_k[...].astype(jnp.float32)
        mv = self.mem_v[...].astype(jnp.float32)
        s = jnp.einsum("bthd,jhpd->bjthp", k, mk, precision=jax.lax.Precision.HIGHEST)
        p = jax.nn.softmax(s, axis=-1)
        y = jnp.einsum("bjthp,jhpd->bthd", p, mv, precision=jax.lax.Precision.HIGHEST)
        y = _value_scale(self.value_beta[...]) * y / mk.shape[0]
        out = self.c_proj(y.astype(dtype))
        return constrain(out, (BATCH, SEQ, ACT_EMBED))


# ---- the family: the official StackAssoMem ---------------------------------------------------


class MosaicsConfig(ModelConfig):
    """Memory Mosaics (official `StackAssoMem`): pre-LayerNorm blocks of a mixer and an FFN,
    by default the contextual and the persistent memory; no positional embedding; a final
    LayerNorm; the (tied) head with logits / sqrt(D)."""

    family: Literal["mosaics"] = "mosaics"
    """Selects this family."""
    mixer: pydantic.SerializeAsAny[MixerConfig] = ContextMemoryConfig()
    """Sequence mixer part (`kind`: context_memory, attention, ...)."""
    ffn: pydantic.SerializeAsAny[FFNConfig] = PersistentMemoryConfig()
    """FFN part (`kind`: persistent_memory, swiglu, ...)."""

    @pydantic.model_validator(mode="after")
    def _check_parts(self) -> MosaicsConfig:
        for part in self.parts():
            part.check(self)
        return self

    def parts(self) -> tuple[Any, ...]:
        return (self.mixer, self.ffn)

    def build(self, *, rngs: nnx.Rngs) -> Mosaics:
        return Mosaics(self, rngs=rngs)

    def num_params(self, include_embeddings: bool = True) -> int:
        """Embedding V D (and the head V D untied) + per layer (two LayerNorm scales 2 D +
        mixer + FFN) + the final LayerNorm D."""
        d, v = self.d_model, self.padded_vocab
        per_layer = 2 * d + self.mixer.num_params(self) + self.ffn.num_params(self)
        embeddings = v * d * (1 if self.tie_embeddings else 2)
        return (embeddings if include_embeddings else 0) + self.n_layers * per_layer + d

    def flops_per_token(self, seq_len: int) -> float:
        """n_layers * (mixer + FFN) + the head's 6 V D."""
        layer = self.mixer.flops_per_token(self, seq_len) + self.ffn.flops_per_token(self, seq_len)
        return float(self.n_layers * layer + 6 * self.padded_vocab * self.d_model)


class LayerNorm(nnx.Module):
    """LayerNorm without bias (the official `LayerNorm(bias=False)`), statistics in float32."""

    def __init__(self, model: ModelConfig, *, rngs: nnx.Rngs):
        self.scale = param(rngs, (model.d_model,), ("norm",), std=None, dtype=_pdt(model))
        self.eps = model.norm_eps
        self.compute_dtype = dtype_of(model.compute_dtype)

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        x = x_BTD.astype(jnp.float32)
        x = x - jnp.mean(x, axis=-1, keepdims=True)
        y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(self.compute_dtype)


class Block(nnx.Module):
    """x + mixer(LN1 x), then x + ffn(LN2 x) (official `AttnOnlyBlock`, pre_ln)."""

    def __init__(self, cfg: MosaicsConfig, *, rngs: nnx.Rngs):
        self.ln1 = LayerNorm(cfg, rngs=rngs)
        self.mixer = cfg.mixer.build(cfg, rngs=rngs)
        self.ln2 = LayerNorm(cfg, rngs=rngs)
        self.ffn = cfg.ffn.build(cfg, rngs=rngs)

    def __call__(self, x_BTD: jax.Array, ctx: Ctx) -> tuple[jax.Array, Aux]:
        y_BTD, mixer_aux = self.mixer(self.ln1(x_BTD), ctx)
        x_BTD = constrain(x_BTD + y_BTD, (BATCH, SEQ, ACT_EMBED))
        y_BTD, ffn_aux = self.ffn(self.ln2(x_BTD), ctx)
        x_BTD = constrain(x_BTD + y_BTD, (BATCH, SEQ, ACT_EMBED))
        return x_BTD, {"mixer": mixer_aux, "ffn": ffn_aux}

    def init_cache(self, batch: int, max_len: int) -> tuple[Any, Any]:
        """(mixer cache, FFN cache or None for a per-token FFN); see `parts`."""
        return init_block_cache(self.mixer, self.ffn, batch, max_len)

    def decode(self, x_BTD: jax.Array, cache: Any, start: jax.Array) -> tuple[jax.Array, Any]:
        """The block for T tokens at positions start.. given its parts' caches."""
        parts = dict(mixer=self.mixer, mixer_norm=self.ln1, ffn=self.ffn, ffn_norm=self.ln2)
        return decode_pre_norm_block(x_BTD, cache, start, **parts)


class Mosaics(nnx.Module):
    """Embed (no positions) -> n_layers Blocks -> LayerNorm -> head, logits / sqrt(D)."""

    def __init__(self, cfg: MosaicsConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, v = cfg.d_model, cfg.padded_vocab
        # Tied, the official embedding ends with the head's N(0, 1/D); untied it keeps N(0, 1).
        std = 1 / math.sqrt(d) if cfg.tie_embeddings else 1.0
        pdt, cdt = _pdt(cfg), dtype_of(cfg.compute_dtype)
        self.embed = Embed(v, d, std=std, param_dtype=pdt, compute_dtype=cdt, rngs=rngs)
        self.blocks = stack_layers(lambda rngs: Block(cfg, rngs=rngs), cfg, rngs=rngs)
        self.ln_out = LayerNorm(cfg, rngs=rngs)
        self.head = (
            None
            if cfg.tie_embeddings
            else Linear(
                d,
                v,
                ("embed", "vocab"),
                std=1 / math.sqrt(d),
                param_dtype=pdt,
                compute_dtype=cdt,
                rngs=rngs,
            )
        )

    def __call__(self, tokens_BT: jax.Array, ctx: Ctx | None = None, **ctx_fields) -> Output:
        """tokens [B,T] int32 -> Output(logits [B,T,V] float32, aux_loss, metrics)."""
        ctx = Ctx.make(tokens_BT, **ctx_fields) if ctx is None else ctx
        x = constrain(self.embed(tokens_BT), (BATCH, SEQ, ACT_EMBED))
        x, aux = run_layers(self.blocks, x, ctx, self.cfg)
        loss, metrics = reduce_aux(aux, stacked=True)
        return Output(logits=self._logits(x), aux_loss=loss, metrics=metrics)

    def _logits(self, x_BTD: jax.Array) -> jax.Array:
        x = self.ln_out(x_BTD)
        logits = self.embed.attend(x) if self.head is None else self.head(x, out_dtype=jnp.float32)
        return logits / math.sqrt(self.cfg.d_model)

    state_grows = True  # the contextual memory holds every token's key and value

    @property
    def decodes(self) -> bool:
        """Whether this model has incremental decoding: its mixer part has a cache."""
        block = self.blocks if self.cfg.scan_layers else self.blocks[0]
        return hasattr(block.mixer, "decode")

    def init_state(self, batch: int, max_len: int) -> DecodeState:
        """The decoding state before the first token of `batch` sequences of at most
        `max_len` tokens."""
        block = self.blocks if self.cfg.scan_layers else self.blocks[0]
        caches = stacked(block.init_cache(batch, max_len), self.cfg)
        return DecodeState(caches, jnp.zeros((), jnp.int32))

    def decode(self, tokens_BT: jax.Array, state: DecodeState) -> tuple[jax.Array, DecodeState]:
        """Logits [B,T,V] float32 of T more tokens (a prompt piece, or one) and the state after
        them; token by token this gives what the full forward pass gives."""
        x = constrain(self.embed(tokens_BT), (BATCH, SEQ, ACT_EMBED))
        x, caches = decode_layers(self.blocks, x, state.layers, state.position, self.cfg)
        return self._logits(x), DecodeState(caches, state.position + tokens_BT.shape[1])
