"""Model configuration: one typed, validated pydantic model with parameter and FLOP counts.

`ModelConfig` is the `model:` section of a run config. Fields left at `None` resolve to the
Llama defaults through the properties (`kv_heads`, `dim_head`, `ffn_dim`, `padded_vocab`).
"""

from __future__ import annotations

import math
from typing import Literal

import pydantic
from pydantic import Field

DType = Literal["float32", "bfloat16"]


def _round_up(x: int, multiple: int) -> int:
    return multiple * math.ceil(x / multiple)


class ModelConfig(pydantic.BaseModel):
    """Architecture of a language model (the baseline is a Llama-style decoder)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    family: Literal["transformer"] = Field(
        "transformer", description="Model family; `arch.build` dispatches on it."
    )
    vocab_size: int | None = Field(
        None,
        description="Rows of the embedding table. None: the tokenizer's size rounded up to "
        "`vocab_multiple`, filled in by `with_vocab(tokenizer_vocab)` before building.",
    )
    vocab_multiple: int = Field(
        128,
        description="Multiple the resolved vocabulary is rounded up to (MXU/tensor-core tiles).",
    )
    d_model: int = Field(256, description="Width of the residual stream.")
    n_layers: int = Field(4, description="Number of blocks.")
    n_heads: int = Field(4, description="Number of query heads.")
    n_kv_heads: int | None = Field(
        None, description="Number of key/value heads (GQA). None: n_heads (multi-head attention)."
    )
    head_dim: int | None = Field(
        None, description="Width of one attention head. None: d_model // n_heads."
    )
    mlp_dim: int | None = Field(
        None,
        description="Hidden width of the FFN. None: Llama rule, 8/3 * d_model rounded up to "
        "`mlp_multiple`.",
    )
    mlp_multiple: int = Field(256, description="Multiple the default mlp_dim is rounded up to.")
    rope_theta: float = Field(10000.0, description="RoPE base wavelength.")
    norm_eps: float = Field(1e-5, description="Epsilon of RMSNorm.")
    tie_embeddings: bool = Field(
        True, description="Use the embedding table as the LM-head matrix (no separate head)."
    )
    init_std: float = Field(0.02, description="Std of the normal init of all matrices.")
    param_dtype: DType = Field("float32", description="dtype parameters are stored in.")
    compute_dtype: DType = Field(
        "float32",
        description="dtype of matmul inputs and activations. Norm statistics, softmax and logits "
        "are always float32.",
    )
    remat: Literal["none", "full", "dots"] = Field(
        "none",
        description="Rematerialisation of each block in the backward pass: none (save all), full "
        "(save only the block input), dots (save matmul outputs without batch dims, "
        "jax.checkpoint_policies.dots_with_no_batch_dims_saveable).",
    )
    scan_layers: bool = Field(
        True,
        description="Stack blocks with nnx.scan (compile time independent of depth); False: a "
        "Python loop (easier to debug, per-layer params).",
    )
    mixer: Literal["attention"] = Field(
        "attention", description="Sequence mixer part (key of arch.transformer.MIXERS)."
    )
    ffn: Literal["swiglu"] = Field("swiglu", description="FFN part (key of arch.transformer.FFNS).")
    head: Literal["lm"] = Field(
        "lm", description="Output head part (key of arch.transformer.HEADS)."
    )
    attention_impl: Literal["xla", "cudnn"] = Field(
        "xla",
        description="xla: einsum attention (any backend). cudnn: jax.nn.dot_product_attention "
        "with the cuDNN fused kernel (GPU only, bf16 compute).",
    )

    # ---- validation ---------------------------------------------------------------------

    @pydantic.model_validator(mode="after")
    def _check(self) -> ModelConfig:
        for name in (
            "vocab_size",
            "vocab_multiple",
            "d_model",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "head_dim",
            "mlp_dim",
            "mlp_multiple",
        ):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"model.{name}={value} must be a positive integer")
        for name in ("rope_theta", "norm_eps", "init_std"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"model.{name}={value} must be positive")
        if self.head_dim is None and self.d_model % self.n_heads:
            divisors = ", ".join(
                str(h) for h in range(1, self.d_model + 1) if self.d_model % h == 0
            )
            raise ValueError(
                f"model.n_heads={self.n_heads} does not divide model.d_model={self.d_model}; "
                f"choose n_heads from {divisors} or set model.head_dim"
            )
        if self.n_heads % self.kv_heads:
            raise ValueError(
                f"model.n_kv_heads={self.n_kv_heads} does not divide "
                f"model.n_heads={self.n_heads}; GQA needs n_heads to be a multiple of n_kv_heads"
            )
        if self.dim_head % 2:
            raise ValueError(
                f"model head dim={self.dim_head} is odd; RoPE rotates pairs, so set an even "
                "model.head_dim (or d_model/n_heads even)"
            )
        return self

    # ---- resolved sizes -----------------------------------------------------------------

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (n_kv_heads or n_heads)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def q_per_kv(self) -> int:
        """Query heads sharing one key/value head (G in [B,T,K,G,D])."""
        return self.n_heads // self.kv_heads

    @property
    def dim_head(self) -> int:
        """Width of one attention head (head_dim or d_model // n_heads)."""
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    @property
    def ffn_dim(self) -> int:
        """FFN hidden width: mlp_dim, or Llama's 8/3 d_model rounded up to mlp_multiple."""
        if self.mlp_dim is not None:
            return self.mlp_dim
        return _round_up(int(8 * self.d_model / 3), self.mlp_multiple)

    @property
    def padded_vocab(self) -> int:
        """Rows of the embedding table; raises if the vocabulary was not resolved yet."""
        if self.vocab_size is None:
            raise ValueError(
                "model.vocab_size is None; resolve it with cfg.with_vocab(tokenizer_vocab_size) "
                "before building or counting"
            )
        return self.vocab_size

    def with_vocab(self, tokenizer_vocab: int) -> ModelConfig:
        """Copy with `vocab_size` resolved for a tokenizer of `tokenizer_vocab` tokens.

        None becomes `tokenizer_vocab` rounded up to `vocab_multiple`; an explicit vocab_size
        smaller than the tokenizer is an error (token ids would index past the table).
        """
        if self.vocab_size is None:
            return self.model_copy(
                update={"vocab_size": _round_up(tokenizer_vocab, self.vocab_multiple)}
            )
        if self.vocab_size < tokenizer_vocab:
            raise ValueError(
                f"model.vocab_size={self.vocab_size} is smaller than the tokenizer's "
                f"{tokenizer_vocab} tokens; raise it or leave it unset (null)"
            )
        return self

    resolved = with_vocab  # the trainer's spelling

    # ---- counts -------------------------------------------------------------------------

    def _layer_matmul_params(self) -> int:
        d, h, k, hd, f = self.d_model, self.n_heads, self.kv_heads, self.dim_head, self.ffn_dim
        attention = d * h * hd + 2 * d * k * hd + h * hd * d  # q, k, v, o
        ffn = 3 * d * f  # SwiGLU: gate, up, down
        return attention + ffn

    def num_params(self, include_embeddings: bool = True) -> int:
        """Exact number of parameters of the built model.

        Counts, per layer, the q/k/v/o and SwiGLU gate/up/down matrices and the two RMSNorm
        scales; then the final RMSNorm scale, the embedding table and, when untied, the LM-head
        matrix. With `include_embeddings=False` the vocabulary-sized matrices (embedding table
        and untied LM head) are left out (the "non-embedding" N of scaling laws).
        """
        d, v = self.d_model, self.padded_vocab
        per_layer = self._layer_matmul_params() + 2 * d
        n = self.n_layers * per_layer + d
        if include_embeddings:
            n += v * d * (1 if self.tie_embeddings else 2)
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward = 3x forward) per token at context `seq_len`.

        6 * (matmul parameters of all layers + the LM-head matmul d_model*vocab, which counts
        also when tied; the embedding lookup and norms count nothing)
        + attention 6 * n_layers * seq_len * n_heads * head_dim: QK^T and AV are 2 matmuls of
        2 * seq_len * head_dim FLOPs per head per token, times 3 for fwd+bwd = 12 * ..., halved
        because causal attention needs only the lower triangle (MaxText convention).
        """
        matmul_params = (
            self.n_layers * self._layer_matmul_params() + self.d_model * self.padded_vocab
        )
        attention = 6 * self.n_layers * seq_len * self.n_heads * self.dim_head
        return float(6 * matmul_params + attention)
