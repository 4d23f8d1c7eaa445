"""GaLore-family low-rank optimizers as optax transforms: GaLore, Fira, APOLLO, Q-GaLore refresh.

    tx = galore(3e-3, matrix_dims, rank=128, update_proj_gap=200, scale=0.25)
    state = tx.init(params); updates, state = tx.update(grads, state, params)

One transform, `scale_by_lowrank`, covers the family; `galore` and `apollo` are its presets.
Each selected parameter is viewed as a batch of matrices `[B, m, n]` (see `MatrixDims`); the
others get Adam in full space. For a matrix, with k its projected side and r the rank:

  refresh (every `update_proj_gap` steps):  Q [k, r] from the fp32 SVD of G (GaLore, Alg. 2),
                                             or a seeded Gaussian (APOLLO, SVD-free)
  project:      R = Qᵀ G  [r, n]  (side "left", k = m)   or   R = G Q  [m, r]  (side "right")
  Adam on R:    M, V in the projected space; N = M / (√V + ε)
  back:         GaLore: D = α · Q N (or N Qᵀ);  Fira adds the column-scaled residual G − α Q Qᵀ G;
                APOLLO: D = α · G ∘ s, s = ‖N‖/‖R‖ per channel (or per tensor)
  update:       −lr · √(1−β₂ᵗ)/(1−β₁ᵗ) · D, then decoupled weight decay on the updated weight.

The Adam arithmetic follows the official `galore_torch.AdamW` exactly (bias correction folded
into the step size, ε added to √V before it, weight decay `p ← p − lr·wd·p` after the step),
so updates match it to float32 rounding. State is a NamedTuple of plain arrays: it jits, is
selected elementwise by the trainer's skip-on-non-finite logic, and Orbax saves and reshards it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import math
import warnings
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

Side = Literal["std", "reverse_std", "left", "right"]


class MatrixDims(NamedTuple):
    """How to view an array as a batch of matrices: the first `batch` axes index independent
    matrices (e.g. scanned layers: one projector each), the next `rows` axes are merged into the
    rows m, and the remaining axes into the columns n. Only reshapes, never transposes, so a
    sharded axis stays the major part of the merged dimension it lands in."""

    batch: int = 0
    rows: int = 1


@dataclasses.dataclass(frozen=True)
class LowRankOptions:
    """Every option of `scale_by_lowrank`, validated once. The defaults are GaLore's: the
    official code's (eps 1e-6, betas (0.9, 0.999)) and the paper's (r = 128, α = 0.25, T = 200).

    Attributes:
      rank: r. A matrix with min(m, n) <= r gets full-rank Adam instead (warned once).
      update_proj_gap: T, steps between refreshes (refresh at step 0, T, 2T, ...).
      scale: α, multiplies the back-projected update (paper: 0.25; APOLLO: 1).
      b1, b2, eps: Adam's β₁, β₂ and ε (ε is added to √V, as the official code does).
      side: "std" (official default: compress the smaller side), "reverse_std" (the larger;
        optax.contrib.galore's choice), "left" or "right".
      projection: "svd" (GaLore) or "random" (seeded Gaussian N(0, 1/r), APOLLO; not stored).
      moments_on_refresh: "keep" (official) or "reproject" into the new basis (GaLore issue #54):
        M ← (QₙₑᵥᵀQₒₗd) M, V ← (QₙₑᵥᵀQₒₗd)∘² V (a nonnegative approximation for V).
      stagger: matrix j of J refreshes at steps ≡ ⌊jT/J⌋ (mod T) instead of all at once
        (all at step 0), one SVD at a time (`lax.map` + `lax.cond`, under one `lax.cond` per
        parameter that skips it when none of its matrices is due): the SVD cost and its
        workspace are spread and no stacked SVD buffer exists.
      fira: add the residual G − α Q Qᵀ G scaled per channel by ‖N‖/‖R‖ (Fira, arXiv 2410.01623).
        The α is the official code's (`fira.AdamW` subtracts `project_back(R)`, which includes
        α); the paper's Alg. 1 writes G − Q Qᵀ G. They agree at Fira's default α = 1.
      apollo_scaling: "channel"/"tensor": D = α G ∘ ‖N‖/‖R‖ (APOLLO, arXiv 2412.05270).
      norm_growth_limit: γ of the norm-growth limiter on the Fira residual / APOLLO update
        (both papers: 1.01); None disables it.
      lazy_refresh: Q-GaLore's adaptive gap: when the mean |cos| of the top singular vector
        over the last `lazy_queue` refreshes is >= `lazy_threshold`, the gap is multiplied by
        `lazy_factor` (q_galore_projector.py; we use |cos| so the sign convention is moot).
      lazy_threshold, lazy_queue, lazy_factor: see `lazy_refresh`.
      canonical_signs: fix singular-vector signs (see `_canonical_signs`); False uses raw
        `jnp.linalg.svd` output as optax.contrib does.
      svd_method: "qr": `lax.linalg.svd(algorithm=QR)` (LAPACK gesvd); "default":
        `jnp.linalg.svd`'s divide-and-conquer (gesdd), as optax.contrib and torch call it; both
        exact, equal up to rounding, and gesdd is the faster on one LAPACK thread (see
        `limit_cpu_lapack_threads`; timings: `bench/optimizer_memory.py`). "gram": top
        eigenvectors of the smaller Gram matrix (GGᵀ or GᵀG, fp32) - a matmul that reduces over
        the sharded axis plus a k x k eigh, less accurate for small singular-value gaps.
      seed: seeds random projections.
    """

    rank: int = 128
    update_proj_gap: int = 200
    scale: float = 0.25
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-6
    side: Side = "std"
    projection: Literal["svd", "random"] = "svd"
    moments_on_refresh: Literal["keep", "reproject"] = "keep"
    stagger: bool = False
    fira: bool = False
    apollo_scaling: Literal["none", "channel", "tensor"] = "none"
    norm_growth_limit: float | None = None
    lazy_refresh: bool = False
    lazy_threshold: float = 0.4
    lazy_queue: int = 5
    lazy_factor: int = 2
    canonical_signs: bool = True
    svd_method: Literal["qr", "default", "gram"] = "default"
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"rank={self.rank} must be a positive integer")
        if self.update_proj_gap <= 0:
            raise ValueError(f"update_proj_gap={self.update_proj_gap} must be > 0")
        if self.fira and self.apollo_scaling != "none":
            raise ValueError("fira and apollo_scaling are alternatives; choose one")

    @property
    def uniform(self) -> bool:
        """Every matrix refreshes at the same steps (no stagger, no lazy gap)."""
        return not (self.stagger or self.lazy_refresh)

    @property
    def limiter(self) -> bool:
        """The norm-growth limiter runs (on the Fira residual or the APOLLO update)."""
        return self.norm_growth_limit is not None and (self.fira or self.apollo_scaling != "none")


# APOLLO's defaults (`apollo`): the official `APOLLOAdamW`'s rank, α and limiter.
APOLLO_OPTIONS = LowRankOptions(
    rank=256,
    scale=1.0,
    projection="random",
    apollo_scaling="channel",
    norm_growth_limit=1.01,
)


def _options(options: LowRankOptions | None, default: LowRankOptions, kwargs: dict):
    """`options` (or `default`) with the fields named in `kwargs` replaced; unknown names raise
    TypeError, bad values ValueError."""
    base = default if options is None else options
    return dataclasses.replace(base, **kwargs) if kwargs else base


class LowRankState(NamedTuple):
    """Every field but `count` is a pytree with the parameters' structure. For a full-rank
    (Adam) parameter `mu`/`nu` have its shape and the other leaves are scalar placeholders (Orbax
    cannot save zero-size arrays). For a
    projected parameter with batch shape `[*b]`:

    mu, nu:         float32 `[*b, r, n]` (side left) or `[*b, m, r]` (side right).
    projector:      `[*b, k, r]` in the parameter dtype (SVD projection); a scalar for random
                    projections, which are regenerated from (seed, matrix, proj_step).
    proj_step:      int32 `[*b]`, the step of each matrix's last refresh.
    next_refresh:   int32 `[*b]`, the step of its next refresh.
    gap:            int32 `[*b]`, its current refresh gap (lazy refresh doubles it).
    cos_history:    float32 `[*b, queue]` cosine similarities of the top singular vector across
                    the last refreshes, NaN where empty (lazy refresh only, else a scalar).
    top_vector:     float32 `[*b, k]` the last top singular vector (lazy refresh only).
    residual_norm:  float32 `[*b]` the norm-growth limiter's memory (Fira/APOLLO, else a scalar).
    """

    count: jax.Array
    mu: Any
    nu: Any
    projector: Any
    proj_step: Any
    next_refresh: Any
    gap: Any
    cos_history: Any
    top_vector: Any
    residual_norm: Any


class _LeafState(NamedTuple):
    """One parameter's share of a `LowRankState`: its leaf of every field but `count`."""

    mu: Any
    nu: Any
    projector: Any
    proj_step: Any
    next_refresh: Any
    gap: Any
    cos_history: Any
    top_vector: Any
    residual_norm: Any


def _unstack(treedef, state: LowRankState) -> list[_LeafState]:
    """`LowRankState` (fields are pytrees like the params) -> one `_LeafState` per parameter."""
    fields = [treedef.flatten_up_to(getattr(state, f)) for f in _LeafState._fields]
    return [_LeafState(*leaf) for leaf in zip(*fields, strict=True)]


def _stack(treedef, count: Any, leaves: list[_LeafState]) -> LowRankState:
    """The inverse of `_unstack`: per-parameter `_LeafState`s -> a `LowRankState`."""
    fields = (treedef.unflatten([getattr(s, f) for s in leaves]) for f in _LeafState._fields)
    return LowRankState(count, *fields)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static facts about one parameter, derived from its shape and `MatrixDims`."""

    path: str
    shape: tuple[int, ...]
    dtype: Any
    lowrank: bool
    batch_shape: tuple[int, ...] = ()
    m: int = 0
    n: int = 0
    side: str = "left"  # left: Q [m, r], R = QᵀG [r, n]; right: Q [n, r], R = GQ [m, r]
    rank: int = 0
    first: int = 0  # global index of its first matrix: stagger offsets and random seeds

    @property
    def batch(self) -> int:
        return math.prod(self.batch_shape)

    @property
    def k(self) -> int:
        return self.m if self.side == "left" else self.n

    @property
    def low_shape(self) -> tuple[int, int]:
        return (self.rank, self.n) if self.side == "left" else (self.m, self.rank)


_fallback_reported: set[tuple] = set()


def _pick_side(side: Side, m: int, n: int) -> str:
    # Official galore_projector.py: "std" compresses the smaller side (m >= n: P = Vh[:r], right;
    # m < n: P = U[:, :r], left); "reverse_std" the larger, which is what optax.contrib does.
    if side == "std":
        return "right" if m >= n else "left"
    if side == "reverse_std":
        return "left" if m >= n else "right"
    return side


def path_str(path) -> str:
    """A key path as "a/b/0" (dict keys, sequence indices and attribute names, "/"-joined)."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _resolve_dims(matrix_dims: Any, params: Any) -> list:
    if matrix_dims is None:
        dims = jax.tree.map(lambda p: MatrixDims() if p.ndim == 2 else None, params)
    elif callable(matrix_dims):
        dims = matrix_dims(params)
    else:
        dims = matrix_dims
    flat = jax.tree.leaves(dims, is_leaf=lambda x: x is None or isinstance(x, MatrixDims))
    n_params = len(jax.tree.leaves(params))
    if len(flat) != n_params:
        raise ValueError(f"matrix_dims has {len(flat)} leaves but params have {n_params}")
    return flat


def _make_plans(params: Any, matrix_dims: Any, rank: int, side: Side) -> list[_Plan]:
    leaves = jax.tree_util.tree_leaves_with_path(params)
    plans, first = [], 0
    for (path, p), dims in zip(leaves, _resolve_dims(matrix_dims, params), strict=True):
        name, shape = path_str(path), tuple(p.shape)
        if dims is None:
            plans.append(_Plan(name, shape, p.dtype, lowrank=False))
            continue
        b, rows = dims
        if rows < 1 or b + rows >= len(shape):
            raise ValueError(
                f"parameter '{name}' of shape {list(shape)} is not a matrix under {dims}; "
                "low-rank projection needs rows and columns"
            )
        m, n = math.prod(shape[b : b + rows]), math.prod(shape[b + rows :])
        if rank >= min(m, n):
            key = (name, shape, rank)
            if key not in _fallback_reported:
                _fallback_reported.add(key)
                warnings.warn(
                    f"low-rank: rank {rank} >= min({m}, {n}) of '{name}'; it gets full-rank Adam",
                    stacklevel=3,
                )
            plans.append(_Plan(name, shape, p.dtype, lowrank=False))
            continue
        plan = _Plan(
            name, shape, p.dtype, True, shape[:b], m, n, _pick_side(side, m, n), rank, first
        )
        plans.append(plan)
        first += plan.batch
    return plans


def _empty(dtype=jnp.float32) -> jax.Array:
    # A scalar, not a [0] array: Orbax refuses to save zero-size arrays.
    return jnp.zeros((), dtype)


# Entry points, in the LAPACK build that jaxlib's CPU kernels use (scipy's), that set its thread
# count: scipy's bundled OpenBLAS, a system OpenBLAS, BLIS.
_LAPACK_THREAD_SETTERS = (
    "scipy_openblas_set_num_threads",
    "scipy_openblas_set_num_threads64_",
    "openblas_set_num_threads",
    "openblas_set_num_threads64_",
    "bli_thread_set_num_threads",
)
_lapack_threads: list[int | None] = [None]  # what we last set, so it is done once per process


def limit_cpu_lapack_threads(threads: int = 1) -> bool:
    """Sets the thread count of the LAPACK/BLAS that jaxlib's CPU linear-algebra kernels call
    (`scipy.linalg.cython_lapack`), process-wide. Returns False where it cannot be found. Call it
    once at start-up, before the first SVD on XLA:CPU; the optimizer itself does not.

    Why: XLA:CPU already runs on every core (and runs a batched SVD's matrices in parallel);
    OpenBLAS then wakes its own pool on top of it, whose workers spin after each call and slow
    both the SVD and the XLA work that follows it. One LAPACK thread per XLA thread has none of
    it."""
    if _lapack_threads[0] == threads:
        return True
    try:
        import scipy.linalg.cython_lapack as cython_lapack

        lib = ctypes.CDLL(cython_lapack.__file__)  # dlsym also searches its dependencies
    except (ImportError, OSError):
        return False
    for name in _LAPACK_THREAD_SETTERS:
        setter = getattr(lib, name, None)
        if setter is not None:
            setter(ctypes.c_int(threads))
            _lapack_threads[0] = threads
            return True
    return False


def random_projection(seed: int, index, step, k: int, rank: int) -> jax.Array:
    """The random projector (APOLLO, `projection="random"`) of matrix `index` (global order of
    the projected matrices) refreshed at `step`: N(0, 1/r) entries, float32 [k, r]. A pure
    function of its arguments, so it is regenerated rather than stored."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), index), step)
    return jax.random.normal(key, (k, rank), jnp.float32) / math.sqrt(rank)


def _canonical_signs(q_kr: jax.Array) -> jax.Array:
    """Flip each column so its largest-magnitude entry is positive. Singular vectors are defined
    up to sign and LAPACK builds disagree (MKL vs OpenBLAS flip ~1/3 of them); the official code
    keeps moments across refreshes, so the sign changes the trajectory. A fixed convention makes
    runs reproducible across backends."""
    idx = jnp.argmax(jnp.abs(q_kr), axis=0)
    s = jnp.sign(q_kr[idx, jnp.arange(q_kr.shape[1])])
    return q_kr * jnp.where(s == 0, 1.0, s)


# ----------------------------------------------------------------------------- per-leaf steps


def _init_leaf(opts: LowRankOptions, plan: _Plan) -> _LeafState:
    """Zero moments; for a projected parameter, step-0 refresh bookkeeping (see `LowRankState`)."""
    if not plan.lowrank:
        i32 = jnp.int32
        return _LeafState(
            jnp.zeros(plan.shape, jnp.float32),
            jnp.zeros(plan.shape, jnp.float32),
            *(_empty(), _empty(i32), _empty(i32), _empty(i32), _empty(), _empty(), _empty()),
        )
    bs = plan.batch_shape
    return _LeafState(
        mu=jnp.zeros(bs + plan.low_shape, jnp.float32),
        nu=jnp.zeros(bs + plan.low_shape, jnp.float32),
        projector=(
            jnp.zeros(bs + (plan.k, plan.rank), plan.dtype)
            if opts.projection == "svd"
            else _empty(plan.dtype)
        ),
        proj_step=jnp.zeros(bs, jnp.int32),
        next_refresh=jnp.zeros(bs, jnp.int32),
        gap=jnp.full(bs, int(opts.update_proj_gap), jnp.int32),
        cos_history=(
            jnp.full(bs + (opts.lazy_queue,), jnp.nan, jnp.float32)
            if opts.lazy_refresh
            else _empty()
        ),
        top_vector=jnp.zeros(bs + (plan.k,), jnp.float32) if opts.lazy_refresh else _empty(),
        residual_norm=jnp.zeros(bs, jnp.float32) if opts.limiter else _empty(),
    )


def _offsets(opts: LowRankOptions, plan: _Plan, total: int) -> np.ndarray:
    """[B] the step of each matrix's first refresh after step 0 (stagger), else zeros."""
    if not opts.stagger:
        return np.zeros(plan.batch, np.int64)
    gap = int(opts.update_proj_gap)
    j = plan.first + np.arange(plan.batch)
    return ((j * gap) // max(total, 1)) % gap


def _svd_projector(opts: LowRankOptions, plan: _Plan, g_mn: jax.Array) -> jax.Array:
    """[m, n] -> Q [k, r] in float32 (official: torch.linalg.svd of the fp32 gradient)."""
    g32 = g_mn.astype(jnp.float32)
    if opts.svd_method == "gram":
        gram = g32 @ g32.T if plan.side == "left" else g32.T @ g32  # [k, k]
        _, vecs = jnp.linalg.eigh(gram)  # ascending eigenvalues
        q = vecs[:, ::-1][:, : plan.rank]
    else:
        algorithm = jax.lax.linalg.SvdAlgorithm.QR if opts.svd_method == "qr" else None
        u, _, vh = jax.lax.linalg.svd(g32, full_matrices=False, algorithm=algorithm)
        q = u[:, : plan.rank] if plan.side == "left" else vh[: plan.rank].T
    return _canonical_signs(q) if opts.canonical_signs else q


def _random_projectors(
    opts: LowRankOptions, plans: list[_Plan], count: jax.Array, states: list[_LeafState]
) -> dict:
    """Every random projector of this step, {plan index: (Q at this step's proj_step, Q at
    the last one or None)} [B, k, r]: one vmapped generation per projector size k for all
    matrices of all parameters, not one per parameter (XLA:CPU runs each threefry as a
    rolled loop, so one call per parameter costs a visible share of a small model's step).
    vmap gives each matrix the numbers it gets alone."""
    groups: dict[int, list] = {}
    for i, plan in enumerate(plans):
        if plan.lowrank:
            groups.setdefault(plan.k, []).append(i)
    reproject = opts.moments_on_refresh == "reproject"
    out = {}
    for k, members in groups.items():
        index, new_step, old_step = [], [], []
        for i in members:
            plan, s = plans[i], states[i]
            pstep = s.proj_step.reshape(plan.batch)
            do = count == s.next_refresh.reshape(plan.batch)
            index.append(plan.first + jnp.arange(plan.batch))
            new_step.append(jnp.where(do, count, pstep))
            old_step.append(pstep)
        index, steps = jnp.concatenate(index), jnp.concatenate(new_step)
        if reproject:  # both at once: [new; old]
            index, steps = jnp.concatenate([index, index]), jnp.concatenate([steps, *old_step])
        q = jax.vmap(lambda i, s, k=k: random_projection(opts.seed, i, s, k, opts.rank))(
            index, steps
        )
        n = q.shape[0] // 2 if reproject else q.shape[0]
        start = 0
        for i in members:
            b = plans[i].batch
            out[i] = (q[start : start + b], q[n + start : n + start + b] if reproject else None)
            start += b
    return out


def _project(plan: _Plan, g: jax.Array, q: jax.Array) -> jax.Array:
    """g [B, m, n], q [B, k, r] -> R [B, *low_shape]."""
    if plan.side == "left":
        return jnp.einsum("bkr,bkn->brn", q, g)
    return jnp.einsum("bmk,bkr->bmr", g, q)


def _back(plan: _Plan, x: jax.Array, q: jax.Array) -> jax.Array:
    """x [B, *low_shape], q [B, k, r] -> [B, m, n]."""
    if plan.side == "left":
        return jnp.einsum("bkr,brn->bkn", q, x)
    return jnp.einsum("bmr,bkr->bmk", x, q)


def _rank_axis(plan: _Plan) -> int:
    """The axis of [B, *low_shape] that has r entries; the other one indexes channels."""
    return 1 if plan.side == "left" else 2


def _refresh_projector(
    opts: LowRankOptions,
    plan: _Plan,
    g_BMN: jax.Array,
    proj: jax.Array,
    do_B: jax.Array,
    q_random: tuple | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(Q after this step's refresh, Q before it) float32 [B, k, r], and the projector to store.
    Matrices with `do_B` False keep theirs."""
    if opts.projection == "random":
        q_new, q_old = q_random  # see _random_projectors
        return q_new, q_old, proj
    q_old = proj.reshape(plan.batch, plan.k, plan.rank).astype(jnp.float32)
    svd = functools.partial(_svd_projector, opts, plan)
    if opts.uniform:  # everyone refreshes together: one batched SVD under one cond
        q_new = jax.lax.cond(do_B[0], lambda: jax.vmap(svd)(g_BMN), lambda: q_old)
    else:  # one matrix at a time, only those due; nothing at all on most steps
        q_new = jax.lax.cond(
            jnp.any(do_B),
            lambda: jax.lax.map(
                lambda a: jax.lax.cond(a[0], lambda: svd(a[1]), lambda: a[2]),
                (do_B, g_BMN, q_old),
            ),
            lambda: q_old,
        )
    # Stored, and used, in the parameter dtype (official: cast back after the SVD).
    q_store = q_new.astype(plan.dtype)
    return q_store.astype(jnp.float32), q_old, q_store.reshape(*plan.batch_shape, plan.k, plan.rank)


def _reproject_moments(plan: _Plan, q_new, q_old, mu, nu, do_B) -> tuple[jax.Array, jax.Array]:
    """Moments of the matrices that refreshed, rotated into the new basis (GaLore issue #54):
    M ← C M, V ← C∘² V with C = QₙₑᵥᵀQₒₗd [B, r_new, r_old]."""
    c = jnp.einsum("bkr,bks->brs", q_new, q_old)
    if plan.side == "left":
        mu_r = jnp.einsum("brs,bsn->brn", c, mu)
        nu_r = jnp.einsum("brs,bsn->brn", c * c, nu)
    else:
        mu_r = jnp.einsum("bms,brs->bmr", mu, c)
        nu_r = jnp.einsum("bms,brs->bmr", nu, c * c)
    sel = do_B[:, None, None]
    return jnp.where(sel, mu_r, mu), jnp.where(sel, nu_r, nu)


def _lazy_gap(opts: LowRankOptions, plan: _Plan, count, do_B, q_new, hist, top, gap_B):
    """Q-GaLore lazy refresh: grow the gap of matrices whose subspace stopped moving. Returns
    (cos_history [B, queue], top_vector [B, k], gap [B])."""
    B = plan.batch
    hist, top = hist.reshape(B, opts.lazy_queue), top.reshape(B, plan.k)
    top_new = q_new[:, :, 0]
    cos = jnp.abs(jnp.sum(top * top_new, -1)) / (
        jnp.linalg.norm(top, axis=-1) * jnp.linalg.norm(top_new, axis=-1) + 1e-30
    )
    pushed = jnp.concatenate([hist[:, 1:], cos[:, None]], axis=1)
    hist_new = jnp.where((do_B & (count > 0))[:, None], pushed, hist)
    full = ~jnp.any(jnp.isnan(hist_new), axis=1)
    grow = do_B & (count > 0) & full & (jnp.nanmean(hist_new, axis=1) >= opts.lazy_threshold)
    gap_B = jnp.where(grow, gap_B * opts.lazy_factor, gap_B)
    return hist_new, jnp.where(do_B[:, None], top_new, top), gap_B


def _next_refresh(opts: LowRankOptions, plan: _Plan, total: int, count, do_B, nxt_B, gap_B):
    """[B] the step of each matrix's next refresh: `gap` after this one, or its stagger offset
    after step 0."""
    first_off = jnp.asarray(_offsets(opts, plan, total), jnp.int32)
    after = jnp.where((count == 0) & (first_off > 0), first_off, count + gap_B)
    return jnp.where(do_B, after, nxt_B)


def _channel_ratio(x, r, axis) -> jax.Array:
    """‖x‖/‖r‖ over `axis` (kept), the APOLLO / Fira scaling factor."""
    return jnp.linalg.norm(x, axis=axis, keepdims=True) / (
        jnp.linalg.norm(r, axis=axis, keepdims=True) + 1e-8
    )


def _apollo_direction(opts: LowRankOptions, plan: _Plan, g_BMN, r, nrm, q_new, rnorm):
    """APOLLO: D = α G ∘ ‖N‖/‖R‖ per channel or per tensor, then the limiter. Returns
    (D [B, m, n], residual_norm)."""
    del q_new
    axis = _rank_axis(plan) if opts.apollo_scaling == "channel" else (1, 2)
    d = opts.scale * g_BMN * _channel_ratio(nrm, r, axis)
    if opts.limiter:
        d, rnorm = _limit(d, rnorm.reshape(plan.batch), opts.norm_growth_limit)
    return d, rnorm


def _galore_direction(opts: LowRankOptions, plan: _Plan, g_BMN, r, nrm, q_new, rnorm):
    """GaLore: D = α Q N (or N Qᵀ); Fira adds (G − α Q Qᵀ G) ∘ ‖N‖/‖R‖ per channel, limited.
    Returns (D [B, m, n], residual_norm)."""
    d = opts.scale * _back(plan, nrm, q_new)
    if opts.fira:
        phi = _channel_ratio(nrm, r, _rank_axis(plan))
        resid = (g_BMN - opts.scale * _back(plan, r, q_new)) * phi
        if opts.limiter:
            resid, rnorm = _limit(resid, rnorm.reshape(plan.batch), opts.norm_growth_limit)
        d = d + resid
    return d, rnorm


def _limit(x_BMN: jax.Array, prev_B: jax.Array, gamma: float) -> tuple[jax.Array, jax.Array]:
    """Norm-growth limiter (Fira Alg. 1, APOLLO): if ‖x‖ grew by more than γ since the last
    step, scale it down to γ times the last norm. The first step (prev = 0) only records."""
    cur = jnp.linalg.norm(x_BMN, axis=(1, 2))
    lim = jnp.where(prev_B > 0, jnp.maximum(cur / (prev_B + 1e-8), gamma) / gamma, 1.0)
    return x_BMN / lim[:, None, None], cur / lim


def _lowrank_leaf(
    opts: LowRankOptions,
    plan: _Plan,
    count: jax.Array,
    total: int,
    g: jax.Array,
    s: _LeafState,
    q_random: tuple | None,
) -> tuple[jax.Array, _LeafState]:
    """One projected parameter's step: refresh, Adam on R = project(G), the direction D (see
    the module docstring). Returns (D with the parameter's shape, float32; its new state)."""
    B, bs, low = plan.batch, plan.batch_shape, plan.low_shape
    g3 = g.reshape(B, plan.m, plan.n).astype(jnp.float32)
    mu, nu = s.mu.reshape(B, *low), s.nu.reshape(B, *low)
    nxt, gap, pstep = s.next_refresh.reshape(B), s.gap.reshape(B), s.proj_step.reshape(B)
    do = count == nxt  # [B] which matrices refresh now

    q_new, q_old, proj = _refresh_projector(opts, plan, g3, s.projector, do, q_random)
    pstep = jnp.where(do, count, pstep)
    if opts.moments_on_refresh == "reproject":  # official: keep them as they are
        mu, nu = _reproject_moments(plan, q_new, q_old, mu, nu, do)
    hist, top = s.cos_history, s.top_vector
    if opts.lazy_refresh:
        hist, top, gap = _lazy_gap(opts, plan, count, do, q_new, hist, top, gap)
        hist, top = hist.reshape(*bs, opts.lazy_queue), top.reshape(*bs, plan.k)
    nxt = _next_refresh(opts, plan, total, count, do, nxt, gap)

    # Adam in the projected space
    r = _project(plan, g3, q_new)
    mu = opts.b1 * mu + (1 - opts.b1) * r
    nu = opts.b2 * nu + (1 - opts.b2) * r * r
    nrm = mu / (jnp.sqrt(nu) + opts.eps)

    direction = _galore_direction if opts.apollo_scaling == "none" else _apollo_direction
    d, rnorm = direction(opts, plan, g3, r, nrm, q_new, s.residual_norm)
    return d.reshape(plan.shape), _LeafState(
        mu=mu.reshape(*bs, *low),
        nu=nu.reshape(*bs, *low),
        projector=proj,
        proj_step=pstep.reshape(bs),
        next_refresh=nxt.reshape(bs),
        gap=gap.reshape(bs),
        cos_history=hist,
        top_vector=top,
        residual_norm=rnorm.reshape(bs) if opts.limiter else rnorm,
    )


def _adam_leaf(opts: LowRankOptions, g: jax.Array, s: _LeafState) -> tuple[jax.Array, _LeafState]:
    """A full-rank parameter: Adam's direction M / (√V + ε), bias correction left to the caller."""
    g32 = g.astype(jnp.float32)
    mu = opts.b1 * s.mu + (1 - opts.b1) * g32
    nu = opts.b2 * s.nu + (1 - opts.b2) * g32 * g32
    return mu / (jnp.sqrt(nu) + opts.eps), s._replace(mu=mu, nu=nu)


# ----------------------------------------------------------------------------- transforms


def scale_by_lowrank(
    matrix_dims: Any = None, *, options: LowRankOptions | None = None, **kwargs: Any
) -> optax.GradientTransformation:
    """The low-rank direction D (see the module docstring), times √(1−β₂ᵗ)/(1−β₁ᵗ), unsigned
    and without learning rate or weight decay: chain it with those (see `galore`).

    Args:
      matrix_dims: pytree like the params with `MatrixDims` (project) or None (full-rank Adam)
        leaves, or a callable params -> such a pytree; None projects every 2-D array.
      options: a `LowRankOptions`; None is its defaults (GaLore's).
      **kwargs: `LowRankOptions` fields, replacing those of `options`.
    """
    opts = _options(options, LowRankOptions(), kwargs)

    def init_fn(params):
        plans = _make_plans(params, matrix_dims, opts.rank, opts.side)
        leaves = [_init_leaf(opts, plan) for plan in plans]
        return _stack(jax.tree.structure(params), jnp.zeros((), jnp.int32), leaves)

    def update_fn(updates, state, params=None):
        del params
        plans = _make_plans(updates, matrix_dims, opts.rank, opts.side)
        total = sum(p.batch for p in plans if p.lowrank)
        treedef = jax.tree.structure(updates)
        count = state.count
        t = (count + 1).astype(jnp.float32)
        step_size = jnp.sqrt(1 - opts.b2**t) / (1 - opts.b1**t)  # official: in the step size

        leaves = _unstack(treedef, state)
        q_random = {}
        if opts.projection == "random":
            q_random = _random_projectors(opts, plans, count, leaves)
        new_updates, new_leaves = [], []
        for i, (plan, g, s) in enumerate(zip(plans, jax.tree.leaves(updates), leaves, strict=True)):
            if plan.lowrank:
                with jax.named_scope(f"lowrank/{plan.path}"):
                    d, s = _lowrank_leaf(opts, plan, count, total, g, s, q_random.get(i))
            else:
                d, s = _adam_leaf(opts, g, s)
            new_updates.append((step_size * d).astype(g.dtype))
            new_leaves.append(s)
        new_state = _stack(treedef, optax.safe_increment(count), new_leaves)
        return treedef.unflatten(new_updates), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def _learning_rate_and_decay(
    learning_rate: optax.ScalarOrSchedule, weight_decay: float, mask: Any
) -> optax.GradientTransformation:
    """−lr · u, then decoupled weight decay on the *updated* weight, as galore_torch.AdamW does
    (`p.add_(u, -lr)` then `p.add_(p, -lr·wd)`): total update = −lr·u − lr·wd·(p − lr·u)."""

    def init_fn(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None):
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        masks = (
            jax.tree.map(lambda _: True, updates)
            if mask is None
            else mask(updates)
            if callable(mask)
            else mask
        )

        def one(u, p, decay):
            step = -lr * u
            if weight_decay and decay:
                if p is None:
                    raise ValueError("weight_decay needs params in update()")
                step = step - lr * weight_decay * (p + step)
            return step.astype(u.dtype)

        if params is None:
            params = jax.tree.map(lambda _: None, updates)
            out = jax.tree.map(lambda u, d: one(u, None, d), updates, masks)
        else:
            out = jax.tree.map(one, updates, params, masks)
        return out, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def galore(
    learning_rate: optax.ScalarOrSchedule,
    matrix_dims: Any = None,
    *,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    options: LowRankOptions | None = None,
    **kwargs: Any,
) -> optax.GradientTransformation:
    """GaLore-AdamW (Zhao et al. 2024, Alg. 2; official `galore_torch.GaLoreAdamW`) with the
    `LowRankOptions` defaults (the official code's and the paper's). `kwargs` are
    `LowRankOptions` fields (rank, update_proj_gap, scale, side, fira, lazy_refresh, ...),
    replacing those of `options`. The state is a `LowRankState` (first) and the lr step count."""
    return optax.chain(
        scale_by_lowrank(matrix_dims, options=options, **kwargs),
        _learning_rate_and_decay(learning_rate, weight_decay, weight_decay_mask),
    )


def apollo(
    learning_rate: optax.ScalarOrSchedule,
    matrix_dims: Any = None,
    *,
    scaling: Literal["channel", "tensor"] | None = None,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    options: LowRankOptions | None = None,
    **kwargs: Any,
) -> optax.GradientTransformation:
    """APOLLO (Zhu et al. 2024): random projection, low-rank Adam used only to scale the raw
    gradient per channel (`scaling="tensor"` with rank 1 is APOLLO-Mini). Matches the official
    `apollo_torch.APOLLOAdamW` (tests/train/test_lowrank_parity.py) with one convention change:
    `scale` here is the factor α itself; the official `scale` argument is α² (its code
    multiplies by √scale), so its APOLLO-Mini `scale=128` is `scale=128 ** 0.5` here.

    Defaults are `APOLLO_OPTIONS` (rank 256, α = 1, γ = 1.01), or `options`; `scaling` sets
    `apollo_scaling` and `kwargs` the other `LowRankOptions` fields."""
    if scaling is not None:
        if "apollo_scaling" in kwargs:
            raise TypeError("apollo() takes scaling or apollo_scaling, not both")
        kwargs["apollo_scaling"] = scaling
    return galore(
        learning_rate,
        matrix_dims,
        weight_decay=weight_decay,
        weight_decay_mask=weight_decay_mask,
        options=_options(options, APOLLO_OPTIONS, kwargs),
    )


# ----------------------------------------------------------------------------- sharding


def _leaf_names(plan: _Plan, names: tuple, dims: MatrixDims | None, stored) -> _LeafState:
    """Logical axis names of one parameter's `_LeafState` (see `state_logical_names`);
    `stored` is its state leaf, to tell real arrays from scalar placeholders."""
    if not plan.lowrank:
        out = _LeafState(names, names, *((),) * 7)
    else:
        b, rows = dims
        bn, rn, cn = names[:b], names[b : b + rows], names[b + rows :]
        full, spanned = (cn, rn) if plan.side == "left" else (rn, cn)
        moment = bn + ((None, full[0]) if plan.side == "left" else (full[0], None))
        out = _LeafState(
            mu=moment,
            nu=moment,
            projector=bn + (spanned[0], None),
            proj_step=bn,
            next_refresh=bn,
            gap=bn,
            cos_history=bn + (None,),
            top_vector=bn + (None,),
            residual_norm=bn,
        )
    # Unused bookkeeping (and a random projector) is a scalar placeholder: replicated.
    return _LeafState(*(n if len(x.shape) else () for n, x in zip(out, stored, strict=True)))


def state_logical_names(
    opt_state: Any,
    params: Any,
    param_logical_names: Any,
    matrix_dims: Any = None,
    *,
    rank: int | None = None,
    side: Side | None = None,
    options: LowRankOptions | None = None,
) -> Any:
    """Logical axis names for every leaf of a state that holds `LowRankState`s (from `galore`,
    `apollo` or `scale_by_lowrank` built with the same matrix_dims, rank and side). Only shapes
    are read: pass `jax.eval_shape` results. `rank` and `side` (default "std") are read from
    `options` unless given; one of `rank` and `options` is required.

    Dense moments take their parameter's names. Projected moments keep the batch (layers) names
    and the name of the major axis of their full-size side; the rank axis is unnamed. The
    projector is named by the side it spans. So under FSDP/tensor rules the moments `[L, 5461, r]`
    of an MLP kernel shard like its "mlp" axis, and no layer-sized leaf is replicated.
    Bookkeeping ([B] counters, scalar placeholders) gets `()`: replicated.
    Returns a pytree with the state's structure and tuple leaves, for `mesh.shardings_for`.
    """
    if rank is None and options is None:
        raise TypeError("state_logical_names() needs rank= or options=")
    rank = options.rank if rank is None else rank
    side = (options.side if options is not None else "std") if side is None else side
    plans = _make_plans(params, matrix_dims, rank, side)
    treedef = jax.tree.structure(params)
    names = [tuple(n) for n in treedef.flatten_up_to(param_logical_names)]
    dims = _resolve_dims(matrix_dims, params)

    def for_lowrank(st: LowRankState) -> LowRankState:
        stored = _unstack(treedef, st)
        leaves = [_leaf_names(*a) for a in zip(plans, names, dims, stored, strict=True)]
        return _stack(treedef, (), leaves)

    def walk(node):
        if isinstance(node, LowRankState):
            return for_lowrank(node)
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, (tuple, list)):
            items = [walk(x) for x in node]
            return type(node)(*items) if hasattr(node, "_fields") else type(node)(items)
        return ()

    return walk(opt_state)
