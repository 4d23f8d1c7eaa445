"""The attention mixer: causal multi-head / grouped-query self-attention with RoPE (Llama).

Options beyond Llama: a local window with attention sinks (StreamingLLM, Xiao et al. 2023: a
query sees the first `sinks` positions of its row and its last `window` keys), and the choice of
implementation: `xla` (`arch.attention_ops.attention`, blocked jnp with a custom VJP; with a
window, the dense jnp reference), `cudnn`, or our block-sparse flash kernel
(`kernels.sparse_attention`: `pallas` on GPU/TPU, `interpret` in the Pallas interpreter on any
device). Deviation from StreamingLLM: the sinks are the first positions of the packed row, not
of each document, because the kernels' masks are static; with one document per row they agree.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from menagerie.kernels import masks
from menagerie.kernels.dispatch import KernelUnsupportedError
from menagerie.kernels.sparse_attention import attention_reference, sparse_attention

from .attention_ops import apply_rope, attention
from .axes import Axis, declare
from .config import ModelConfig, check_positive
from .layers import ACT_EMBED, ACT_HEADS, ACT_KV_HEADS, BATCH, SEQ, constrain, dtype_of, linear
from .parts import Aux, Ctx, MixerConfig
from .ring_attention import CHUNKS_PER_DEVICE

declare(
    Axis("heads", "feature", "tensor", lowrank=True, doc="query heads"),
    Axis("kv_heads", "feature", "tensor", lowrank=True, doc="key/value heads"),
    Axis("head_dim", "feature", None, doc="width of one attention head"),
)


class AttentionConfig(MixerConfig):
    """Causal softmax attention with RoPE and grouped-query heads."""

    kind: Literal["attention"] = "attention"
    """Selects this mixer."""
    sequence_chunks: ClassVar[int] = CHUNKS_PER_DEVICE  # ring attention's zigzag layout
    n_heads: int = 4
    """Number of query heads."""
    n_kv_heads: int | None = None
    """Number of key/value heads (GQA). None: n_heads (multi-head attention)."""
    head_dim: int | None = None
    """Width of one attention head. None: d_model // n_heads."""
    rope_theta: float = 10000.0
    """RoPE base wavelength."""
    impl: Literal["xla", "cudnn", "pallas", "interpret", "reference"] = "xla"
    """xla: blocked jnp attention (any backend; with a `window`, the dense jnp reference).
    cudnn: jax.nn.dot_product_attention with the cuDNN fused kernel (GPU only, bf16 compute).
    pallas: `kernels.sparse_attention`'s flash kernel (GPU: ours; TPU: splash attention), which
    skips the tiles outside the window. interpret: that GPU kernel in the Pallas interpreter
    (any device; slow, for tests). reference: the kernel's dense jnp twin."""
    window: int | None = None
    """Local attention: a query sees only its last `window` keys, itself included (sliding
    window as in Mistral / StreamingLLM). None: every earlier key."""
    sinks: int = 0
    """Attention sinks (StreamingLLM): the first `sinks` positions of each row stay visible to
    every later query beside the window. Needs a window."""

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (n_kv_heads or n_heads)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def q_per_kv(self) -> int:
        """Query heads sharing one key/value head (G in [B,T,K,G,D])."""
        return self.n_heads // self.kv_heads

    def mask(self) -> masks.Mask | None:
        """The kernels' mask of a window (with sinks); None for plain causal attention."""
        if self.window is None:
            return None
        if self.sinks:
            return masks.SinksAndWindow(self.sinks, self.window)
        return masks.LocalWindow(self.window - 1, 0)

    def visible_keys(self, seq_len: int) -> float:
        """Mean number of keys a query sees: T/2 for causal attention (MaxText's convention,
        which counts the lower triangle as half the square); with a window, the exact mean over
        positions 0..T-1 of min(t + 1, window) plus the sinks older than the window."""
        if self.window is None:
            return seq_len / 2
        t = np.arange(seq_len)
        seen = np.minimum(t + 1, self.window) + np.clip(t + 1 - self.window, 0, self.sinks)
        return float(seen.mean())

    def dim_head(self, model: ModelConfig) -> int:
        """Width of one attention head (head_dim or d_model // n_heads)."""
        return model.d_model // self.n_heads if self.head_dim is None else self.head_dim

    def check(self, model: ModelConfig) -> None:
        ints = ("n_heads", "n_kv_heads", "head_dim", "window")
        check_positive(self, "model.mixer.", ints=ints, floats=("rope_theta",))
        self._check_window()
        d = model.d_model
        if self.head_dim is None and d % self.n_heads:
            divisors = ", ".join(str(h) for h in range(1, d + 1) if d % h == 0)
            raise ValueError(
                f"model.mixer.n_heads={self.n_heads} does not divide model.d_model={d}; "
                f"choose n_heads from {divisors} or set model.mixer.head_dim"
            )
        if self.n_heads % self.kv_heads:
            raise ValueError(
                f"model.mixer.n_kv_heads={self.n_kv_heads} does not divide "
                f"model.mixer.n_heads={self.n_heads}; GQA needs n_heads to be a multiple of "
                "n_kv_heads"
            )
        if self.dim_head(model) % 2:
            raise ValueError(
                f"model head dim={self.dim_head(model)} is odd; RoPE rotates pairs, so set an "
                "even model.mixer.head_dim (or d_model/n_heads even)"
            )

    def _check_window(self) -> None:
        if self.sinks < 0:
            raise ValueError(f"model.mixer.sinks={self.sinks} must be >= 0")
        if self.sinks and self.window is None:
            raise ValueError(
                f"model.mixer.sinks={self.sinks} needs model.mixer.window (sinks are kept beside "
                "a local window); set a window or sinks: 0"
            )
        if self.window is not None and self.impl == "cudnn":
            raise ValueError(
                "model.mixer.window is not available with impl cudnn; use impl pallas (GPU/TPU) "
                "or xla"
            )

    def build(self, model: ModelConfig, *, rngs: nnx.Rngs) -> Attention:
        return Attention(self, model, rngs=rngs)

    def num_params(self, model: ModelConfig) -> int:
        """q [D,H,Dh] + k, v [D,K,Dh] + o [H,Dh,D]."""
        d, h, k, hd = model.d_model, self.n_heads, self.kv_heads, self.dim_head(model)
        return d * h * hd + 2 * d * k * hd + h * hd * d

    def flops_per_token(self, model: ModelConfig, seq_len: int) -> float:
        """6 * matmul params (fwd 2 per multiply-add, bwd twice that) + 6 * T * H * Dh for the
        scores: QK^T and AV are 2 matmuls of 2 * T * Dh FLOPs per head per token, times 3 for
        fwd+bwd = 12 * T * H * Dh, halved because causal attention needs only the lower
        triangle (MaxText convention); with a window, 12 * H * Dh per key a query sees
        (`visible_keys`)."""
        attention_scores = 12 * self.visible_keys(seq_len) * self.n_heads * self.dim_head(model)
        return float(6 * self.num_params(model) + attention_scores)


@struct.dataclass
class KVCache:
    """Keys (after RoPE) and values of positions 0..S-1: [B,S,K,Dh] each; position p's slot is
    p, and only the positions already decoded are filled."""

    keys: jax.Array
    values: jax.Array


class Attention(nnx.Module):
    """Causal multi-head / grouped-query self-attention with RoPE (Llama)."""

    def __init__(self, cfg: AttentionConfig, model: ModelConfig, *, rngs: nnx.Rngs):
        d, h, k, hd = model.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_head(model)
        self.q = linear(model, d, (h, hd), ("embed", "heads", "head_dim"), rngs=rngs)
        self.k = linear(model, d, (k, hd), ("embed", "kv_heads", "head_dim"), rngs=rngs)
        self.v = linear(model, d, (k, hd), ("embed", "kv_heads", "head_dim"), rngs=rngs)
        self.o = linear(model, (h, hd), d, ("heads", "head_dim", "embed"), rngs=rngs)
        self.rope_theta = cfg.rope_theta
        self.impl = cfg.impl
        self.mask = cfg.mask()
        self.cache_shape = (k, hd)
        self.cache_dtype = dtype_of(model.compute_dtype)

    def _qkv(self, x_BTD: jax.Array, positions_BT: jax.Array) -> tuple[jax.Array, ...]:
        q_BTHD = constrain(self.q(x_BTD), (BATCH, SEQ, ACT_HEADS, None))
        k_BTKD = constrain(self.k(x_BTD), (BATCH, SEQ, ACT_KV_HEADS, None))
        v_BTKD = constrain(self.v(x_BTD), (BATCH, SEQ, ACT_KV_HEADS, None))
        q_BTHD = apply_rope(q_BTHD, positions_BT, self.rope_theta)
        k_BTKD = apply_rope(k_BTKD, positions_BT, self.rope_theta)
        return q_BTHD, k_BTKD, v_BTKD

    def __call__(self, x_BTD: jax.Array, ctx: Ctx) -> tuple[jax.Array, Aux]:
        with jax.named_scope("attention"):
            q_BTHD, k_BTKD, v_BTKD = self._qkv(x_BTD, ctx.positions)
            o_BTHD = self._attend(q_BTHD, k_BTKD, v_BTKD, ctx.segment_ids)
            y_BTD = constrain(self.o(o_BTHD), (BATCH, SEQ, ACT_EMBED))
        return y_BTD, {}

    def _attend(self, q_BTHD, k_BTKD, v_BTKD, segment_ids_BT) -> jax.Array:
        """Causal attention (within the window) by the configured implementation."""
        if self.impl in ("xla", "cudnn") and self.mask is None:
            return attention(
                q_BTHD, k_BTKD, v_BTKD, segment_ids_BT=segment_ids_BT, causal=True, impl=self.impl
            )
        _check_unsplit_sequence(self.impl)
        impl = "reference" if self.impl == "xla" else self.impl
        mask = masks.Causal() if self.mask is None else self.mask
        return sparse_attention(
            q_BTHD, k_BTKD, v_BTKD, mask=mask, segment_ids=segment_ids_BT, impl=impl
        )

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty cache for `batch` sequences of at most `max_len` tokens."""
        zeros = jnp.zeros((batch, max_len, *self.cache_shape), self.cache_dtype)
        return KVCache(zeros, zeros)

    def decode(self, x_BTD: jax.Array, cache: KVCache, start) -> tuple[jax.Array, KVCache]:
        """`__call__` for T tokens at positions start..start+T-1 of one document whose earlier
        tokens fill `cache`: writes theirs, attends over the cache (float32 softmax)."""
        t, max_len = x_BTD.shape[1], cache.keys.shape[1]
        positions = jnp.broadcast_to(start + jnp.arange(t), x_BTD.shape[:2])
        q_BTHD, k_BTKD, v_BTKD = self._qkv(x_BTD, positions)
        write = lambda c, new: jax.lax.dynamic_update_slice_in_dim(c, new.astype(c.dtype), start, 1)
        cache = KVCache(write(cache.keys, k_BTKD), write(cache.values, v_BTKD))
        mask = masks.Causal() if self.mask is None else self.mask
        keep = mask(positions[0][:, None], jnp.arange(max_len)[None, :])  # [T, S]
        o_BTHD = attention_reference(q_BTHD, cache.keys, cache.values, keep[None, None, None])
        return self.o(o_BTHD), cache


def _check_unsplit_sequence(impl: str) -> None:
    """The sparse kernel sees the whole sequence: refuse a mesh that splits it (ring attention
    serves plain causal attention with impl xla)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or "sequence" not in mesh.axis_names:
        return
    if mesh.shape["sequence"] > 1 and "sequence" not in mesh.manual_axes:
        raise KernelUnsupportedError(
            f"model.mixer.impl={impl} (or a window) with mesh.sequence={mesh.shape['sequence']}: "
            "the kernel does not split the sequence; use mesh.sequence=1, or impl xla without a "
            "window (ring attention)"
        )
