"""Megalodon (Ma et al. 2024, arXiv 2404.08801) in plain PyTorch: the forward pass of the
official code (XuezheMax/megalodon), with its module and parameter names, and nothing else.

This file is self-contained (it imports only torch): `menagerie export RUN --format torch`
copies it into the export folder as `modeling_megalodon.py`, beside `config.json` (the
official `ModelConf` fields) and `model.pt` (the official `Mega.state_dict()` names and shapes):

    from modeling_megalodon import load
    model, config = load("exports/mega-tiny")   # float32, eval mode, strict state dict
    logits_BTV = model(tokens_BT)               # tokens [B,T] int64 -> logits [B,T,V] float32

The computation, per `menagerie.arch.megalodon` (where every equation is derived):

    x -> MegaBlock x num_layers -> TimestepNorm -> output Linear (tied to the embedding or not)
    MegaBlock(x):  y = MEGA(x) (includes + x);  out = NFFN(y) + x      (the "two-hop" residual)
    MEGA(x):  xt = TimestepNorm(x);  mx = RMSNorm(CEMA(xt))
              z = per-head RMSNorm(mx Wz + bz) (no affine)
              q = z (gamma0 + 1)/sqrt(Z/H) + beta0,  k = z (gamma1 + 1)/sqrt(Z/H) + beta1
              v = silu(xt Wv + bv),  r = silu(mx Wr + br)
              o = softmax(q k^T + causal mask) v   per chunk of chunk_size tokens, scale 1.0,
                                                   RoPE (interleaved pairs) restarting per chunk
              out = mx Wh1 + bh1 + (o * r) Wh2 + x
    NFFN(y, x) = fc2(silu(fc1 LN(y)) [* fc3 LN(y)]) [* alpha] + x

Every norm stores its scale as w and applies 1 + w (official). What this file leaves out of the
official module: the CUDA kernels (CEMA is one float32 FFT convolution over the whole sequence,
attention a plain softmax), dropout, model/chunk parallelism and the inference cache. A length
above chunk_size that is not a multiple of it is allowed (the official model asserts): the last
chunk is shorter, which is what padding the sequence gives the real tokens.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass
class MegalodonConfig:
    """The official `ModelConf` (megalodon/config.py), field for field. Dropout rates,
    `init_mode`, `efficient_attn` and `layerwise_ckpt` concern training and are not read."""

    num_layers: int = 8
    model_dim: int = 1024
    z_dim: int = 256
    value_dim: int = 2048
    num_heads: int = 1
    ffn_hidden_dim: int = 2048
    cema_ndim: int = 16
    chunk_size: int = 2048
    efficient_attn: str | None = None
    init_mode: str = "he"
    vocab_size: int = -1
    output_size: int = -1  # -1: vocab_size
    norm_num_groups: int = 32
    norm_affine: bool = True
    norm_eps: float = 1e-5
    rope_base: float | None = None  # None: 10000
    dropout: float = 0.0
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    swiglu: bool = False
    rescale_nffn: bool = False
    scale_emb: bool = False
    share_emb: bool = False
    layerwise_ckpt: bool = False

    def __post_init__(self):
        if not self.norm_affine:
            raise ValueError("norm_affine=False is not supported (menagerie's norms are affine)")
        if self.z_dim % self.num_heads or self.value_dim % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide z_dim and value_dim")
        if self.model_dim % self.norm_num_groups:
            raise ValueError(f"norm_num_groups={self.norm_num_groups} must divide model_dim")


class TimestepNorm(nn.Module):
    """Cumulative group norm (official `modules/timestep_norm.py`, CPU reference
    `csrc/ops/timestep_norm.cc`): the model_dim features form G groups, and token t is
    normalised by the mean and population variance of its group over all positions <= t
    (each token weighs 1), merged with the prior (prior_count tokens of mean prior_mean and
    variance exp(prior_logv); the official models have prior_count 0). Scale 1 + weight."""

    def __init__(self, num_features: int, num_groups: int, eps: float = 1e-5):
        super().__init__()
        self.num_groups, self.eps = num_groups, eps
        self.register_buffer("prior_count", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("prior_mean", torch.zeros(num_groups))
        self.register_buffer("prior_logv", torch.zeros(num_groups))
        self.weight = nn.Parameter(torch.zeros(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        b, length, d = x_BLD.shape
        x_BLGF = x_BLD.float().reshape(b, length, self.num_groups, -1)
        mean_BLG = x_BLGF.mean(-1)  # each token's group mean and population variance
        var_BLG = x_BLGF.var(-1, correction=0)
        # Running sums of the moments around an anchor (the prior mean, or else the first
        # token's): float32 sums of E[x^2] - mean^2 far from zero would cancel.
        count0 = self.prior_count.float()
        anchor_BG = self.prior_mean.expand(b, -1) if count0 > 0 else mean_BLG[:, 0]
        prior_var = self.prior_logv.exp()
        offset0 = self.prior_mean - anchor_BG
        shifted_BLG = mean_BLG - anchor_BG[:, None]
        sum1 = count0 * offset0[:, None] + shifted_BLG.cumsum(1)
        sum2 = count0 * (prior_var + offset0.square())[:, None]
        sum2 = sum2 + (var_BLG + shifted_BLG.square()).cumsum(1)
        n_L = count0 + torch.arange(1, length + 1, device=x_BLD.device, dtype=torch.float32)
        cum_offset = sum1 / n_L[:, None]
        cum_mean_BLG = anchor_BG[:, None] + cum_offset
        cum_var_BLG = (sum2 / n_L[:, None] - cum_offset.square()).clamp_min(0.0)
        rstd = torch.rsqrt(cum_var_BLG + self.eps)[..., None]
        y = ((x_BLGF - cum_mean_BLG[..., None]) * rstd).reshape(b, length, d)
        return (y * (self.weight.float() + 1.0) + self.bias.float()).to(x_BLD.dtype)


class MultiHeadComplexEMA(nn.Module):
    """Complex EMA (official `modules/complex_exponential_moving_average.py`), per feature d and
    EMA dimension n (N of them), from a zero state:

        h_t = p x_t + q h_{t-1},   y_t = Re(sum_n eta_n h_{t,n}) + omega x_t
        p = sigmoid(alpha),  q = (1 - sigmoid(alpha) sigmoid(delta)) exp(i n sigmoid(theta) 2pi/N)
        eta = (gamma_re + i gamma_im) / sqrt(N)

    computed as y = k * x (causal convolution) + omega x with the kernel
    k[d, j] = Re(sum_n eta p q^j), by a zero-padded real FFT of length 2L in float32 (the
    official `ema_parameters` + `fftconv`). The product has no conjugate, and the phase sits
    on q only (not on the input term as in the paper's eq. 2). The kernel holds q^j for every
    (d, n, j): D N L complex numbers at a time, as the official kernel's Vandermonde matrix."""

    def __init__(self, embed_dim: int, ndim: int):
        super().__init__()
        self.ndim = ndim
        self.alpha = nn.Parameter(torch.zeros(embed_dim, ndim, 1))
        self.delta = nn.Parameter(torch.zeros(embed_dim, ndim, 1))
        self.theta = nn.Parameter(torch.zeros(embed_dim, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(embed_dim, ndim, 2))
        self.omega = nn.Parameter(torch.zeros(embed_dim, 1))

    def kernel(self, length: int) -> torch.Tensor:
        """k [D, length] float32: Re(sum_n eta p q^j) for j = 0..length-1."""
        p_DN = torch.sigmoid(self.alpha.float()).squeeze(-1)
        log_q_mag = torch.log1p(-p_DN * torch.sigmoid(self.delta.float()).squeeze(-1))
        n = torch.arange(1, self.ndim + 1, device=p_DN.device, dtype=torch.float32)
        q_phase = n * torch.sigmoid(self.theta.float()).reshape(-1, 1) * (2 * math.pi / self.ndim)
        j = torch.arange(length, device=p_DN.device, dtype=torch.float32)
        q_pow_DNJ = torch.polar(torch.exp(log_q_mag[..., None] * j), q_phase[..., None] * j)
        eta_DN = torch.complex(self.gamma[..., 0].float(), self.gamma[..., 1].float())
        eta_DN = eta_DN / math.sqrt(self.ndim)
        return ((eta_DN * p_DN)[..., None] * q_pow_DNJ).sum(1).real

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        """y [B,L,D] float32."""
        length = x_BLD.shape[1]
        x_BDL = x_BLD.float().transpose(1, 2)
        n_fft = 2 * length  # zero padding: the circular convolution never wraps around
        spectrum = torch.fft.rfft(x_BDL, n=n_fft) * torch.fft.rfft(self.kernel(length), n=n_fft)
        y_BDL = torch.fft.irfft(spectrum, n=n_fft)[..., :length]
        y_BDL = y_BDL + self.omega.float() * x_BDL
        return y_BDL.transpose(1, 2)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * (1 + weight), in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_normalize(x, self.eps) * (self.weight.float() + 1.0)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis with scale 1 + weight and a bias, in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight.float() + 1.0, self.bias.float()
        return F.layer_norm(x.float(), weight.shape, weight, bias, self.eps)


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS normalisation over the last axis, without a scale (the official `znorm`)."""
    x = x.float()
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


class RotaryEmbedding(nn.Module):
    """RoPE on interleaved pairs (2i, 2i + 1) (the complex-number layout of the official
    `rotary_positional_embedding.py`); `freqs[i]` = base^(-2i/d) is a buffer of the state dict."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
        self.register_buffer("freqs", (1.0 / base**exponents).float())

    def forward(self, x_NCHD: torch.Tensor) -> torch.Tensor:
        """x [..., C, H, D] rotated by its position 0..C-1 along the C axis."""
        c = x_NCHD.shape[-3]
        positions = torch.arange(c, device=x_NCHD.device, dtype=torch.float32)
        angles_CF = positions[:, None] * self.freqs.float()
        cos, sin = angles_CF.cos()[:, None], angles_CF.sin()[:, None]  # [C,1,D/2]
        x = x_NCHD.float()
        even, odd = x[..., 0::2], x[..., 1::2]
        rotated = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1)
        return rotated.flatten(-2)


def chunked_causal_attention(q_BLHZ, k_BLHZ, v_BLHE, chunk_size: int, rope: RotaryEmbedding):
    """softmax(q k^T) v with scale 1.0, causal, block-diagonal over chunks of chunk_size tokens
    (no token sees an earlier chunk), RoPE positions restarting in every chunk. Returns
    [B,L,H*E] float32. A last partial chunk is padded at its end; causality keeps the padding
    out of the real tokens."""
    b, length, h, _ = q_BLHZ.shape
    chunk = min(chunk_size, length)
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length

    def chunks(x_BLHX: torch.Tensor) -> torch.Tensor:  # -> [B * n_chunks, chunk, H, X]
        x = F.pad(x_BLHX.float(), (0, 0, 0, 0, 0, pad))
        return x.reshape(b * n_chunks, chunk, h, -1)

    q, k, v = rope(chunks(q_BLHZ)), rope(chunks(k_BLHZ)), chunks(v_BLHE)
    scores_NHQK = torch.einsum("nqhz,nkhz->nhqk", q, k)
    future = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
    probs = scores_NHQK.masked_fill(future, float("-inf")).softmax(-1)
    o_NQHE = torch.einsum("nhqk,nkhe->nqhe", probs, v)
    return o_NQHE.reshape(b, n_chunks * chunk, -1)[:, :length]


class MovingAverageGatedAttention(nn.Module):
    """The MEGA layer (official `modules/moving_average_gated_attention.py`); the output
    includes + x. Linear weights are [out, in] (torch), all with a bias but wh2."""

    def __init__(self, cfg: MegalodonConfig):
        super().__init__()
        d, z, e = cfg.model_dim, cfg.z_dim, cfg.value_dim
        self.num_heads, self.chunk_size, self.eps = cfg.num_heads, cfg.chunk_size, cfg.norm_eps
        self.z_head_dim = z // cfg.num_heads
        self.timenorm = TimestepNorm(d, cfg.norm_num_groups, eps=cfg.norm_eps)
        self.cema = MultiHeadComplexEMA(d, cfg.cema_ndim)
        self.rmsnorm = RMSNorm(d, eps=cfg.norm_eps)
        self.wv = nn.Linear(d, e)
        self.wz = nn.Linear(d, z)
        self.wr = nn.Linear(d, e)
        self.wh1 = nn.Linear(d, d)
        self.wh2 = nn.Linear(e, d, bias=False)
        self.gamma = nn.Parameter(torch.zeros(2, z))  # rows: q, k
        self.beta = nn.Parameter(torch.zeros(2, z))

    def forward(self, x_BLD: torch.Tensor, rope: RotaryEmbedding) -> torch.Tensor:
        b, length, _ = x_BLD.shape
        h, hz = self.num_heads, self.z_head_dim
        xt = self.timenorm(x_BLD)
        mx = self.rmsnorm(self.cema(xt))
        z_BLHZ = rms_normalize(self.wz(mx).reshape(b, length, h, hz), self.eps)
        gamma = ((self.gamma.float() + 1.0) / math.sqrt(hz)).reshape(2, h, hz)
        beta = self.beta.float().reshape(2, h, hz)
        q, k = z_BLHZ * gamma[0] + beta[0], z_BLHZ * gamma[1] + beta[1]
        v = F.silu(self.wv(xt)).reshape(b, length, h, -1)  # from the TimestepNorm output
        r = F.silu(self.wr(mx))  # the reset gate
        o = chunked_causal_attention(q, k, v, self.chunk_size, rope)
        return self.wh1(mx) + self.wh2(o * r) + x_BLD


class NormalizedFeedForwardNetwork(nn.Module):
    """LayerNorm (1 + weight, bias), then fc2(silu(fc1 x) * fc3 x) with swiglu or fc2(silu(fc1
    x)), no biases; times the layer scale alpha (0.1 * 0.5^layer at init) with rescale_nffn;
    plus the residual passed in (official `modules/normalized_feedforward_network.py`)."""

    def __init__(self, cfg: MegalodonConfig):
        super().__init__()
        d, f = cfg.model_dim, cfg.ffn_hidden_dim
        self.norm = LayerNorm(d, eps=cfg.norm_eps)
        self.fc1 = nn.Linear(d, f, bias=False)
        self.fc2 = nn.Linear(f, d, bias=False)
        self.fc3 = nn.Linear(d, f, bias=False) if cfg.swiglu else None
        self.alpha = nn.Parameter(torch.ones(d)) if cfg.rescale_nffn else None

    def forward(self, y_BLD: torch.Tensor, residual_BLD: torch.Tensor) -> torch.Tensor:
        x = self.norm(y_BLD)
        hidden = F.silu(self.fc1(x))
        if self.fc3 is not None:
            hidden = hidden * self.fc3(x)
        out = self.fc2(hidden)
        if self.alpha is not None:
            out = out * self.alpha
        return out + residual_BLD


class MegaBlock(nn.Module):
    """y = MEGA(x) (with + x); out = NFFN(y) + x: the FFN adds the block input, not y."""

    def __init__(self, cfg: MegalodonConfig):
        super().__init__()
        self.mega = MovingAverageGatedAttention(cfg)
        self.nffn = NormalizedFeedForwardNetwork(cfg)

    def forward(self, x_BLD: torch.Tensor, rope: RotaryEmbedding) -> torch.Tensor:
        return self.nffn(self.mega(x_BLD, rope), x_BLD)


class MegaOutputLayer(nn.Module):
    """Final TimestepNorm, then the output Linear without bias (its weight is the embedding
    table when share_emb)."""

    def __init__(self, cfg: MegalodonConfig, embed: nn.Embedding):
        super().__init__()
        out = cfg.vocab_size if cfg.output_size == -1 else cfg.output_size
        self.final_norm = TimestepNorm(cfg.model_dim, cfg.norm_num_groups, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.model_dim, out, bias=False)
        if cfg.share_emb:
            self.output.weight = embed.weight

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        return self.output(self.final_norm(x_BLD)).float()


class Megalodon(nn.Module):
    """The official `Mega` (megalodon/model/mega.py): tokens [B,T] -> logits [B,T,V] float32."""

    def __init__(self, cfg: MegalodonConfig):
        super().__init__()
        self.emb_scale = math.sqrt(cfg.model_dim) if cfg.scale_emb else None
        self.embed = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        base = 10000.0 if cfg.rope_base is None else cfg.rope_base
        self.rope = RotaryEmbedding(cfg.z_dim // cfg.num_heads, base)
        self.layers = nn.ModuleList(MegaBlock(cfg) for _ in range(cfg.num_layers))
        self.output = MegaOutputLayer(cfg, self.embed)

    def forward(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens_BT)
        if self.emb_scale is not None:
            x = x * self.emb_scale
        for layer in self.layers:
            x = layer(x, self.rope)
        return self.output(x)


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[Megalodon, MegalodonConfig]:
    """The model in the folder `path` (config.json, model.pt) in float32 and eval mode, loaded
    with `strict=True` (every official name present, none extra), and its config."""
    path = Path(path)
    cfg = MegalodonConfig(**json.loads((path / "config.json").read_text()))
    model = Megalodon(cfg)
    state = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)  # casts a bfloat16 export to float32
    return model.to(device).eval(), cfg
