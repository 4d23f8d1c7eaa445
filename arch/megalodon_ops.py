"""Megalodon's two recurrent operators as pure functions: complex EMA (CEMA) and TimestepNorm.

Both carry a small state across the sequence, and both are written so one function serves every
use: a whole sequence from a zero state, a sequence split into segments with the state carried
between them, a device's slice of a sequence-parallel run, and incremental decoding.

CEMA (official `modules/complex_exponential_moving_average.py` and its CUDA ops), per channel d
and EMA dimension n, with p = sigmoid(alpha), q = (1 - sigmoid(alpha) sigmoid(delta)) e^{i th_n},
th_n = n sigmoid(theta) 2 pi / N (n = 1..N), eta = (gamma_re + i gamma_im) / sqrt(N):

    h_t = p x_t + q h_{t-1}                 (complex, h_{-1} = h0)
    y_t = Re(sum_n eta_n h_{t,n}) + omega x_t

Unrolled: y_t = sum_{j<=t} k[t-j] x_j + Re(sum_n eta q^{t+1} h0) + omega x_t with the kernel
k[m] = Re(sum_n eta p q^m), and the state after S steps is h_S = q^S h0 + sum_j p q^{S-1-j} x_j
(the official `ema_parameters` / `fftconv` / `ema_hidden`). Here a sequence is cut into
segments of S tokens: all segments' convolutions are FFTs of length 2S in float32, done at
once; each segment's state from zero and its entering state's part of y are small einsums with
q^0..q^S, and a `lax.scan` over segments carries only the [B,D,N] state between them. The
per-token cost therefore depends on S, not on the sequence length (the official code and
`megalodon-jax` run one FFT over the whole local sequence). All complex numbers are kept as
(real, imaginary) float32 pairs, so nothing needs complex dtypes.

TimestepNorm (official `modules/timestep_norm.py`, CPU reference `csrc/ops/timestep_norm.cc`):
features in G groups; at each position t the mean and population variance over all elements of
the group at positions <= t (a Welford merge of each token's group mean and variance, weight 1
per token), then y = (x - mean_t) / sqrt(var_t + eps) * (w + 1) + b. The state is
(count [B] int32, mean [B,G], var [B,G]) float32; the official prior is count 0, mean 0, var 1.
Computed here by a cumulative sum of moments shifted by an anchor (the incoming mean, or the
first token's) so float32 does not cancel.

Incremental decoding adds a third piece of state per layer, the keys and values of the current,
unfinished attention chunk (`LayerCache`, `attend_cached`): attention never looks past its own
chunk, so the cache never holds more than `chunk_size` tokens, whatever the context.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct
from menagerie.kernels.sparse_attention import attention_reference

from . import axes


@struct.dataclass
class NormState:
    """TimestepNorm statistics so far: count [B] int32, mean and var [B,G] float32."""

    count: jax.Array
    mean: jax.Array
    var: jax.Array

    @classmethod
    def zeros(cls, batch: int, groups: int) -> NormState:
        """The official prior: nothing seen, mean 0, variance 1 (prior_count 0)."""
        return cls(
            count=jnp.zeros((batch,), jnp.int32),
            mean=jnp.zeros((batch, groups), jnp.float32),
            var=jnp.ones((batch, groups), jnp.float32),
        )


def timestep_norm(
    x_BLD: jax.Array,
    weight_D: jax.Array,
    bias_D: jax.Array,
    state: NormState,
    *,
    groups: int,
    eps: float,
) -> tuple[jax.Array, NormState]:
    """Cumulative group normalisation of x [B,L,D] from `state`; returns (y in x's dtype, the
    state after the last position)."""
    b, length, d = x_BLD.shape
    x = x_BLD.astype(jnp.float32).reshape(b, length, groups, d // groups)
    mu_BLG = jnp.mean(x, axis=-1)
    var_BLG = jnp.mean(jnp.square(x - mu_BLG[..., None]), axis=-1)
    seen = state.count[:, None] > 0
    anchor_BG = jax.lax.stop_gradient(jnp.where(seen, state.mean, mu_BLG[:, 0]))
    c0 = state.count.astype(jnp.float32)[:, None, None]
    off0 = (state.mean - anchor_BG)[:, None]
    shifted = mu_BLG - anchor_BG[:, None]
    s1 = c0 * off0 + jnp.cumsum(shifted, axis=1)
    s2 = c0 * (state.var[:, None] + jnp.square(off0)) + jnp.cumsum(var_BLG + shifted**2, axis=1)
    n = c0 + jnp.arange(1, length + 1, dtype=jnp.float32)[None, :, None]
    offset = s1 / n
    mean_BLG = anchor_BG[:, None] + offset
    var_BLG = jnp.maximum(s2 / n - jnp.square(offset), 0.0)
    y = (x - mean_BLG[..., None]) * jax.lax.rsqrt(var_BLG + eps)[..., None]
    y = y.reshape(b, length, d) * (weight_D.astype(jnp.float32) + 1) + bias_D.astype(jnp.float32)
    new = NormState(count=state.count + length, mean=mean_BLG[:, -1], var=var_BLG[:, -1])
    return y.astype(x_BLD.dtype), new


def norm_summary(x_BLD: jax.Array, groups: int) -> NormState:
    """The statistics of x [B,L,D] alone (count L, group mean and population variance)."""
    b, length, d = x_BLD.shape
    x = x_BLD.astype(jnp.float32).reshape(b, length, groups, d // groups)
    mean = jnp.mean(x, axis=(1, 3))
    var = jnp.mean(jnp.square(x - mean[:, None, :, None]), axis=(1, 3))
    return NormState(count=jnp.full((b,), length, jnp.int32), mean=mean, var=var)


def merge_norm(a: NormState, b: NormState) -> NormState:
    """Statistics of a's tokens followed by b's (Chan et al.'s pairwise merge)."""
    na, nb = a.count.astype(jnp.float32)[:, None], b.count.astype(jnp.float32)[:, None]
    n = jnp.maximum(na + nb, 1.0)
    delta = b.mean - a.mean
    mean = a.mean + delta * nb / n
    var = (na * a.var + nb * b.var) / n + jnp.square(delta) * na * nb / jnp.square(n)
    mean = jnp.where(na > 0, mean, b.mean)
    var = jnp.where(na > 0, var, b.var)
    return NormState(count=a.count + b.count, mean=mean, var=var)


@struct.dataclass
class CEMACoeffs:
    """p [D,N]; eta_re, eta_im [D,N]; log|q| and arg q [D,N]; powers q^0..q^S as pow_re,
    pow_im [D,N,S+1]."""

    p: jax.Array
    eta_re: jax.Array
    eta_im: jax.Array
    log_mag: jax.Array
    phase: jax.Array
    pow_re: jax.Array
    pow_im: jax.Array


def cema_coeffs(alpha, delta, theta, gamma, max_len: int) -> CEMACoeffs:
    """The official coefficients (float32) from alpha, delta [D,N], theta [D], gamma [D,N,2],
    with q's powers up to `max_len`."""
    alpha, delta = alpha.astype(jnp.float32), delta.astype(jnp.float32)
    n = alpha.shape[-1]
    p = jax.nn.sigmoid(alpha)
    log_mag = jnp.log1p(-p * jax.nn.sigmoid(delta))  # log |q|
    wavelets = jnp.arange(1, n + 1, dtype=jnp.float32)
    phase = wavelets * jax.nn.sigmoid(theta.astype(jnp.float32))[:, None] * (2 * math.pi / n)
    j = jnp.arange(max_len + 1, dtype=jnp.float32)
    mag = jnp.exp(log_mag[..., None] * j)
    angle = phase[..., None] * j
    eta = gamma.astype(jnp.float32) / math.sqrt(n)
    return CEMACoeffs(
        p=p,
        eta_re=eta[..., 0],
        eta_im=eta[..., 1],
        log_mag=log_mag,
        phase=phase,
        pow_re=mag * jnp.cos(angle),
        pow_im=mag * jnp.sin(angle),
    )


def _eta_times(c: CEMACoeffs, lo: int, hi: int) -> tuple[jax.Array, jax.Array]:
    """eta q^j for j in [lo, hi) as (re, im) [D,N,hi-lo]."""
    qr, qi = c.pow_re[..., lo:hi], c.pow_im[..., lo:hi]
    er, ei = c.eta_re[..., None], c.eta_im[..., None]
    return er * qr - ei * qi, er * qi + ei * qr


def cema_kernel(c: CEMACoeffs, length: int) -> jax.Array:
    """k[j, d] = Re(sum_n eta p q^j), j < length: [length, D]."""
    kr, _ = _eta_times(c, 0, length)
    return jnp.einsum("dn,dnj->jd", c.p, kr)


def fft_causal_conv(x_BLD: jax.Array, k_LD: jax.Array) -> jax.Array:
    """y[t] = sum_{j<=t} k[t-j] x[j] along axis 1, by a zero-padded real FFT of length 2L."""
    return _rows_on_their_devices(_fft_conv, x_BLD, k_LD)


def _fft_conv(x_BLD: jax.Array, k_LD: jax.Array) -> jax.Array:
    n = 2 * x_BLD.shape[1]
    spectrum = jnp.fft.rfft(x_BLD, n=n, axis=1) * jnp.fft.rfft(k_LD, n=n, axis=0)
    return jnp.fft.irfft(spectrum, n=n, axis=1)[:, : x_BLD.shape[1]]


def _rows_on_their_devices(fn, x_BLD: jax.Array, k_LD: jax.Array) -> jax.Array:
    """fn(x, k) with x's batch rows split over the active mesh's batch axes, each device on its
    own rows. XLA's SPMD partitioner does not split FFTs over a batch: left to it, every device
    all-gathers the whole batch and transforms all of it."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return fn(x_BLD, k_LD)
    batch = axes.get("batch").mesh
    names = tuple(
        a
        for a in ((batch,) if isinstance(batch, str) else batch or ())
        if a in mesh.axis_names and mesh.shape[a] > 1 and a not in mesh.manual_axes
    )
    devices = math.prod(mesh.shape[a] for a in names)
    if not names or x_BLD.shape[0] % devices:
        return fn(x_BLD, k_LD)
    rows, rep = jax.sharding.PartitionSpec(names), jax.sharding.PartitionSpec()
    return jax.shard_map(
        fn, in_specs=(rows, rep), out_specs=rows, axis_names=set(names), check_vma=False
    )(x_BLD, k_LD)


def cema(
    x_BLD: jax.Array,
    h: tuple[jax.Array, jax.Array],
    c: CEMACoeffs,
    omega_D: jax.Array,
    *,
    segment: int,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """CEMA over x [B,L,D] from state h, `segment` tokens at a time (the last segment may be
    shorter); `c` needs powers up to min(L, segment). Returns (y [B,L,D] float32, final h)."""
    outs = []
    for x_BFSD in _segments(x_BLD, segment):
        y, h = _cema_segments(x_BFSD, h, c, omega_D)
        outs.append(y.reshape(y.shape[0], -1, y.shape[-1]))
    return jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0], h


def _segments(x_BLD: jax.Array, segment: int) -> list[jax.Array]:
    """x as float32 [B,F,S,D] pieces: the full segments of `segment` tokens, then the rest."""
    b, length, d = x_BLD.shape
    full, rest = divmod(length, segment)
    x = x_BLD.astype(jnp.float32)
    pieces = [x[:, : full * segment].reshape(b, full, segment, d)] if full else []
    return pieces + ([x[:, None, full * segment :]] if rest else [])


def _cema_segments(
    x_BFSD: jax.Array, h: tuple[jax.Array, jax.Array], c: CEMACoeffs, omega_D: jax.Array
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """F consecutive segments of S tokens (S <= the powers' length - 1) from state h = (re, im)
    [B,D,N]: (y [B,F,S,D] float32, the state after them). All segments are convolved at once,
    and so are their states from zero; only the carry of the state between segments (q^S h + the
    segment's own) is sequential, a scan over [B,D,N] arrays."""
    b, f, s, d = x_BFSD.shape
    entering, h = _carry(h, _local_states(x_BFSD, c), c, s)
    y = fft_causal_conv(x_BFSD.reshape(b * f, s, d), cema_kernel(c, s)).reshape(x_BFSD.shape)
    br, bi = _eta_times(c, 1, s + 1)  # eta q^{t+1}: the entering state's part of y_t
    weights = jnp.concatenate([br, -bi], axis=1)  # Re(a z) = Re a Re z - Im a Im z, over 2N
    states = jnp.concatenate(entering, axis=-1).reshape(b * f, d, -1)
    y = y + jnp.einsum("dnt,mdn->mtd", weights, states).reshape(y.shape)
    return y + omega_D.astype(jnp.float32) * x_BFSD, h


def _local_states(x_BFSD: jax.Array, c: CEMACoeffs) -> tuple[jax.Array, jax.Array]:
    """Each segment's state from zero, sum_j p q^{S-1-j} x_j (the official `ema_hidden`):
    (re, im) [B,F,D,N].

    This and the entering state's part of y (`_cema_segments`) are one einsum each over the
    real and imaginary parts together, with B and F merged into one axis: the gradients of
    the coefficients then contract one axis, not two, which XLA:CPU runs without transposed
    copies (a Megalodon train step at 8 x 4096: 6.74 s -> 6.37 s, 2026-12-01)."""
    b, f, s, d = x_BFSD.shape
    n = c.p.shape[-1]
    p, last_first = c.p[..., None], slice(s - 1, None, -1)  # q^{S-1} .. q^0
    weights = jnp.concatenate([p * c.pow_re[..., last_first], p * c.pow_im[..., last_first]], 1)
    both = jnp.einsum("dnj,mjd->mdn", weights, x_BFSD.reshape(b * f, s, d))
    both = both.reshape(b, f, d, 2 * n)
    return both[..., :n], both[..., n:]


def _carry(h, local, c: CEMACoeffs, s: int):
    """The state entering each of F segments of s tokens, (re, im) [B,F,D,N], and the state
    after the last: h_{f+1} = q^s h_f + local_f."""
    qr, qi = c.pow_re[..., s], c.pow_im[..., s]

    def step(h, u):
        nxt = (qr * h[0] - qi * h[1] + u[0], qr * h[1] + qi * h[0] + u[1])
        return nxt, h

    h, entering = jax.lax.scan(step, h, jax.tree.map(lambda a: a.swapaxes(0, 1), local))
    return jax.tree.map(lambda a: a.swapaxes(0, 1), entering), h


def cema_advance(h: tuple[jax.Array, jax.Array], c: CEMACoeffs, n: int):
    """q^n h: the state after n zero inputs."""
    mag = jnp.exp(c.log_mag * n)
    qr, qi = mag * jnp.cos(c.phase * n), mag * jnp.sin(c.phase * n)
    return qr * h[0] - qi * h[1], qr * h[1] + qi * h[0]


def cema_final_state(x_BLD: jax.Array, h, c: CEMACoeffs, *, segment: int):
    """Only the state after x [B,L,D] (no outputs): what a sequence-parallel block sends on."""
    for x_BFSD in _segments(x_BLD, segment):
        _, h = _carry(h, _local_states(x_BFSD, c), c, x_BFSD.shape[2])
    return h


def zero_cema_state(batch: int, dim: int, ndim: int) -> tuple[jax.Array, jax.Array]:
    """h = 0: (re, im) [B,D,N] float32."""
    z = jnp.zeros((batch, dim, ndim), jnp.float32)
    return z, z


@struct.dataclass
class LayerCache:
    """One MEGA layer's decoding state: TimestepNorm statistics, CEMA state (re, im) [B,D,N],
    and the current chunk's keys [B,C,H,Z/H] (after RoPE) and values [B,C,H,E/H]; slot j holds
    the chunk's j-th token, and only the first (position % C) slots are filled."""

    norm: NormState
    cema: tuple[jax.Array, jax.Array]
    keys: jax.Array
    values: jax.Array


def attend_cached(q_BTHD, k_BTHD, v_BTHE, keys_BCHD, values_BCHE, start):
    """Chunked causal attention (scale 1) for T new tokens at positions start..start+T-1, given
    the cached keys and values of the chunk holding `start` (C = the cache length). The T tokens
    may cross chunk boundaries. Returns (o [B,T,H,E], the cache after the last new token)."""
    t, c = q_BTHD.shape[1], keys_BCHD.shape[1]
    first = start - start % c  # the cached chunk's first position
    keys = jnp.concatenate([keys_BCHD, k_BTHD.astype(keys_BCHD.dtype)], axis=1)
    values = jnp.concatenate([values_BCHE, v_BTHE.astype(values_BCHE.dtype)], axis=1)
    slot = jnp.arange(c + t)
    key_pos = jnp.where(slot < c, first + slot, start + slot - c)
    filled = (slot >= c) | (slot < start - first)
    query_pos = start + jnp.arange(t)[:, None]
    keep = filled & (key_pos <= query_pos) & (key_pos // c == query_pos // c)  # [T, C+T]
    o = attention_reference(q_BTHD, keys, values, keep[None, None, None], scale=1.0)
    return o, _next_chunk_cache(keys, values, start, t, c)


def _next_chunk_cache(keys, values, start, t: int, c: int):
    """The slots of the chunk holding position start+t (its tokens before start+t), gathered
    from the cached-then-new buffers [B,C+T,...]; unfilled slots are zero."""
    end = start + t
    first, new_first = start - start % c, end - end % c
    pos = new_first + jnp.arange(c)
    src = jnp.clip(jnp.where(pos < start, pos - first, c + pos - start), 0, c + t - 1)
    filled = (pos < end)[None, :, None, None]

    def gather(a):
        return jnp.where(filled, jnp.take(a, src, axis=1), 0).astype(a.dtype)

    return gather(keys), gather(values)
