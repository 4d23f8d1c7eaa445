"""menagerie's transformer family in plain PyTorch: the inference forward pass of
`menagerie.arch.transformer` with the parts this file has, and nothing else.

This file is self-contained (it imports only torch): `menagerie export RUN --format torch`
copies it into the export folder as `modeling_transformer.py`, beside `config.json` (the fields
of `TransformerConfig` below) and `model.pt` (the state dict of `Transformer` below):

    from modeling_transformer import load
    model, config = load("exports/lte-tiny")    # float32, eval mode, strict state dict
    logits_BTV = model(tokens_BT)               # tokens [B,T] int64 -> logits [B,T,V] float32

The computation (each token sequence is one document, positions 0..T-1):

    x = embed(tokens);  per block: x = x + mixer(RMSNorm(x));  x = x + ffn(RMSNorm(x))
    logits = RMSNorm(x) @ W_head^T          (W_head = the embedding table when tied)

    RMSNorm(x) = x / sqrt(mean(x^2) + eps) * weight            (no 1 + weight)
    mixer: causal softmax attention, scale 1/sqrt(Dh), GQA (query head h reads kv head
           h // (H/K)), RoPE in the rotate-half layout (pairs (i, i + Dh/2), as HF Llama)
    ffn:   swiglu  down(silu(gate x) * up x)
           mlp     down(gelu(up x)), exact erf GELU
           lte     inner.down(inner.hidden(x) * gate repeated over each expert's neurons)

LTE (`arch/lte.py`, arXiv 2402.06126): the F hidden neurons of the inner FFN form E = F / S
contiguous experts of S = expert_size neurons; a router gives scores G = sigmoid(x W_g + b)
(dejavu: x W1 W2 + b) [B,T,E], and the gate at inference (menagerie's `ctx.step` None) is

    all_experts            1 (exactly the inner FFN)
    threshold, hard        1{G > tau}                        (stage 2; `hard_from_step` set)
    threshold, not hard    G                                 (stage 1: soft)
    topk                   G on each token's top_k scores, else 0
    dejavu, hard           1 on each token's top_k scores, else 0
    dejavu, not hard       1 (stage 1 runs the dense FFN)

The planner head (`arch/planner.py`, kind planner with condition_lm), before the LM head: the
final states h are mean-pooled into blocks of P = block tokens (the last block may be partial),
`layers` causal blocks run over the block sequence (RoPE over block indices 0..N-1), RMSNorm
gives the plans z_j, and W_c z_j is added to every token of block j+1 (block 0 gets nothing):

    logits = (h + shift_one_block(W_c RMSNorm(planner layers(pool(h))))) @ W_head^T

The lookahead decoder and the latent map only train: they are not here. Heads whose inference
output is the LM head's (the MTP heads, a planner without condition_lm) export as `head: lm`.

Computing every neuron and zeroing the inactive experts' is what menagerie's sparse kernel
computes (it skips them instead). Equal scores in a top-k go to the lower expert index in
menagerie; torch.topk does not promise an order for ties (float scores rarely tie).
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
class LTEConfig:
    """The inference-time settings of an LTE FFN (menagerie's `model.ffn` of kind lte)."""

    inner: str = "swiglu"  # the wrapped FFN: swiglu or mlp
    expert_size: int = 32
    routing: str = "threshold"  # threshold, topk or dejavu
    top_k: int | None = None  # topk and dejavu
    predictor_rank: int = 64  # dejavu: rank of x W1 W2
    tau: float = 0.5
    hard: bool = False  # menagerie's hard_from_step was set: hard routing outside training
    all_experts: bool = False

    def __post_init__(self):
        if self.inner not in ("swiglu", "mlp") or self.routing not in ROUTINGS:
            raise ValueError(f"unknown LTE inner FFN {self.inner!r} or routing {self.routing!r}")


ROUTINGS = ("threshold", "topk", "dejavu")


@dataclasses.dataclass
class PlannerConfig:
    """The inference-time settings of a planner head whose plan conditions the LM."""

    block: int  # P: tokens per block
    layers: int  # causal blocks over the block sequence
    n_heads: int  # of those blocks' attention
    n_kv_heads: int
    head_dim: int
    rope_theta: float
    hidden_dim: int  # of their SwiGLU


@dataclasses.dataclass
class TransformerConfig:
    """The model: menagerie's `model:` fields that the forward pass reads."""

    vocab_size: int  # the embedding's rows (menagerie's padded_vocab)
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    ffn: str = "swiglu"  # swiglu, mlp or lte
    ffn_hidden_dim: int = 0  # F (of the inner FFN for lte)
    lte: LTEConfig | None = None  # with ffn lte
    planner: PlannerConfig | None = None  # a planner head whose plan conditions the LM
    window: int | None = None  # local attention: the last `window` keys, the query's own included
    sinks: int = 0  # with a window: the first `sinks` positions stay visible (StreamingLLM)

    def __post_init__(self):
        if isinstance(self.lte, dict):
            self.lte = LTEConfig(**self.lte)
        if isinstance(self.planner, dict):
            self.planner = PlannerConfig(**self.planner)
        if self.ffn not in ("swiglu", "mlp", "lte") or (self.ffn == "lte") != (
            self.lte is not None
        ):
            raise ValueError(f"ffn={self.ffn!r} needs lte settings exactly when it is 'lte'")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last axis, in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps) * self.weight


def apply_rope(x_BTHD: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE at positions 0..T-1, rotate-half layout: pair (i, i + Dh/2) turns by the angle
    position * theta^(-2i/Dh) (menagerie's `arch.attention_ops.apply_rope`, angles float32)."""
    t, d = x_BTHD.shape[1], x_BTHD.shape[-1]
    inv_freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)  # [Dh/2]
    angles_TF = torch.arange(t, dtype=torch.float32)[:, None] * inv_freq
    cos, sin = angles_TF.cos()[:, None], angles_TF.sin()[:, None]  # [T,1,Dh/2]
    x1, x2 = x_BTHD[..., : d // 2], x_BTHD[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Attention(nn.Module):
    """Causal grouped-query self-attention with RoPE; q [H*Dh, D], k/v [K*Dh, D], o [D, H*Dh]
    (the heads flattened head-major, as HF Llama)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        d, h, k, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = h, k, hd
        self.rope_theta = cfg.rope_theta
        self.window, self.sinks = cfg.window, cfg.sinks
        self.q = nn.Linear(d, h * hd, bias=False)
        self.k = nn.Linear(d, k * hd, bias=False)
        self.v = nn.Linear(d, k * hd, bias=False)
        self.o = nn.Linear(h * hd, d, bias=False)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        b, t, _ = x_BTD.shape
        hd, group = self.head_dim, self.n_heads // self.n_kv_heads
        q_BTHD = apply_rope(self.q(x_BTD).reshape(b, t, self.n_heads, hd), self.rope_theta)
        k_BTKD = apply_rope(self.k(x_BTD).reshape(b, t, self.n_kv_heads, hd), self.rope_theta)
        v_BTKD = self.v(x_BTD).reshape(b, t, self.n_kv_heads, hd)
        k_BTHD = k_BTKD.repeat_interleave(group, dim=2)  # query head h reads kv head h // group
        v_BTHD = v_BTKD.repeat_interleave(group, dim=2)
        scores_BHTS = torch.einsum("bthd,bshd->bhts", q_BTHD, k_BTHD) / math.sqrt(hd)
        probs_BHTS = scores_BHTS.masked_fill(~self.visible(t), float("-inf")).softmax(-1)
        o_BTHD = torch.einsum("bhts,bshd->bthd", probs_BHTS, v_BTHD)
        return self.o(o_BTHD.reshape(b, t, -1))

    def visible(self, t: int) -> torch.Tensor:
        """[T, S] bool: key s is visible to query t (causal; within the window or a sink)."""
        q_T1, k_1S = torch.arange(t)[:, None], torch.arange(t)[None, :]
        keep = k_1S <= q_T1
        if self.window is not None:
            keep = keep & ((k_1S > q_T1 - self.window) | (k_1S < self.sinks))
        return keep


class SwiGLU(nn.Module):
    """down(silu(gate x) * up x), as `hidden` then `project` (LTE gates the hidden neurons)."""

    def __init__(self, d_model: int, hidden_dim: int):
        super().__init__()
        self.gate = nn.Linear(d_model, hidden_dim, bias=False)
        self.up = nn.Linear(d_model, hidden_dim, bias=False)
        self.down = nn.Linear(hidden_dim, d_model, bias=False)

    def hidden(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return F.silu(self.gate(x_BTD)) * self.up(x_BTD)

    def project(self, h_BTF: torch.Tensor) -> torch.Tensor:
        return self.down(h_BTF)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.project(self.hidden(x_BTD))


class MLP(nn.Module):
    """down(gelu(up x)) with the exact erf GELU, as `hidden` then `project`."""

    def __init__(self, d_model: int, hidden_dim: int):
        super().__init__()
        self.up = nn.Linear(d_model, hidden_dim, bias=False)
        self.down = nn.Linear(hidden_dim, d_model, bias=False)

    def hidden(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.up(x_BTD))

    def project(self, h_BTF: torch.Tensor) -> torch.Tensor:
        return self.down(h_BTF)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.project(self.hidden(x_BTD))


INNER_FFNS = {"swiglu": SwiGLU, "mlp": MLP}


class LTE(nn.Module):
    """The inner FFN with each expert's S hidden neurons scaled by its gate (the module
    docstring has the gates). Router: `router` [E, D] (dejavu: `router` [r, D] and
    `router_out` [E, r]) and `router_bias` [E]."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        lte, d, f = cfg.lte, cfg.d_model, cfg.ffn_hidden_dim
        self.cfg = lte
        n_experts = f // lte.expert_size
        self.inner = INNER_FFNS[lte.inner](d, f)
        if lte.routing == "dejavu":
            self.router = nn.Linear(d, lte.predictor_rank, bias=False)
            self.router_out = nn.Linear(lte.predictor_rank, n_experts, bias=False)
        else:
            self.router = nn.Linear(d, n_experts, bias=False)
            self.router_out = None
        self.router_bias = nn.Parameter(torch.zeros(n_experts))

    def scores(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """G = sigmoid(x W_g + b) (dejavu: sigmoid(x W1 W2 + b)): [B,T,E]."""
        z_BTE = self.router(x_BTD)
        if self.router_out is not None:
            z_BTE = self.router_out(z_BTE)
        return torch.sigmoid(z_BTE + self.router_bias)

    def gates(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """Each token's gate per expert [B,T,E]: what multiplies its S hidden neurons."""
        cfg, g_BTE = self.cfg, self.scores(x_BTD)
        if cfg.all_experts or (cfg.routing == "dejavu" and not cfg.hard):
            return torch.ones_like(g_BTE)
        if cfg.routing == "threshold":
            return (g_BTE > cfg.tau).float() if cfg.hard else g_BTE
        top_BTE = torch.zeros_like(g_BTE).scatter(-1, g_BTE.topk(cfg.top_k, dim=-1).indices, 1.0)
        return g_BTE * top_BTE if cfg.routing == "topk" else top_BTE

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        gate_BTF = self.gates(x_BTD).repeat_interleave(self.cfg.expert_size, dim=-1)
        return self.inner.project(self.inner.hidden(x_BTD) * gate_BTF)


def build_ffn(cfg: TransformerConfig) -> nn.Module:
    """The FFN of `cfg.ffn`."""
    if cfg.ffn == "lte":
        return LTE(cfg)
    return INNER_FFNS[cfg.ffn](cfg.d_model, cfg.ffn_hidden_dim)


class Block(nn.Module):
    """x + mixer(mixer_norm(x)), then x + ffn(ffn_norm(x))."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = build_ffn(cfg)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x_BTD = x_BTD + self.mixer(self.mixer_norm(x_BTD))
        return x_BTD + self.ffn(self.ffn_norm(x_BTD))


class Planner(nn.Module):
    """h [B,T,D] -> h + the plan of block j at every token of block j+1 (see the docstring)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        p = cfg.planner
        inner = dataclasses.replace(
            cfg, n_heads=p.n_heads, n_kv_heads=p.n_kv_heads, head_dim=p.head_dim,
            rope_theta=p.rope_theta, ffn="swiglu", ffn_hidden_dim=p.hidden_dim, lte=None,
            planner=None,
        )  # fmt: skip
        self.block = p.block
        self.layers = nn.ModuleList(Block(inner) for _ in range(p.layers))
        self.plan_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.condition = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, h_BTD: torch.Tensor) -> torch.Tensor:
        b, t, d = h_BTD.shape
        p = self.block
        n = -(-t // p)
        padded_BNPD = F.pad(h_BTD, (0, 0, 0, n * p - t)).reshape(b, n, p, d)
        count_N = torch.clamp(t - p * torch.arange(n), max=p).to(h_BTD.dtype)
        x_BND = padded_BNPD.sum(2) / count_N[:, None]  # each block's mean over its tokens
        for layer in self.layers:
            x_BND = layer(x_BND)
        c_BND = self.condition(self.plan_norm(x_BND))
        c_BND = F.pad(c_BND[:, :-1], (0, 0, 1, 0))  # block j+1 gets the plan of block j
        return h_BTD + c_BND.repeat_interleave(p, dim=1)[:, :t]


class Transformer(nn.Module):
    """tokens [B,T] -> logits [B,T,V] float32: embed, blocks, final RMSNorm, the planner's
    conditioning if any, LM head (`head` [V, D], the very tensor `embed.weight` when tied)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.planner = Planner(cfg) if cfg.planner is not None else None
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    def forward(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        x_BTD = self.embed(tokens_BT).float()
        for layer in self.layers:
            x_BTD = layer(x_BTD)
        h_BTD = self.final_norm(x_BTD)
        if self.planner is not None:
            h_BTD = self.planner(h_BTD)
        return self.head(h_BTD).float()


def load(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[Transformer, TransformerConfig]:
    """The model in the folder `path` (config.json, model.pt) in float32 and eval mode, loaded
    with `strict=True` (every name present, none extra), and its config."""
    path = Path(path)
    cfg = TransformerConfig(**json.loads((path / "config.json").read_text()))
    model = Transformer(cfg)
    state = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    if cfg.tie_embeddings:  # the head is the embedding's tensor: the file holds it once
        state["head.weight"] = state["embed.weight"]
    model.load_state_dict(state, strict=True)  # casts a bfloat16 export to float32
    return model.to(device).eval(), cfg
