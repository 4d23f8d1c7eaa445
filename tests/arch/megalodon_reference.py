"""Megalodon's operators written directly from their equations, for tests/arch/test_megalodon.py.

Independent of `menagerie.arch.megalodon*`: float64 numpy loops and dense masks, read from
../shared/references/megalodon.md (the official XuezheMax/megalodon code). Only the parameter
names (the nested dict of `nnx.to_pure_dict`) are shared with our modules. The `*_scan`
functions are the same recurrences in jnp float32 with `lax.scan`, so `jax.grad` differentiates
the definition itself.

Shapes: x [B, L, D]; CEMA parameters alpha, delta [D, N], theta [D], gamma [D, N, 2],
omega [D]; CEMA state h complex [B, D, N]; TimestepNorm state (count [B], mean, var [B, G]).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def silu(x):
    return x * sigmoid(x)


def cema_coefficients(alpha, delta, theta, gamma):
    """p (real), q (complex) and eta (complex), [D, N] each: p = sigmoid(alpha),
    q = (1 - p sigmoid(delta)) e^{i th_n}, th_n = n sigmoid(theta) 2 pi / N (n = 1..N),
    eta = (gamma_re + i gamma_im) / sqrt(N)."""
    alpha, delta, theta, gamma = (np.asarray(a, np.float64) for a in (alpha, delta, theta, gamma))
    n = alpha.shape[-1]
    p = sigmoid(alpha)
    phase = np.arange(1, n + 1) * sigmoid(theta)[:, None] * 2 * math.pi / n
    q = (1 - p * sigmoid(delta)) * np.exp(1j * phase)
    eta = (gamma[..., 0] + 1j * gamma[..., 1]) / math.sqrt(n)
    return p, q, eta


def cema(x, h0, alpha, delta, theta, gamma, omega):
    """The recurrence, one token at a time: h_t = p x_t + q h_{t-1},
    y_t = Re(sum_n eta_n h_{t,n}) + omega x_t. Returns (y [B,L,D], h_L complex [B,D,N])."""
    p, q, eta = cema_coefficients(alpha, delta, theta, gamma)
    x = np.asarray(x, np.float64)
    h = np.asarray(h0, np.complex128)
    ys = []
    for t in range(x.shape[1]):
        h = p * x[:, t, :, None] + q * h
        ys.append(np.real((eta * h).sum(-1)) + np.asarray(omega, np.float64) * x[:, t])
    return np.stack(ys, axis=1), h


def group_stats(x, groups):
    """Per token, the mean and population variance of each group's elements: [B, L, G] each."""
    b, length, d = x.shape
    xg = np.asarray(x, np.float64).reshape(b, length, groups, d // groups)
    return xg.mean(-1), xg.var(-1)


def timestep_norm(x, weight, bias, *, groups, eps, prior=None):
    """At each position t, the mean and population variance of all elements of the group at
    positions <= t, counting `prior` = (count [B], mean [B,G], var [B,G]) as `count` earlier
    tokens with that mean and variance; y = (x - mean_t) / sqrt(var_t + eps) (1 + weight) + bias.
    Returns (y, (count, mean, var) after the last position)."""
    b, length, d = x.shape
    gs = d // groups
    xg = np.asarray(x, np.float64).reshape(b, length, groups, gs)
    if prior is None:
        prior = (np.zeros(b), np.zeros((b, groups)), np.ones((b, groups)))
    c0, m0, v0 = (np.asarray(a, np.float64) for a in prior)
    n0 = (c0 * gs)[:, None]  # prior elements per group
    y = np.empty_like(xg)
    for t in range(length):
        seen = xg[:, : t + 1]  # [B, t+1, G, gs]
        n = n0 + (t + 1) * gs
        s1 = n0 * m0 + seen.sum(axis=(1, 3))
        s2 = n0 * (v0 + m0**2) + (seen**2).sum(axis=(1, 3))
        mean = s1 / n
        var = s2 / n - mean**2
        y[:, t] = (xg[:, t] - mean[..., None]) / np.sqrt(var[..., None] + eps)
    y = y.reshape(b, length, d) * (1 + np.asarray(weight, np.float64)) + bias
    return y, (c0 + length, mean, var)


def chunked_causal_attention(q, k, v, *, chunk, scale):
    """softmax(scale q k^T + mask) v with the mask keeping key j for query i iff both are in
    the same chunk of `chunk` tokens and j <= i; dense, [B,T,H,*] in and out."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    t = q.shape[1]
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    keep = (i // chunk == j // chunk) & (j <= i)
    s = np.einsum("bihd,bjhd->bhij", q, k) * scale
    s = np.where(keep, s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    return np.einsum("bhij,bjhd->bihd", w, v)


def rope_interleaved(x, positions, base):
    """Pairs (2i, 2i+1) as the complex number x_2i + i x_2i+1, times e^{i pos base^(-2i/d)}."""
    d = x.shape[-1]
    freqs = base ** (-np.arange(0, d, 2) / d)
    rot = np.exp(1j * positions[:, None] * freqs)[None, :, None, :]  # [1, T, 1, d/2]
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * rot
    return np.stack([z.real, z.imag], axis=-1).reshape(x.shape)


def rms_norm(x, eps):
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps)


def layer_norm(x, eps):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)


def linear(x, p):
    out = x @ np.asarray(p["kernel"], np.float64)
    return out + p["bias"] if "bias" in p else out


def mega_block(params, x, cfg, norm_state=None, h0=None):
    """MegaBlock from the official equations: y = MEGA(x) + x, out = NFFN(y) + x. `params` is
    the block's `nnx.to_pure_dict` (numpy); returns (out, norm state, h) in float64."""
    m = jax.tree.map(lambda a: np.asarray(a, np.float64), params["mega"])
    b, length, d = x.shape
    x = np.asarray(x, np.float64)
    heads, eps = cfg.num_heads, cfg.norm_eps
    hz = cfg.z_dim // heads
    xt, norm_state = timestep_norm(
        x,
        m["timenorm"]["weight"],
        m["timenorm"]["bias"],
        groups=cfg.norm_num_groups,
        eps=eps,
        prior=norm_state,
    )
    if h0 is None:
        h0 = np.zeros((b, d, cfg.cema_ndim), np.complex128)
    c, h = cema(xt, h0, **m["cema"])
    mx = rms_norm(c, eps) * (1 + m["rmsnorm"])
    z = rms_norm(linear(mx, m["wz"]).reshape(b, length, heads, hz), eps)
    gamma = ((1 + m["gamma"]) / math.sqrt(hz)).reshape(2, heads, hz)
    beta = m["beta"].reshape(2, heads, hz)
    q, k = z * gamma[0] + beta[0], z * gamma[1] + beta[1]
    pos = np.arange(length) % cfg.chunk_size  # RoPE restarts in every chunk
    q, k = rope_interleaved(q, pos, cfg.rope_base), rope_interleaved(k, pos, cfg.rope_base)
    v = silu(linear(xt, m["wv"])).reshape(b, length, heads, -1)  # from TimestepNorm's output
    r = silu(linear(mx, m["wr"]))
    o = chunked_causal_attention(q, k, v, chunk=cfg.chunk_size, scale=1.0).reshape(b, length, -1)
    y = linear(mx, m["wh1"]) + linear(o * r, m["wh2"]) + x

    f = jax.tree.map(lambda a: np.asarray(a, np.float64), params["nffn"])
    u = layer_norm(y, eps) * (1 + f["norm_weight"]) + f["norm_bias"]
    hidden = silu(linear(u, f["fc1"]))
    if "fc3" in f:
        hidden = hidden * linear(u, f["fc3"])
    out = linear(hidden, f["fc2"])
    if "alpha" in f:
        out = out * f["alpha"]
    return out + x, norm_state, h


# The recurrences in jnp float32 with lax.scan, for gradients.


def cema_scan(x, h0_re, h0_im, alpha, delta, theta, gamma, omega):
    """`cema` as a scan over tokens (complex64): (y [B,L,D], h_re, h_im)."""
    n = alpha.shape[-1]
    p = jax.nn.sigmoid(alpha)
    phase = jnp.arange(1, n + 1) * jax.nn.sigmoid(theta)[:, None] * (2 * math.pi / n)
    q = (1 - p * jax.nn.sigmoid(delta)) * jnp.exp(1j * phase)
    eta = (gamma[..., 0] + 1j * gamma[..., 1]) / math.sqrt(n)

    def step(h, x_t):
        h = p * x_t[..., None] + q * h
        return h, jnp.real((eta * h).sum(-1)) + omega * x_t

    h, ys = jax.lax.scan(step, h0_re + 1j * h0_im, x.swapaxes(0, 1))
    return ys.swapaxes(0, 1), jnp.real(h), jnp.imag(h)


def timestep_norm_scan(x, weight, bias, count, mean, var, *, groups, eps):
    """`timestep_norm` as a scan over tokens: each token's group (mean, variance) merged into
    the running (count, mean, var) by Welford's rule. Returns (y, mean, var) at the end."""
    b, length, d = x.shape
    xg = x.reshape(b, length, groups, d // groups)
    mu, sig = xg.mean(-1), xg.var(-1)

    def step(carry, inp):
        c, m, v = carry
        mu_t, sig_t = inp
        c1 = c + 1
        delta = mu_t - m
        m1 = m + delta / c1
        v1 = (c * v + sig_t + c / c1 * delta**2) / c1
        return (c1, m1, v1), (m1, v1)

    c0 = count.astype(jnp.float32)[:, None]
    (_, m, v), (ms, vs) = jax.lax.scan(
        step, (c0, mean, var), (mu.swapaxes(0, 1), sig.swapaxes(0, 1))
    )
    ms, vs = ms.swapaxes(0, 1), vs.swapaxes(0, 1)
    y = (xg - ms[..., None]) * jax.lax.rsqrt(vs + eps)[..., None]
    return y.reshape(b, length, d) * (weight + 1) + bias, m, v
