"""Shared building blocks: norms, linear maps, embeddings, RoPE, attention, SwiGLU.

Conventions
- Parameters are stored in `param_dtype` and cast to `compute_dtype` where they are used; in
  float32 mode every cast is a no-op and XLA sees none.
- Every parameter carries logical axis names in its `out_sharding` metadata (flax 0.12), set
  through `param(...)`. Parameter names: vocab, embed, heads, kv_heads, head_dim, mlp, norm;
  nnx.vmap/scan add "layers" in front for stacked blocks. Only train/mesh.py maps names to
  mesh axes.
- Activations are named through `constrain(x, names)` with the names below; it is a no-op
  unless a mesh is active and logical-axis rules are set.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import spmd as core_spmd

from .config import ModelConfig

# Logical names of activation axes (distinct from parameter names so FSDP can shard
# parameters on "embed" without sharding activations the same way).
BATCH, SEQ = "batch", "seq"
ACT_EMBED, ACT_HEADS, ACT_KV_HEADS, ACT_MLP, ACT_VOCAB = (
    "act_embed",
    "act_heads",
    "act_kv_heads",
    "act_mlp",
    "act_vocab",
)

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dtype_of(name: str) -> jnp.dtype:
    """`"float32" | "bfloat16"` -> jnp dtype."""
    return _DTYPES[name]


def param(
    rngs: nnx.Rngs,
    shape: Sequence[int],
    names: Sequence[str],
    *,
    std: float | None,
    dtype: jnp.dtype,
) -> nnx.Param:
    """A parameter initialised N(0, std) (or ones when std is None) with logical axis names.

    eager_sharding=False: the trainer initialises under jit with out_shardings derived from
    the names, so the variable must not try to shard itself at creation (that would need a
    mesh and rules inside every test).
    """
    init = jax.nn.initializers.ones if std is None else jax.nn.initializers.normal(std)
    init = nnx.with_partitioning(init, tuple(names), eager_sharding=False)
    return nnx.Param(init(rngs.params(), tuple(shape), dtype))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical axis names.

    No-op unless a mesh is active (`jax.set_mesh`) and logical-axis rules are set
    (`flax.core.spmd.set_logical_axis_rules` / `nnx.logical_axis_rules`). Names missing
    from the rules are left unconstrained (None).
    """
    rules = core_spmd.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh is None or mesh.empty:
        return x
    table: dict = {}
    for logical, mesh_axes in rules:  # first match wins, as in flax's rule lookup
        table.setdefault(logical, mesh_axes)
    spec = jax.sharding.PartitionSpec(*(table.get(n) if n else None for n in names))
    return jax.lax.with_sharding_constraint(x, spec)


class RMSNorm(nnx.Module):
    """RMSNorm (Zhang & Sennrich 2019) with statistics in float32; scale named ("norm",)."""

    def __init__(self, dim: int, *, eps: float, param_dtype, compute_dtype, rngs: nnx.Rngs):
        self.scale = param(rngs, (dim,), ("norm",), std=None, dtype=param_dtype)
        self.eps = eps
        self.compute_dtype = compute_dtype

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        x = x_BTD.astype(jnp.float32)
        ms = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        y = x * jax.lax.rsqrt(ms + self.eps) * self.scale[...].astype(jnp.float32)
        return y.astype(self.compute_dtype)


class Linear(nnx.Module):
    """y = x @ W contracting the trailing `len(in_shape)` axes of x with W[*in_shape, *out_shape].

    `names` are the logical names of W's axes, e.g. ("embed", "heads", "head_dim") for a query
    projection [D,H,Dh]. The output has x's leading axes followed by out_shape, in
    `compute_dtype` (or `out_dtype`).
    """

    def __init__(
        self,
        in_shape: int | Sequence[int],
        out_shape: int | Sequence[int],
        names: Sequence[str],
        *,
        std: float,
        param_dtype,
        compute_dtype,
        rngs: nnx.Rngs,
    ):
        in_shape = (in_shape,) if isinstance(in_shape, int) else tuple(in_shape)
        out_shape = (out_shape,) if isinstance(out_shape, int) else tuple(out_shape)
        assert len(names) == len(in_shape) + len(out_shape), (names, in_shape, out_shape)
        self.kernel = param(rngs, in_shape + out_shape, names, std=std, dtype=param_dtype)
        self.n_in = len(in_shape)
        self.compute_dtype = compute_dtype

    def __call__(self, x: jax.Array, *, out_dtype=None) -> jax.Array:
        w = self.kernel[...].astype(self.compute_dtype)
        x = x.astype(self.compute_dtype)
        n = self.n_in
        dims = (tuple(range(x.ndim - n, x.ndim)), tuple(range(n)))
        return jax.lax.dot_general(x, w, (dims, ((), ())), preferred_element_type=out_dtype)


class Embed(nnx.Module):
    """Token embedding table [V, D] named ("vocab", "embed"); `attend` is the tied LM head."""

    def __init__(self, vocab: int, dim: int, *, std: float, param_dtype, compute_dtype, rngs):
        self.table = param(rngs, (vocab, dim), ("vocab", "embed"), std=std, dtype=param_dtype)
        self.compute_dtype = compute_dtype

    def __call__(self, tokens_BT: jax.Array) -> jax.Array:
        """int32 [B,T] -> [B,T,D] compute_dtype."""
        return jnp.take(self.table[...], tokens_BT, axis=0).astype(self.compute_dtype)

    def attend(self, x_BTD: jax.Array) -> jax.Array:
        """[B,T,D] -> logits [B,T,V] float32 (x @ table^T)."""
        table = self.table[...].astype(self.compute_dtype)
        return jnp.einsum(
            "btd,vd->btv",
            x_BTD.astype(self.compute_dtype),
            table,
            preferred_element_type=jnp.float32,
        )


def apply_rope(x_BTHD: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding (Su et al. 2021), rotate-half layout as in HF Llama.

    Positions are per token, so packed documents restart at 0. Angles in float32; output in
    x's dtype. Pairs (i, i + D/2) rotate by positions * theta^(-2i/D).
    """
    d = x_BTHD.shape[-1]
    inv_freq = theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)  # [D/2]
    angles_BTF = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    cos = jnp.cos(angles_BTF)[:, :, None, :]  # [B,T,1,D/2]
    sin = jnp.sin(angles_BTF)[:, :, None, :]
    x = x_BTHD.astype(jnp.float32)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTHD.dtype)


def attention(
    q_BTHD: jax.Array,
    k_BTKD: jax.Array,
    v_BTKD: jax.Array,
    *,
    segment_ids_BT: jax.Array,
    causal: bool = True,
    impl: Literal["xla", "cudnn"] = "xla",
    q_block: int = 256,
) -> jax.Array:
    """Softmax attention with GQA; query t sees key s iff (s <= t if causal) and same segment.

    q [B,T,H,D], k/v [B,T,K,D] with K | H (query head h reads kv head h // G, G = H/K);
    returns [B,T,H,D] in q's dtype. "xla": each kv head serves its G query heads without
    repeating k/v; scores and softmax in float32. When causal, queries are split into
    ceil(T / q_block) blocks and each block only scores the keys up to its own end, so the
    fully masked upper blocks cost nothing (exact: they would get weight 0). "cudnn":
    jax.nn.dot_product_attention's cuDNN kernel (GPU, bf16/fp16 inputs; untested here so far).
    """
    b, t, h, d = q_BTHD.shape
    kv = k_BTKD.shape[2]
    g = h // kv
    scale = 1.0 / math.sqrt(d)
    if impl == "cudnn":
        same_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
        if causal:
            same_BTS = same_BTS & jnp.tril(jnp.ones((t, t), dtype=jnp.bool_))[None]
        return jax.nn.dot_product_attention(
            q_BTHD, k_BTKD, v_BTKD, mask=same_BTS[:, None], scale=scale, implementation="cudnn"
        )
    # Layout: heads lead and the G query heads of a kv head are stacked along the query axis
    # (M = G*C for a block of C queries), so both matmuls are plain batched [M,D]x[D,S]
    # products over (B,K); on XLA CPU this runs ~2x faster than einsums over [B,T,K,G,D].
    # The score tensor is memory-bound on CPU (softmax and its backward are several passes
    # over [B,K,G,C,S]), so skipping the upper blocks saves about as much time as FLOPs
    # (bench: B=4,T=1024,H=8,D=64, 4 blocks: fwd+bwd ~2x faster than one block).
    q_BKGTD = (q_BTHD * jnp.asarray(scale, q_BTHD.dtype)).reshape(b, t, kv, g, d)
    q_BKGTD = q_BKGTD.transpose(0, 2, 3, 1, 4)
    k_BKSD = k_BTKD.transpose(0, 2, 1, 3)
    v_BKSD = v_BTKD.transpose(0, 2, 1, 3)
    n_blocks = max(1, -(-t // q_block)) if causal else 1
    bounds = tuple(round(i * t / n_blocks) for i in range(n_blocks + 1))
    o_BKGTD = _blocked_attention(bounds, causal, q_BKGTD, k_BKSD, v_BKSD, segment_ids_BT)
    return o_BKGTD.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def _block_scores(lo, hi, causal, q_BKGTD, k_BKSD, segment_ids_BT):
    """Masked float32 scores [B,K,G,C,S] of queries lo:hi against the keys they can see, and
    the block's queries as [B,K,G*C,D]."""
    b, kv, g, t, d = q_BKGTD.shape
    c, s = hi - lo, (hi if causal else t)
    q_BKMD = q_BKGTD[:, :, :, lo:hi].reshape(b, kv, g * c, d)
    s_BKMS = jnp.einsum(
        "bkmd,bksd->bkms", q_BKMD, k_BKSD[:, :, :s], preferred_element_type=jnp.float32
    )
    mask_BCS = segment_ids_BT[:, lo:hi, None] == segment_ids_BT[:, None, :s]
    if causal:
        rows = jax.lax.broadcasted_iota(jnp.int32, (c, s), 0) + lo
        mask_BCS = mask_BCS & (rows >= jax.lax.broadcasted_iota(jnp.int32, (c, s), 1))[None]
    s_BKGCS = s_BKMS.reshape(b, kv, g, c, s)
    return jnp.where(mask_BCS[:, None, None], s_BKGCS, jnp.finfo(jnp.float32).min), q_BKMD


def _blocked_attention_fwd(bounds, causal, q_BKGTD, k_BKSD, v_BKSD, segment_ids_BT):
    b, kv, g, t, d = q_BKGTD.shape
    outs, lses = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        c, s = hi - lo, (hi if causal else t)
        s_BKGCS, _ = _block_scores(lo, hi, causal, q_BKGTD, k_BKSD, segment_ids_BT)
        m_BKGC = jnp.max(s_BKGCS, axis=-1)
        e_BKGCS = jnp.exp(s_BKGCS - m_BKGC[..., None])
        l_BKGC = jnp.sum(e_BKGCS, axis=-1)
        p_BKMS = (e_BKGCS / l_BKGC[..., None]).astype(v_BKSD.dtype).reshape(b, kv, g * c, s)
        o_BKMD = jnp.einsum("bkms,bksd->bkmd", p_BKMS, v_BKSD[:, :, :s])
        outs.append(o_BKMD.reshape(b, kv, g, c, d))
        lses.append(m_BKGC + jnp.log(l_BKGC))
    o_BKGTD = jnp.concatenate(outs, axis=3) if len(outs) > 1 else outs[0]
    lse_BKGT = jnp.concatenate(lses, axis=3) if len(lses) > 1 else lses[0]
    return o_BKGTD, (q_BKGTD, k_BKSD, v_BKSD, segment_ids_BT, o_BKGTD, lse_BKGT)


def _blocked_attention_bwd(bounds, causal, res, do_BKGTD):
    # FlashAttention's backward (Dao et al. 2022, Alg. 4) at block granularity: probabilities
    # are recomputed from the saved log-sum-exp, so no [T,S] tensor is saved for the backward
    # (inside a layer scan such residuals are stacked over layers: a large write and read).
    q_BKGTD, k_BKSD, v_BKSD, segment_ids_BT, o_BKGTD, lse_BKGT = res
    b, kv, g, t, d = q_BKGTD.shape
    delta_BKGT = jnp.sum(do_BKGTD.astype(jnp.float32) * o_BKGTD.astype(jnp.float32), axis=-1)
    dq_blocks = []
    dk_BKSD = jnp.zeros(k_BKSD.shape, jnp.float32)
    dv_BKSD = jnp.zeros(v_BKSD.shape, jnp.float32)
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        c, s = hi - lo, (hi if causal else t)
        s_BKGCS, q_BKMD = _block_scores(lo, hi, causal, q_BKGTD, k_BKSD, segment_ids_BT)
        p_BKGCS = jnp.exp(s_BKGCS - lse_BKGT[:, :, :, lo:hi, None])
        do_BKMD = do_BKGTD[:, :, :, lo:hi].reshape(b, kv, g * c, d)
        p_BKMS = p_BKGCS.astype(v_BKSD.dtype).reshape(b, kv, g * c, s)
        dv_BKSD = dv_BKSD.at[:, :, :s].add(
            jnp.einsum("bkms,bkmd->bksd", p_BKMS, do_BKMD, preferred_element_type=jnp.float32)
        )
        dp_BKMS = jnp.einsum(
            "bkmd,bksd->bkms", do_BKMD, v_BKSD[:, :, :s], preferred_element_type=jnp.float32
        )
        ds_BKGCS = p_BKGCS * (dp_BKMS.reshape(b, kv, g, c, s) - delta_BKGT[:, :, :, lo:hi, None])
        ds_BKMS = ds_BKGCS.astype(q_BKGTD.dtype).reshape(b, kv, g * c, s)
        dq_BKMD = jnp.einsum("bkms,bksd->bkmd", ds_BKMS, k_BKSD[:, :, :s])
        dq_blocks.append(dq_BKMD.reshape(b, kv, g, c, d))
        dk_BKSD = dk_BKSD.at[:, :, :s].add(
            jnp.einsum("bkms,bkmd->bksd", ds_BKMS, q_BKMD, preferred_element_type=jnp.float32)
        )
    dq_BKGTD = jnp.concatenate(dq_blocks, axis=3) if len(dq_blocks) > 1 else dq_blocks[0]
    dseg = np.zeros(segment_ids_BT.shape, jax.dtypes.float0)
    return (
        dq_BKGTD.astype(q_BKGTD.dtype),
        dk_BKSD.astype(k_BKSD.dtype),
        dv_BKSD.astype(v_BKSD.dtype),
        dseg,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _blocked_attention(bounds, causal, q_BKGTD, k_BKSD, v_BKSD, segment_ids_BT):
    """Attention of pre-scaled q [B,K,G,T,D] over k/v [B,K,S,D] with queries in blocks
    `bounds`; -> [B,K,G,T,D]."""
    return _blocked_attention_fwd(bounds, causal, q_BKGTD, k_BKSD, v_BKSD, segment_ids_BT)[0]


_blocked_attention.defvjp(_blocked_attention_fwd, _blocked_attention_bwd)


# ---- parts ---------------------------------------------------------------------------------
# A part is an nnx.Module built as `Part(cfg, *, rngs)` and called as
# `part(x_BTD, *, positions, segment_ids) -> (y, aux)`, where `aux` is a dict of float32
# scalars (empty for the baseline). The key "aux_loss" is added to the training loss; every
# other key is a metric. A dict of arrays is a pytree, so it passes through nnx.scan as a
# stacked output and the model reduces it over layers (see transformer.reduce_aux).

Aux = dict[str, jax.Array]


class Attention(nnx.Module):
    """Causal multi-head / grouped-query self-attention with RoPE (Llama)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, h, k, hd = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_head
        kw = dict(
            std=cfg.init_std,
            param_dtype=dtype_of(cfg.param_dtype),
            compute_dtype=dtype_of(cfg.compute_dtype),
            rngs=rngs,
        )
        self.q = Linear(d, (h, hd), ("embed", "heads", "head_dim"), **kw)
        self.k = Linear(d, (k, hd), ("embed", "kv_heads", "head_dim"), **kw)
        self.v = Linear(d, (k, hd), ("embed", "kv_heads", "head_dim"), **kw)
        self.o = Linear((h, hd), d, ("heads", "head_dim", "embed"), **kw)
        self.rope_theta = cfg.rope_theta
        self.impl = cfg.attention_impl

    def __call__(self, x_BTD, *, positions, segment_ids) -> tuple[jax.Array, Aux]:
        with jax.named_scope("attention"):
            q_BTHD = constrain(self.q(x_BTD), (BATCH, SEQ, ACT_HEADS, None))
            k_BTKD = constrain(self.k(x_BTD), (BATCH, SEQ, ACT_KV_HEADS, None))
            v_BTKD = constrain(self.v(x_BTD), (BATCH, SEQ, ACT_KV_HEADS, None))
            q_BTHD = apply_rope(q_BTHD, positions, self.rope_theta)
            k_BTKD = apply_rope(k_BTKD, positions, self.rope_theta)
            o_BTHD = attention(
                q_BTHD, k_BTKD, v_BTKD, segment_ids_BT=segment_ids, causal=True, impl=self.impl
            )
            y_BTD = constrain(self.o(o_BTHD), (BATCH, SEQ, ACT_EMBED))
        return y_BTD, {}


class SwiGLU(nnx.Module):
    """FFN down(silu(gate(x)) * up(x)) (Shazeer 2020, as in Llama)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.ffn_dim
        kw = dict(
            std=cfg.init_std,
            param_dtype=dtype_of(cfg.param_dtype),
            compute_dtype=dtype_of(cfg.compute_dtype),
            rngs=rngs,
        )
        self.gate = Linear(d, f, ("embed", "mlp"), **kw)
        self.up = Linear(d, f, ("embed", "mlp"), **kw)
        self.down = Linear(f, d, ("mlp", "embed"), **kw)

    def __call__(self, x_BTD, *, positions, segment_ids) -> tuple[jax.Array, Aux]:
        del positions, segment_ids
        with jax.named_scope("ffn"):
            h_BTF = jax.nn.silu(self.gate(x_BTD)) * self.up(x_BTD)
            h_BTF = constrain(h_BTF, (BATCH, SEQ, ACT_MLP))
            y_BTD = constrain(self.down(h_BTF), (BATCH, SEQ, ACT_EMBED))
        return y_BTD, {}


class LMHead(nnx.Module):
    """Next-token logits [B,T,V] float32; uses the embedding table when tied.

    Heads get the model's `embed` at call time (tying is the head's concern, and sharing the
    module by reference would give its parameter two paths in the state).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.out = (
            None
            if cfg.tie_embeddings
            else Linear(
                cfg.d_model,
                cfg.padded_vocab,
                ("embed", "vocab"),
                std=cfg.init_std,
                param_dtype=dtype_of(cfg.param_dtype),
                compute_dtype=dtype_of(cfg.compute_dtype),
                rngs=rngs,
            )
        )

    def __call__(self, x_BTD, *, embed: Embed, positions, segment_ids) -> tuple[jax.Array, Aux]:
        del positions, segment_ids
        with jax.named_scope("head"):
            if self.out is None:
                logits_BTV = embed.attend(x_BTD)
            else:
                logits_BTV = self.out(x_BTD, out_dtype=jnp.float32)
            logits_BTV = constrain(logits_BTV, (BATCH, SEQ, ACT_VOCAB))
        return logits_BTV, {}
