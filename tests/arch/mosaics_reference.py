"""Memory Mosaics (the official naive `StackAssoMem`) written from its equations, for
tests/arch/test_mosaics.py: float64 numpy with the T x T matrices the official code builds.

Independent of `menagerie.arch.mosaics`: only the parameter names (the nested dict of
`nnx.to_pure_dict`) are shared. Kernels are stored [in, *out] as our Linear stores them.
Read from ../shared/references/memory_mosaics.md and the official
`Library/memory_mosaics/models/memory_mosaics.py` (facebookresearch/MemoryMosaics @ 1fff63b).
"""

from __future__ import annotations

import math

import numpy as np


def a64(x):
    return np.asarray(x, np.float64)


def leaky_matrix(beta: float, t: int) -> np.ndarray:
    """A[t, s] = (1 - e^-b) e^{-b (t - s)} for s <= t, else 0 (official leakyavg_coef)."""
    gap = np.arange(t)[:, None] - np.arange(t)[None, :]
    return np.where(gap >= 0, (1 - math.exp(-beta)) * np.exp(-beta * np.maximum(gap, 0)), 0.0)


def normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def keys(p: dict, x: np.ndarray, n_heads: int) -> np.ndarray:
    """Unit leaky-averaged keys [B, H, T, hs]: W_k, split heads, leaky average, normalise."""
    b, t, d = x.shape
    k = (x @ a64(p["wk"]["kernel"]).reshape(d, d)).reshape(b, t, n_heads, -1).transpose(0, 2, 1, 3)
    beta = 10 * np.abs(a64(p["leaky_key_beta"]))
    avg = np.stack([leaky_matrix(beta[h], t) @ k[:, h] for h in range(n_heads)], axis=1)
    return normalize(avg)


def context_memory(p: dict, x: np.ndarray, n_heads: int) -> np.ndarray:
    """The contextual memory's output [B, T, D] (official InContextAssoMemBlock, eval)."""
    b, t, d = x.shape
    kb = a64(p["keys"]["kernel_beta"])
    k = keys(p["keys"], x, n_heads) * np.exp(np.minimum(10 * kb, 5))[None, :, None, None]
    v = (x @ a64(p["wv"]["kernel"]).reshape(d, d)).reshape(b, t, n_heads, -1).transpose(0, 2, 1, 3)
    ahead = np.concatenate([v[:, :, 1:], np.zeros_like(v[:, :, :1])], axis=2)
    lam = a64(p["coef"])[None, :, None, None]
    v = (
        normalize((1 - lam) * ahead + lam * v)
        * np.exp(10 * a64(p["value_beta"]))[None, :, None, None]
    )
    y = np.zeros_like(v)
    for i in range(1, t):  # row 0 sees nothing: zero
        s = np.einsum("bhd,bhsd->bhs", k[:, :, i], k[:, :, :i])
        w = np.exp(s - s.max(-1, keepdims=True))
        y[:, :, i] = np.einsum("bhs,bhsd->bhd", w / w.sum(-1, keepdims=True), v[:, :, :i])
    y = y.transpose(0, 2, 1, 3).reshape(b, t, d)
    return y @ a64(p["c_proj"]["kernel"]).reshape(d, d)


def persistent_memory(p: dict, x: np.ndarray, n_heads: int) -> np.ndarray:
    """The persistent memory's output [B, T, D] (official PersistentAssoMemBlock + Pmem)."""
    b, t, d = x.shape
    kb = a64(p["keys"]["kernel_beta"])
    k = keys(p["keys"], x, n_heads) * np.exp(np.minimum(10 * kb, 5))[None, :, None, None] ** 2
    mk, mv = a64(p["mem_k"]), a64(p["mem_v"])  # [copies, H, P, hs]
    y = 0
    for j in range(mk.shape[0]):
        s = np.einsum("bhtd,hpd->bhtp", k, mk[j])
        w = np.exp(s - s.max(-1, keepdims=True))
        y = y + np.einsum("bhtp,hpd->bhtd", w / w.sum(-1, keepdims=True), mv[j])
    y = y / mk.shape[0] * np.exp(10 * a64(p["value_beta"]))[None, :, None, None]
    return y.transpose(0, 2, 1, 3).reshape(b, t, d) @ a64(p["c_proj"]["kernel"]).reshape(d, d)


def layer_norm(x, w, eps=1e-5):
    x = x - x.mean(-1, keepdims=True)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * a64(w)


def logits(p: dict, tokens: np.ndarray, n_heads: int) -> np.ndarray:
    """StackAssoMem: embedding (no positions), pre-LN blocks, ln_out, tied head / sqrt(D)."""
    table = a64(p["embed"]["table"])
    x = table[tokens]
    for layer in p["blocks"].values():
        x = x + context_memory(layer["mixer"], layer_norm(x, layer["ln1"]["scale"]), n_heads)
        x = x + persistent_memory(layer["ffn"], layer_norm(x, layer["ln2"]["scale"]), n_heads)
    x = layer_norm(x, p["ln_out"]["scale"])
    return x @ table.T / math.sqrt(table.shape[1])
