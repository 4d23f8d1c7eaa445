"""Memory Mosaics (Zhang, Nolte, Sadhukhan, Chen, Bottou; ICLR 2025) in plain PyTorch: the
forward pass of the official naive `StackAssoMem` (facebookresearch/MemoryMosaics,
`Library/memory_mosaics/models/memory_mosaics.py`), with its module and parameter names, and
nothing else.

This file is self-contained (it imports only torch): `menagerie export RUN --format mosaics`
copies it into the export folder as `modeling_mosaics.py`, beside `config.json` (the official
`StackAssoMem` keyword arguments) and `model.pt` (the official `StackAssoMem.state_dict()`
names and shapes):

    from modeling_mosaics import load
    model, config = load("exports/mosaics-tiny")   # float32, eval mode, strict state dict
    logits_BTV = model(tokens_BT)                  # tokens [B,T] int64 -> logits [B,T,V] float32

The computation, per `menagerie.arch.mosaics` (where every equation is written out). Per head h
of width hs = C / H (channel h * hs + d), every per-head scalar exponent-scaled by 10:

    x -> Block x n_layer -> LayerNorm -> head, logits / sqrt(C)   (no positional embedding)
    Block(x):  x = x + attn(ln1(x));  x = x + pmem(ln2(x))       (LayerNorms without bias)
    keys (both memories, each its own):  k~ = x W_k (the Conv1d of kernel 1),
        kbar_t = (1 - e^-b) sum_{s<=t} e^{-b (t-s)} k~_s,  b = 10 |leaky_key_beta|,
        k = e^{min(10 kernel_beta, 5)} kbar / |kbar|   (squared scale in the persistent memory)
    attn:  v~ = x W_v,  u_t = (1 - coef) v~_{t+1} + coef v~_t  (v~ past the end = 0),
           v = e^{10 value_beta} u / |u|,  y_t = sum_{s<t} softmax_s(k_t . k_s) v_s  (y_0 = 0),
           out = y W_c
    pmem:  y = e^{10 value_beta} mean_j softmax(k M_k^j^T) M_v^j,  out = y W_c

What this file leaves out of the official module: dropout (identity in eval), the training
loss, `generate`, and the configurations menagerie does not train (bias, post-LN, attn_only,
other feature extractors; `MosaicsConfig` refuses them). Unlike the official module it needs
no `config` object for the logits of every position and has no length limit (block_size is
kept in config.json for the official code, which cannot run past it). The L2 norms floor
|x| at 1e-15 (the official divides as is: NaN for a zero vector), as menagerie does.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

EXP_SCALE = 10.0  # official exp_param_scale
KERNEL_BETA_MAX = 5.0  # official kernel_beta_upbound


@dataclasses.dataclass
class MosaicsConfig:
    """The official `StackAssoMem` keyword arguments, field for field (defaults as there).
    Dropout rates and block_size concern the official training and masks and are not read."""

    vocab_size: int
    n_head: int = 12
    n_embd: int = 768
    n_layer: int = 12
    v_shift: int = 1
    block_size: int = 512
    k_fe_type: str = "linearconv"
    v_fe_type: str = "lowrlinearconv"
    k_kernel_size: int = 1
    v_kernel_size: int = 2
    ic_dropout: float = 0.05
    hd_dropout: float = 0.05
    bias: bool = False
    pmem_count: int = 1
    pmem_size: int = 2688
    pre_ln: bool = True
    weight_tying: bool = True
    skip_tokens: int = 0
    attn_only: bool = False

    def __post_init__(self):
        supported = {
            "v_shift": 1,
            "k_fe_type": "linearconv",
            "v_fe_type": "lowrlinearconv",
            "k_kernel_size": 1,
            "v_kernel_size": 2,
            "bias": False,
            "pre_ln": True,
            "skip_tokens": 0,
            "attn_only": False,
        }
        for name, value in supported.items():
            if getattr(self, name) != value:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is not supported (only {value!r})"
                )
        if self.n_embd % self.n_head:
            raise ValueError(f"n_head={self.n_head} must divide n_embd={self.n_embd}")


class LayerNorm(nn.Module):
    """LayerNorm over the last axis, eps 1e-5, a scale and no bias."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, None, 1e-5)


def unit(x: torch.Tensor) -> torch.Tensor:
    """x / |x| over the last axis (|x| floored at 1e-15)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-15)


def split_heads(x_BTC: torch.Tensor, n_head: int) -> torch.Tensor:
    """[B,T,C] -> [B,H,T,hs], channel c = h * hs + d."""
    b, t, c = x_BTC.shape
    return x_BTC.reshape(b, t, n_head, c // n_head).transpose(1, 2)


def merge_heads(y_BHTD: torch.Tensor) -> torch.Tensor:
    """[B,H,T,hs] -> [B,T,C]."""
    b, h, t, d = y_BHTD.shape
    return y_BHTD.transpose(1, 2).reshape(b, t, h * d)


def leaky_average(k_BHTD: torch.Tensor, beta_H: torch.Tensor) -> torch.Tensor:
    """kbar_t = (1 - e^-b) sum_{s<=t} e^{-b (t-s)} k_s per head, as a [H,T,T] matrix (the lag
    clamped at 0 before the exponential: no overflow above the diagonal)."""
    t = k_BHTD.shape[-2]
    pos = torch.arange(t, device=k_BHTD.device)
    lag = (pos[:, None] - pos[None, :]).to(k_BHTD.dtype)
    beta = beta_H[:, None, None]
    weights = torch.exp(-beta * lag.clamp_min(0)) * (1 - torch.exp(-beta))
    weights = torch.where(lag >= 0, weights, torch.zeros_like(weights))
    return weights @ k_BHTD


class KeyFeatures(nn.Module):
    """The key map x W_k, stored as the official Conv1d of kernel 1 (weight [C_out, C_in, 1])."""

    def __init__(self, n_embd: int):
        super().__init__()
        self.conv = nn.Conv1d(n_embd, n_embd, kernel_size=1, bias=False)

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        return x_BTC @ self.conv.weight[:, :, 0].T


class ValueFeatures(nn.Module):
    """u_t = (1 - coef_h) v~_{t+1} + coef_h v~_t with v~ = x W_v (v~ past the end is 0), then
    unit length per head: [B,H,T,hs]."""

    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.linear = nn.Linear(n_embd, n_embd, bias=False)
        self.coef = nn.Parameter(torch.rand(n_head))

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        v = split_heads(self.linear(x_BTC), self.n_head)
        ahead = torch.cat([v[:, :, 1:], torch.zeros_like(v[:, :, :1])], dim=2)
        lam = self.coef[:, None, None]
        return unit((1 - lam) * ahead + lam * v)


class _Memory(nn.Module):
    """What both memories share: their own key map, leak rates and scales per head."""

    def __init__(self, cfg: MosaicsConfig):
        super().__init__()
        h = cfg.n_head
        self.n_head = h
        self.leaky_key_beta = nn.Parameter(torch.linspace(0.5, 5.0, h) / EXP_SCALE)
        self.kernel_beta = nn.Parameter(torch.full((h,), 0.1))
        self.value_beta = nn.Parameter(torch.full((h,), -0.05))
        self.k_featurizer = KeyFeatures(cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def unit_keys(self, x_BTC: torch.Tensor) -> torch.Tensor:
        k = split_heads(self.k_featurizer(x_BTC), self.n_head)
        return unit(leaky_average(k, EXP_SCALE * self.leaky_key_beta.abs()))

    def key_scale(self) -> torch.Tensor:
        """e^{min(10 kernel_beta, 5)} [H,1,1]."""
        exponent = (EXP_SCALE * self.kernel_beta).clamp(max=KERNEL_BETA_MAX)
        return torch.exp(exponent)[:, None, None]

    def value_scale(self) -> torch.Tensor:
        """e^{10 value_beta} [H,1,1]."""
        return torch.exp(EXP_SCALE * self.value_beta)[:, None, None]


class ContextMemory(_Memory):
    """The contextual memory (official `InContextAssoMemBlock`): y_t = sum_{s<t} softmax_s(k_t .
    k_s) v_s, y_0 = 0, scale 1."""

    def __init__(self, cfg: MosaicsConfig):
        super().__init__(cfg)
        self.v_featurizer = ValueFeatures(cfg.n_embd, cfg.n_head)

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        k = self.key_scale() * self.unit_keys(x_BTC)
        v = self.value_scale() * self.v_featurizer(x_BTC)
        t = x_BTC.shape[1]
        scores = k @ k.transpose(-1, -2)
        earlier = torch.ones(t, t, dtype=torch.bool, device=x_BTC.device).tril(-1)  # s < t
        scores = scores.masked_fill(~earlier, float("-inf"))
        probs = torch.zeros_like(scores)
        probs[:, :, 1:] = scores[:, :, 1:].softmax(-1)  # row 0 sees nothing: zeros
        return self.c_proj(merge_heads(probs @ v))


class Memories(nn.Module):
    """pmem_count fixed key/value memories M_k{j}, M_v{j} [1,H,P,hs] (official `Pmem`)."""

    def __init__(self, cfg: MosaicsConfig):
        super().__init__()
        self.count = cfg.pmem_count
        shape = (1, cfg.n_head, cfg.pmem_size, cfg.n_embd // cfg.n_head)
        for j in range(cfg.pmem_count):
            setattr(self, f"M_k{j}", nn.Parameter(torch.zeros(shape)))
            setattr(self, f"M_v{j}", nn.Parameter(torch.zeros(shape)))

    def forward(self, k_BHTD: torch.Tensor) -> torch.Tensor:
        """mean_j softmax(k M_k^j^T) M_v^j (scale 1, no mask)."""
        y = 0
        for j in range(self.count):
            mk, mv = getattr(self, f"M_k{j}"), getattr(self, f"M_v{j}")
            y = y + (k_BHTD @ mk.transpose(-1, -2)).softmax(-1) @ mv
        return y / self.count


class PersistentMemory(_Memory):
    """The persistent memory (official `PersistentAssoMemBlock`): keys scaled by the squared
    key scale, read from the fixed memories, times the value scale."""

    def __init__(self, cfg: MosaicsConfig):
        super().__init__(cfg)
        self.pmem = Memories(cfg)

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        k = self.key_scale().square() * self.unit_keys(x_BTC)
        return self.c_proj(merge_heads(self.value_scale() * self.pmem(k)))


class Block(nn.Module):
    """Pre-LayerNorm: x + attn(ln1 x), then x + pmem(ln2 x) (official `AttnOnlyBlock`)."""

    def __init__(self, cfg: MosaicsConfig):
        super().__init__()
        self.ln1 = LayerNorm(cfg.n_embd)
        self.attn = ContextMemory(cfg)
        self.ln2 = LayerNorm(cfg.n_embd)
        self.pmem = PersistentMemory(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.pmem(self.ln2(x))


class StackAssoMem(nn.Module):
    """The official `StackAssoMem`: tokens [B,T] -> logits [B,T,V] float32 of every position."""

    def __init__(self, cfg: MosaicsConfig):
        super().__init__()
        self.logit_scale = 1.0 / math.sqrt(cfg.n_embd)
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_out = LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.weight_tying:
            self.emb.weight = self.head.weight

    def forward(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens_BT)
        for block in self.blocks:
            x = block(x)
        return self.logit_scale * self.head(self.ln_out(x))


def load(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[StackAssoMem, MosaicsConfig]:
    """The model in the folder `path` (config.json, model.pt) in float32 and eval mode, loaded
    with `strict=True` (every official name present, none extra), and its config."""
    path = Path(path)
    cfg = MosaicsConfig(**json.loads((path / "config.json").read_text()))
    model = StackAssoMem(cfg)
    state = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)  # casts a bfloat16 export to float32
    return model.to(device).eval(), cfg
