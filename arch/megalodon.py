"""Megalodon (Ma et al. 2024, arXiv 2404.08801) as the official code (XuezheMax/megalodon) has it.

    x -> MegaBlock x n_layers -> TimestepNorm -> output Linear        (`model.family: megalodon`)
    MegaBlock(x):  y = MEGA(x) (includes + x);  out = NFFN(y) + x      (the "two-hop" residual)

MEGA layer (`modules/moving_average_gated_attention.py`), shapes per token:
    xt = TimestepNorm(x)                        cumulative group norm, `megalodon_ops`
    mx = RMSNorm(CEMA(xt))                      complex EMA, then RMSNorm with a (1 + w) scale
    z  = per-head RMSNorm(mx Wz + bz)           no affine; Z/H per head
    q  = z (gamma0 + 1)/sqrt(Z/H) + beta0,  k = z (gamma1 + 1)/sqrt(Z/H) + beta1  (q == k at init)
    v  = silu(xt Wv + bv)                       E; from the TimestepNorm output, not from CEMA
    r  = silu(mx Wr + br)                       the reset gate
    o  = chunked causal softmax(q k^T) v        scale 1.0; RoPE per chunk (positions restart)
    out = mx Wh1 + bh1 + (o * r) Wh2 + x        no bias on Wh2, no activation
NFFN (`modules/normalized_feedforward_network.py`): LayerNorm with (1 + w) scale, then
fc2(silu(fc1 x) * fc3 x) (`swiglu`) or fc2(silu(fc1 x)); no biases; + the block input.
Initialisation (`utils.get_init_fn`, `_reset_parameters`): every internal Linear
kaiming_normal(a=sqrt 5) = N(0, 1/(3 fan_in)), biases 0; embedding and output truncated
N(0, 1/D) at 3 sigma; every norm scale stored as 0 and applied as 1 + w; CEMA as in
`MultiHeadComplexEMA`.

Where this differs from the official code, on purpose:
- CEMA cuts the sequence into segments (`cema_segment` tokens, default the chunk size up to
  256), all convolved at once by FFTs of length 2 x segment, with only the [B,D,N] state
  carried between segments by a scan, instead of one FFT over the whole local sequence: the
  same numbers, and a per-token cost that does not grow with the context.
- A length L > chunk_size that is not a multiple of it is allowed: the last chunk is shorter,
  which is exactly what padding the sequence to a multiple gives for the real tokens (all
  three operators are causal). The official model asserts L < C or L % C == 0.
- Packed documents are not separated: like the official code (and its training data, one
  continuous stream), `ctx.segment_ids` and `ctx.positions` are not read; RoPE positions are
  the position in the chunk.
- No dropout (the official 7B run used none); the official `rescale_nffn` layer scale is kept.
- Weight decay: the official optimizer decays every parameter; menagerie decays matrices by
  default (`optim.weight_decay_on`), and the Megalodon presets set `all` to match.
- Decoding (`Megalodon.init_state` / `decode`) continues the exact cumulative TimestepNorm
  statistics, so it equals the forward pass at any length; the official `inference.py`
  replaces them by statistics over the last 6 chunks once 8 chunks have passed
  (`truncate_cache`), a windowed norm this port does not reproduce.
- The official `efficient_attn` CUDA path is replaced by `menagerie.kernels.chunked_attention`
  (`attention_impl` "auto": the Pallas kernel on GPU; elsewhere "xla", each chunk through
  `kernels.blocked_attention`, which skips the masked upper blocks of the chunk).
"""

from __future__ import annotations

import contextvars
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import pydantic
from flax import nnx, struct
from menagerie.kernels.chunked_attention import chunked_attention

from . import megalodon_ops as ops
from .attention_ops import apply_rope
from .axes import Axis, declare
from .config import ModelConfig, check_positive
from .layers import ACT_EMBED, BATCH, SEQ, Embed, Linear, constrain, dtype_of, param
from .parts import Aux, Ctx, Output, reduce_aux
from .stack import decode_layers, run_layers, stack_layers, stacked

declare(
    Axis("z", "feature", "tensor", lowrank=True, doc="Megalodon shared q/k width Z"),
    Axis("value", "feature", "tensor", lowrank=True, doc="Megalodon value width E"),
    Axis("mega_out", "feature", "tensor", lowrank=True, doc="Megalodon Wh1 output width"),
    Axis("qk", "vector", None, doc="Megalodon's q and k rows of gamma / beta"),
    Axis("cema_ndim", "vector", None, doc="CEMA dimensions per channel"),
    Axis("complex", "vector", None, doc="real and imaginary parts"),
)


class MegalodonConfig(ModelConfig):
    """Megalodon with the official field names (`ModelConf` in `megalodon/config.py`).

    Shared names: `d_model` is the official `model_dim`, `n_layers` `num_layers`,
    `tie_embeddings` `share_emb` (default False, as there), `norm_eps` `norm_eps`.
    `init_std` is not read: the official initialisation fixes every scale.
    """

    family: Literal["megalodon"] = "megalodon"
    """Selects this family."""
    tie_embeddings: bool = False
    """Official `share_emb`: the output layer uses the embedding table."""
    num_heads: int = 1
    """Attention heads H; z_dim and value_dim are split over them."""
    z_dim: int = 64
    """Z: width of the shared query/key representation."""
    value_dim: int = 512
    """E: width of the values and of the reset gate."""
    ffn_hidden_dim: int = 512
    """Hidden width of the normalised FFN."""
    cema_ndim: int = 16
    """N: complex EMA dimensions per channel."""
    chunk_size: int = 2048
    """C: tokens per attention chunk (attention is block-diagonal causal over chunks)."""
    cema_segment: int | None = None
    """Tokens per CEMA FFT segment (state carried between segments). None: chunk_size, at most
    256: CEMA's [D,N,S] coefficient tensors and FFTs shrink with S, and on XLA:CPU a Megalodon
    train step at 8 x 4096 (chunk 1024) took 6.96 s with S = 1024 and 6.00 s with S = 256."""
    norm_num_groups: int = 32
    """G: TimestepNorm groups (d_model is split into G groups of d_model/G)."""
    rope_base: float = 10000.0
    """RoPE base of the chunk-local positions (official default 10000; the paper's 7B 1e5)."""
    swiglu: bool = False
    """NFFN as SwiGLU (fc2(silu(fc1 x) * fc3 x)) instead of fc2(silu(fc1 x))."""
    scale_emb: bool = False
    """Multiply the embeddings by sqrt(d_model)."""
    rescale_nffn: bool = False
    """Layer scale on the NFFN output, initialised 0.1 * 0.5^layer (official; off in presets)."""
    attention_impl: Literal["auto", "xla", "reference", "pallas", "interpret"] = "auto"
    """Chunked attention: auto (Pallas on GPU, xla elsewhere) or one of those."""

    @pydantic.model_validator(mode="after")
    def _check_megalodon(self) -> MegalodonConfig:
        ints = ("num_heads", "z_dim", "value_dim", "ffn_hidden_dim", "cema_ndim", "chunk_size")
        check_positive(self, "model.", ints=(*ints, "cema_segment", "norm_num_groups"))
        check_positive(self, "model.", floats=("rope_base",))
        for name in ("z_dim", "value_dim"):
            if getattr(self, name) % self.num_heads:
                raise ValueError(
                    f"model.num_heads={self.num_heads} does not divide model.{name}="
                    f"{getattr(self, name)}; choose num_heads among its divisors"
                )
        if (self.z_dim // self.num_heads) % 2:
            raise ValueError(
                f"model.z_dim / num_heads = {self.z_dim // self.num_heads} is odd; RoPE rotates "
                "pairs, so make z_dim / num_heads even"
            )
        if self.d_model % self.norm_num_groups:
            raise ValueError(
                f"model.norm_num_groups={self.norm_num_groups} does not divide "
                f"model.d_model={self.d_model}; choose a divisor"
            )
        if self.scan_layers and self.rescale_nffn:
            raise ValueError(
                "model.rescale_nffn needs a per-layer init: set model.scan_layers=false with it"
            )
        return self

    @property
    def segment(self) -> int:
        """CEMA segment length (cema_segment, or chunk_size up to 256)."""
        return min(self.chunk_size, 256) if self.cema_segment is None else self.cema_segment

    def build(self, *, rngs: nnx.Rngs) -> Megalodon:
        return Megalodon(self, rngs=rngs)

    def mega_params(self) -> int:
        """One MEGA layer: TimestepNorm 2D + CEMA D(4N + 2) + RMSNorm D + Wz (D+1)Z +
        Wv, Wr 2(D+1)E + Wh1 (D+1)D + Wh2 E D + gamma, beta 4Z."""
        d, z, e, n = self.d_model, self.z_dim, self.value_dim, self.cema_ndim
        cema = d * (4 * n + 2)
        projections = (d + 1) * z + 2 * (d + 1) * e + (d + 1) * d + e * d
        return 2 * d + cema + d + projections + 4 * z

    def nffn_params(self) -> int:
        """One NFFN: LayerNorm 2D + (2 or 3) D F (+ D layer scale with rescale_nffn)."""
        d, f = self.d_model, self.ffn_hidden_dim
        return 2 * d + (3 if self.swiglu else 2) * d * f + (d if self.rescale_nffn else 0)

    def num_params(self, include_embeddings: bool = True) -> int:
        """Embedding V D + n_layers (MEGA + NFFN) + final TimestepNorm 2D + output D V (untied).
        Buffers (the TimestepNorm priors, RoPE frequencies) are not parameters."""
        d, v = self.d_model, self.padded_vocab
        head = 0 if self.tie_embeddings else d * v
        body = self.n_layers * (self.mega_params() + self.nffn_params()) + 2 * d
        return body + (v * d + head if include_embeddings else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (3x forward):
        matmuls 6 x (their parameters, the output layer included, tied or not);
        chunked attention 3 * min(T, C) * (Z + E) (QK^T and AV over half a chunk on average,
        as the baseline counts causal attention);
        CEMA 3 * D * (10 log2(2S) + 6 + 8N) per layer: per channel two real FFTs and an inverse
        of length 2S (5 n log2 n / 2 each, per segment of S tokens), the spectrum product, and
        the state bias and final state (4N each). Norms and elementwise work count nothing."""
        d, z, e, n = self.d_model, self.z_dim, self.value_dim, self.cema_ndim
        f = self.ffn_hidden_dim
        matmul = d * z + 2 * d * e + d * d + e * d + (3 if self.swiglu else 2) * d * f
        attention = 3 * min(seq_len, self.chunk_size) * (z + e)
        s = min(seq_len, self.segment)
        cema = 3 * d * (10 * math.log2(2 * s) + 6 + 8 * n)
        layer = 6 * matmul + attention + cema
        return float(self.n_layers * layer + 6 * d * self.padded_vocab)


def he_init(fan_in: int) -> jax.nn.initializers.Initializer:
    """torch kaiming_normal_(a=sqrt(5)): N(0, 1 / (3 fan_in)), untruncated."""
    return jax.nn.initializers.normal(1.0 / math.sqrt(3 * fan_in))


def gaussian_init(dim: int) -> jax.nn.initializers.Initializer:
    """The official 'gaussian' init: N(0, 1/dim) truncated at 3 sigma."""
    return jax.nn.initializers.truncated_normal(1.0 / math.sqrt(dim), lower=-3.0, upper=3.0)


def zeros_param(rngs, shape, names, cfg: MegalodonConfig) -> nnx.Param:
    """A zero-initialised parameter (norm scales stored as w, applied as 1 + w; biases)."""
    init = jax.nn.initializers.zeros
    return param(rngs, shape, names, std=None, dtype=dtype_of(cfg.param_dtype), init=init)


def dense(cfg: MegalodonConfig, d_in: int, d_out: int, names, *, bias: bool, rngs) -> Linear:
    """An internal Linear with the official 'he' init."""
    return Linear(
        d_in,
        d_out,
        names,
        std=None,
        init=he_init(d_in),
        bias=bias,
        param_dtype=dtype_of(cfg.param_dtype),
        compute_dtype=dtype_of(cfg.compute_dtype),
        rngs=rngs,
    )


def _theta_init(key, shape, dtype=jnp.float32):
    """sigmoid(theta) = D^(-i/D), i = 1..D, randomly permuted; theta stores the logit."""
    (d,) = shape
    freqs = jnp.exp(-jnp.arange(1, d + 1, dtype=jnp.float32) * math.log(d) / d)
    freqs = jax.random.permutation(key, freqs)
    return jnp.log(freqs / (1.0 - freqs)).astype(dtype)


def _gamma_init(key, shape, dtype=jnp.float32):
    """Real part N(0, 1), imaginary part 0."""
    re = jax.random.normal(key, shape[:-1], dtype)
    return jnp.stack([re, jnp.zeros_like(re)], axis=-1)


class TimestepNorm(nnx.Module):
    """Cumulative group norm with (1 + weight) scale and bias ([D] each, zeros)."""

    def __init__(self, cfg: MegalodonConfig, *, rngs: nnx.Rngs):
        self.weight = zeros_param(rngs, (cfg.d_model,), ("norm",), cfg)
        self.bias = zeros_param(rngs, (cfg.d_model,), ("norm",), cfg)
        self.groups, self.eps = cfg.norm_num_groups, cfg.norm_eps

    def zero_state(self, batch: int) -> ops.NormState:
        return ops.NormState.zeros(batch, self.groups)

    def _local(self, x_BLD, state: ops.NormState) -> tuple[jax.Array, ops.NormState]:
        w, b = self.weight[...], self.bias[...]
        return ops.timestep_norm(x_BLD, w, b, state, groups=self.groups, eps=self.eps)

    def __call__(self, x_BLD, state: ops.NormState) -> tuple[jax.Array, ops.NormState]:
        """(y, statistics after the last token). Under `sequence_parallel`, x is this device's
        block and its incoming statistics are those of every earlier block (and `state`)."""
        if _SEQUENCE_AXIS.get() is None:
            return self._local(x_BLD, state)
        incoming, final = _prefix(state, ops.norm_summary(x_BLD, self.groups), ops.merge_norm)
        return self._local(x_BLD, incoming)[0], final


class MultiHeadComplexEMA(nnx.Module):
    """CEMA with the official parameters: alpha, delta [D,N], theta [D], gamma [D,N,2],
    omega [D] (the official shapes [D,N,1], [D,1,1], [D,1] without their unit axes)."""

    def __init__(self, cfg: MegalodonConfig, *, rngs: nnx.Rngs):
        d, n, dt = cfg.d_model, cfg.cema_ndim, dtype_of(cfg.param_dtype)
        normal02 = jax.nn.initializers.normal(0.2)
        omega_init = jax.nn.initializers.truncated_normal(0.25, lower=-4.0, upper=4.0)
        names = ("embed", "cema_ndim")
        self.alpha = param(rngs, (d, n), names, std=None, dtype=dt, init=normal02)
        self.delta = param(rngs, (d, n), names, std=None, dtype=dt, init=normal02)
        self.theta = param(rngs, (d,), ("embed",), std=None, dtype=dt, init=_theta_init)
        gamma_names = (*names, "complex")
        self.gamma = param(rngs, (d, n, 2), gamma_names, std=None, dtype=dt, init=_gamma_init)
        self.omega = param(rngs, (d,), ("embed",), std=None, dtype=dt, init=omega_init)
        self.ndim, self.segment = n, cfg.segment

    def zero_state(self, batch: int) -> tuple[jax.Array, jax.Array]:
        return ops.zero_cema_state(batch, self.omega.shape[0], self.ndim)

    def _coeffs(self, length: int) -> tuple[ops.CEMACoeffs, int]:
        seg = min(self.segment, length)
        c = ops.cema_coeffs(self.alpha[...], self.delta[...], self.theta[...], self.gamma[...], seg)
        return c, seg

    def __call__(self, x_BLD, h) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """y [B,L,D] float32 and the state after the last token. Under `sequence_parallel`, x is
        this device's block and its incoming state is what every earlier block (and `h`)
        leaves: each block's state from zero is all-gathered and combined in order."""
        length = x_BLD.shape[1]
        c, seg = self._coeffs(length)
        if _SEQUENCE_AXIS.get() is None:
            return ops.cema(x_BLD, h, c, self.omega[...], segment=seg)
        zero = jax.tree.map(jnp.zeros_like, h)
        local = ops.cema_final_state(x_BLD, zero, c, segment=seg)

        def then(h_before, block_state):
            advanced = ops.cema_advance(h_before, c, length)
            return advanced[0] + block_state[0], advanced[1] + block_state[1]

        incoming, final = _prefix(h, local, then)
        return ops.cema(x_BLD, incoming, c, self.omega[...], segment=seg)[0], final


# Inside `sequence_parallel`: (mesh axis name, this device's block index as an int32 array).
_SEQUENCE_AXIS: contextvars.ContextVar[tuple[str, jax.Array] | None] = contextvars.ContextVar(
    "megalodon_sequence_axis", default=None
)


def _sequence_devices(length: int, chunk: int) -> int:
    """Devices along the active mesh's `sequence` axis when each gets whole chunks of the
    `length` tokens; else 1 (the compiler then places the whole-sequence computation)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or "sequence" not in mesh.axis_names:
        return 1
    p = mesh.shape["sequence"]
    return p if p > 1 and length % p == 0 and (length // p) % chunk == 0 else 1


def _prefix(initial, mine, combine):
    """Sequence parallelism's exclusive scan over the `sequence` axis: (what precedes this
    device's block, what follows the last block), from every block's summary `mine`."""
    axis, index = _SEQUENCE_AXIS.get()
    every = jax.lax.all_gather(mine, axis)  # leading axis: blocks in sequence order
    before = current = initial
    for k in range(jax.lax.axis_size(axis)):
        before = jax.tree.map(lambda b, c, k=k: jnp.where(index == k, c, b), before, current)
        current = combine(current, jax.tree.map(lambda a, k=k: a[k], every))
    return before, current


def sequence_parallel(fn, module: nnx.Module, x_BLD: jax.Array, state, chunk: int):
    """`fn(module, x, state) -> (y, state)` with x split over the mesh axis `sequence`, each
    device running its own contiguous block (the official "chunk parallelism"); the state
    passed in and returned is the whole sequence's (replicated). Without such an axis (or when
    a device would not hold whole chunks) `fn` runs on the whole sequence."""
    if _SEQUENCE_AXIS.get() is not None or _sequence_devices(x_BLD.shape[1], chunk) == 1:
        return fn(module, x_BLD, state)
    graphdef, params = nnx.split(module)
    seq = jax.sharding.PartitionSpec(None, "sequence", None)
    rep = jax.sharding.PartitionSpec()
    blocks = jax.sharding.get_abstract_mesh().shape["sequence"]

    def body(params, x, state, index):
        # The block index comes in as data, not lax.axis_index: XLA:CPU executables loaded
        # from the persistent compilation cache get partition ids wrong and deadlock.
        token = _SEQUENCE_AXIS.set(("sequence", index[0]))
        try:
            return fn(nnx.merge(graphdef, params), x, state)
        finally:
            _SEQUENCE_AXIS.reset(token)

    return jax.shard_map(
        body,
        in_specs=(rep, seq, rep, jax.sharding.PartitionSpec("sequence")),
        out_specs=(seq, rep),
        axis_names={"sequence"},
        check_vma=False,
    )(params, x_BLD, state, jnp.arange(blocks, dtype=jnp.int32))


def _rms(x: jax.Array, eps: float) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


def empty_layer_cache(cfg: MegalodonConfig, batch: int) -> ops.LayerCache:
    """One MEGA layer's decoding state before the first token."""
    shape, dt = (batch, cfg.chunk_size, cfg.num_heads), dtype_of(cfg.compute_dtype)
    return ops.LayerCache(
        norm=ops.NormState.zeros(batch, cfg.norm_num_groups),
        cema=ops.zero_cema_state(batch, cfg.d_model, cfg.cema_ndim),
        keys=jnp.zeros((*shape, cfg.z_dim // cfg.num_heads), dt),
        values=jnp.zeros((*shape, cfg.value_dim // cfg.num_heads), dt),
    )


class MegaLayer(nnx.Module):
    """The MEGA layer (official `MovingAverageGatedAttention`); output includes + x."""

    def __init__(self, cfg: MegalodonConfig, *, rngs: nnx.Rngs):
        d, z, e = cfg.d_model, cfg.z_dim, cfg.value_dim
        self.timenorm = TimestepNorm(cfg, rngs=rngs)
        self.cema = MultiHeadComplexEMA(cfg, rngs=rngs)
        self.rmsnorm = zeros_param(rngs, (d,), ("norm",), cfg)
        self.wz = dense(cfg, d, z, ("embed", "z"), bias=True, rngs=rngs)
        self.wv = dense(cfg, d, e, ("embed", "value"), bias=True, rngs=rngs)
        self.wr = dense(cfg, d, e, ("embed", "value"), bias=True, rngs=rngs)
        self.wh1 = dense(cfg, d, d, ("embed", "mega_out"), bias=True, rngs=rngs)
        self.wh2 = dense(cfg, e, d, ("value", "embed"), bias=False, rngs=rngs)
        self.gamma = zeros_param(rngs, (2, z), ("qk", "z"), cfg)
        self.beta = zeros_param(rngs, (2, z), ("qk", "z"), cfg)
        self.cfg = cfg

    def zero_state(self, batch: int) -> tuple[ops.NormState, tuple[jax.Array, jax.Array]]:
        return self.timenorm.zero_state(batch), self.cema.zero_state(batch)

    def _qk(self, mx_BLD: jax.Array, pos_BL: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Shared z, per-head RMS-normalised, then the q and k affines; RoPE at `pos_BL` (the
        position in the chunk: RoPE restarts in every chunk)."""
        cfg = self.cfg
        b, length, _ = mx_BLD.shape
        hz = cfg.z_dim // cfg.num_heads
        z = _rms(self.wz(mx_BLD).reshape(b, length, cfg.num_heads, hz), cfg.norm_eps)
        gamma = (self.gamma[...].astype(jnp.float32) + 1.0) / math.sqrt(hz)
        gamma = gamma.reshape(2, cfg.num_heads, hz)
        beta = self.beta[...].astype(jnp.float32).reshape(2, cfg.num_heads, hz)
        q, k = z * gamma[0] + beta[0], z * gamma[1] + beta[1]
        q = apply_rope(q, pos_BL, cfg.rope_base, interleaved=True)
        k = apply_rope(k, pos_BL, cfg.rope_base, interleaved=True)
        compute = dtype_of(cfg.compute_dtype)
        return q.astype(compute), k.astype(compute)

    def _project(self, x_BLD: jax.Array, state, start) -> tuple[jax.Array, ...]:
        """Everything before attention, for tokens at positions start, start+1, ...:
        (mx, q, k, v, r, state after the last token)."""
        cfg = self.cfg
        b, length, _ = x_BLD.shape
        xt, c, state = self._recurrent(x_BLD, state)
        compute = dtype_of(cfg.compute_dtype)
        mx = (_rms(c, cfg.norm_eps) * (self.rmsnorm[...].astype(jnp.float32) + 1)).astype(compute)
        mx = constrain(mx, (BATCH, SEQ, ACT_EMBED))
        pos = jnp.broadcast_to((start + jnp.arange(length)) % cfg.chunk_size, (b, length))
        q, k = self._qk(mx, pos)
        v = jax.nn.silu(self.wv(xt)).reshape(b, length, cfg.num_heads, -1)
        r = jax.nn.silu(self.wr(mx))
        return mx, q, k, v, r, state

    def _output(self, x_BLD, mx_BLD, o_BLHE, r_BLE) -> jax.Array:
        """mx Wh1 + bh1 + (o * r) Wh2 + x."""
        b, length = x_BLD.shape[:2]
        y = self.wh1(mx_BLD) + self.wh2(o_BLHE.reshape(b, length, -1) * r_BLE)
        return (y + x_BLD).astype(x_BLD.dtype)

    def __call__(self, x_BLD: jax.Array, state) -> tuple[jax.Array, tuple]:
        """(MEGA(x) + x, state after the last token) from the incoming state."""
        cfg = self.cfg
        mx, q, k, v, r, state = self._project(x_BLD, state, 0)
        o = chunked_attention(
            q, k, v, chunk_size=cfg.chunk_size, causal=True, scale=1.0, impl=cfg.attention_impl
        )
        return self._output(x_BLD, mx, o, r), state

    def decode(
        self, x_BLD: jax.Array, cache: ops.LayerCache, start
    ) -> tuple[jax.Array, ops.LayerCache]:
        """`__call__` for tokens at positions start.. of a sequence whose earlier tokens left
        `cache`; returns the cache after them."""
        mx, q, k, v, r, state = self._project(x_BLD, (cache.norm, cache.cema), start)
        o, (keys, values) = ops.attend_cached(q, k, v, cache.keys, cache.values, start)
        return self._output(x_BLD, mx, o, r), ops.LayerCache(*state, keys, values)

    def _recurrent(self, x_BLD: jax.Array, state) -> tuple[jax.Array, jax.Array, tuple]:
        """TimestepNorm then CEMA from `state`: (xt, CEMA output, state after the last token)."""
        norm_state, h = state
        xt, norm_state = self.timenorm(x_BLD, norm_state)
        c, h = self.cema(xt, h)
        return xt, c, (norm_state, h)


class NormalizedFFN(nnx.Module):
    """LayerNorm (1 + w, b) -> fc2(silu(fc1 x) [* fc3 x]) [* layer scale] + residual."""

    def __init__(self, cfg: MegalodonConfig, *, rngs: nnx.Rngs, layer: int = 0):
        d, f = cfg.d_model, cfg.ffn_hidden_dim
        self.norm_weight = zeros_param(rngs, (d,), ("norm",), cfg)
        self.norm_bias = zeros_param(rngs, (d,), ("norm",), cfg)
        self.fc1 = dense(cfg, d, f, ("embed", "mlp"), bias=False, rngs=rngs)
        self.fc2 = dense(cfg, f, d, ("mlp", "embed"), bias=False, rngs=rngs)
        self.fc3 = dense(cfg, d, f, ("embed", "mlp"), bias=False, rngs=rngs) if cfg.swiglu else None
        scale = jax.nn.initializers.constant(0.1 * 0.5**layer)
        dt = dtype_of(cfg.param_dtype)
        self.alpha = (
            param(rngs, (d,), ("norm",), std=None, dtype=dt, init=scale)
            if cfg.rescale_nffn
            else None
        )
        self.eps = cfg.norm_eps

    def __call__(self, y_BLD: jax.Array, residual_BLD: jax.Array) -> jax.Array:
        x = y_BLD.astype(jnp.float32)
        x = (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + self.eps)
        x = x * (self.norm_weight[...].astype(jnp.float32) + 1) + self.norm_bias[...]
        h = jax.nn.silu(self.fc1(x))
        if self.fc3 is not None:
            h = h * self.fc3(x)
        out = self.fc2(h)
        if self.alpha is not None:
            out = out * self.alpha[...].astype(out.dtype)
        return (out + residual_BLD).astype(residual_BLD.dtype)


class MegaBlock(nnx.Module):
    """y = MEGA(x) (with + x); out = NFFN(y) + x. Called as a layer of `arch.stack`."""

    def __init__(self, cfg: MegalodonConfig, *, rngs: nnx.Rngs, layer: int = 0):
        self.mega = MegaLayer(cfg, rngs=rngs)
        self.nffn = NormalizedFFN(cfg, rngs=rngs, layer=layer)
        self.chunk_size = cfg.chunk_size

    def step(self, x_BLD: jax.Array, state) -> tuple[jax.Array, tuple]:
        """The block from an incoming recurrent state; returns the outgoing one. With the
        mesh axis `sequence`, each device runs its own block of the sequence."""
        return sequence_parallel(MegaBlock._step, self, x_BLD, state, self.chunk_size)

    def _step(self, x_BLD: jax.Array, state) -> tuple[jax.Array, tuple]:
        with jax.named_scope("mega_block"):
            y, state = self.mega(x_BLD, state)
            out = constrain(self.nffn(y, x_BLD), (BATCH, SEQ, ACT_EMBED))
        return out, state

    def __call__(self, x_BLD: jax.Array, ctx: Ctx) -> tuple[jax.Array, Aux]:
        del ctx
        out, _ = self.step(x_BLD, self.mega.zero_state(x_BLD.shape[0]))
        return out, {}

    def decode(self, x_BLD: jax.Array, cache: ops.LayerCache, start) -> tuple[jax.Array, Any]:
        """The block for tokens at positions start.. (see `MegaLayer.decode`)."""
        y, cache = self.mega.decode(x_BLD, cache, start)
        return self.nffn(y, x_BLD), cache


@struct.dataclass
class DecodeState:
    """Incremental decoding state: per-layer caches stacked over layers [n_layers, ...], the
    final TimestepNorm's statistics, and the number of tokens seen (int32 scalar)."""

    layers: ops.LayerCache
    final_norm: ops.NormState
    position: jax.Array


class Megalodon(nnx.Module):
    """Embedding (x sqrt(D) with scale_emb) -> MegaBlocks -> final TimestepNorm -> output."""

    def __init__(self, cfg: MegalodonConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, v = cfg.d_model, cfg.padded_vocab
        self.embed = Embed(
            v,
            d,
            std=None,
            init=gaussian_init(d),
            param_dtype=dtype_of(cfg.param_dtype),
            compute_dtype=dtype_of(cfg.compute_dtype),
            rngs=rngs,
        )
        if cfg.scan_layers:
            self.blocks = stack_layers(lambda rngs: MegaBlock(cfg, rngs=rngs), cfg, rngs=rngs)
        else:
            layers = [MegaBlock(cfg, rngs=rngs, layer=i) for i in range(cfg.n_layers)]
            self.blocks = nnx.List(layers)
        self.final_norm = TimestepNorm(cfg, rngs=rngs)
        self.output = (
            None
            if cfg.tie_embeddings
            else Linear(
                d,
                v,
                ("embed", "vocab"),
                std=None,
                init=gaussian_init(d),
                param_dtype=dtype_of(cfg.param_dtype),
                compute_dtype=dtype_of(cfg.compute_dtype),
                rngs=rngs,
            )
        )

    def __call__(self, tokens_BT: jax.Array, ctx: Ctx | None = None, **ctx_fields) -> Output:
        """tokens [B,T] int32 -> Output(logits [B,T,V] float32, aux_loss 0, metrics {})."""
        ctx = Ctx.make(tokens_BT, **ctx_fields) if ctx is None else ctx
        x, aux = run_layers(self.blocks, self._embed(tokens_BT), ctx, self.cfg)
        zero = self.final_norm.zero_state(x.shape[0])
        chunk = self.cfg.chunk_size
        x, _ = sequence_parallel(TimestepNorm.__call__, self.final_norm, x, zero, chunk)
        loss, metrics = reduce_aux(aux, stacked=True)
        return Output(logits=self._logits(x), aux_loss=loss, metrics=metrics)

    def _embed(self, tokens_BT: jax.Array) -> jax.Array:
        x = self.embed(tokens_BT)
        if self.cfg.scale_emb:
            x = x * math.sqrt(self.cfg.d_model)
        return constrain(x, (BATCH, SEQ, ACT_EMBED))

    def _logits(self, x_BTD: jax.Array) -> jax.Array:
        if self.output is None:
            return self.embed.attend(x_BTD)
        return self.output(x_BTD, out_dtype=jnp.float32)

    decodes = True  # has init_state / decode (see train.generate)
    state_grows = False  # the same state size at any context length

    def init_state(self, batch: int, max_len: int | None = None) -> DecodeState:
        """The decoding state before the first token of `batch` sequences; its size does not
        depend on the length (`max_len` is not needed)."""
        layers = stacked(empty_layer_cache(self.cfg, batch), self.cfg)
        zero = jnp.zeros((), jnp.int32)
        return DecodeState(layers, self.final_norm.zero_state(batch), zero)

    def decode(self, tokens_BT: jax.Array, state: DecodeState) -> tuple[jax.Array, DecodeState]:
        """Logits [B,T,V] float32 of T more tokens (one for a decode step, a prompt piece for
        prefill; any T, across chunk boundaries too) and the state after them. Token by token
        this gives what the full forward pass gives for the whole sequence."""
        x = self._embed(tokens_BT)
        x, layers = decode_layers(self.blocks, x, state.layers, state.position, self.cfg)
        x, final_norm = self.final_norm(x, state.final_norm)
        position = state.position + tokens_BT.shape[1]
        return self._logits(x), DecodeState(layers, final_norm, position)
