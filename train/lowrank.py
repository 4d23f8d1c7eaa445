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


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


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
        name, shape = _path_str(path), tuple(p.shape)
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
    (`scipy.linalg.cython_lapack`), process-wide. Returns False where it cannot be found.

    Why: XLA:CPU already runs on every core (and runs a batched SVD's matrices in parallel);
    OpenBLAS then wakes its own pool on top of it, and its workers spin for ~0.1 s after each
    call. On a 2-core host that makes a batched [4, 256, 768] SVD 2.3x slower, sometimes 200x
    (64 x 256: 1.1 s instead of 5 ms under load), and slows the next ~0.1 s of XLA work (the
    train steps after a refresh: +70% on the tiny model's first six). One LAPACK thread per XLA
    thread has none of it."""
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


def scale_by_lowrank(
    matrix_dims: Any = None,
    *,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    side: Side = "std",
    projection: Literal["svd", "random"] = "svd",
    moments_on_refresh: Literal["keep", "reproject"] = "keep",
    stagger: bool = False,
    fira: bool = False,
    apollo_scaling: Literal["none", "channel", "tensor"] = "none",
    norm_growth_limit: float | None = None,
    lazy_refresh: bool = False,
    lazy_threshold: float = 0.4,
    lazy_queue: int = 5,
    lazy_factor: int = 2,
    canonical_signs: bool = True,
    svd_method: Literal["qr", "default", "gram"] = "default",
    cpu_lapack_threads: int | None = 1,
    seed: int = 0,
) -> optax.GradientTransformation:
    """The low-rank direction D (see the module docstring), times √(1−β₂ᵗ)/(1−β₁ᵗ), unsigned
    and without learning rate or weight decay: chain it with those (see `galore`).

    Args:
      matrix_dims: pytree like the params with `MatrixDims` (project) or None (full-rank Adam)
        leaves, or a callable params -> such a pytree; None projects every 2-D array.
      rank: r. A matrix with min(m, n) <= r gets full-rank Adam instead (warned once).
      update_proj_gap: T, steps between refreshes (refresh at step 0, T, 2T, ...).
      scale: α, multiplies the back-projected update (paper: 0.25; APOLLO: 1).
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
      canonical_signs: fix singular-vector signs (see `_canonical_signs`); False uses raw
        `jnp.linalg.svd` output as optax.contrib does.
      svd_method: "qr": `lax.linalg.svd(algorithm=QR)` (LAPACK gesvd); "default":
        `jnp.linalg.svd`'s divide-and-conquer (gesdd), as optax.contrib and torch call it; both
        exact, equal up to rounding. On XLA:CPU with one LAPACK thread (see
        `cpu_lapack_threads`) gesdd is the faster: 0.44 s vs 2.0 s per refresh of the small
        transformer's 28 matrices, 19 vs 25 ms on the tiny one's 14 (2 cores). "gram": top
        eigenvectors of the smaller Gram matrix (GGᵀ or GᵀG, fp32) - a matmul that reduces over
        the sharded axis plus a k x k eigh (0.2 s on the small one), less accurate for small
        singular-value gaps.
      cpu_lapack_threads: when the SVD runs on XLA:CPU (default backend "cpu"), set the
        LAPACK library's own thread count to this, process-wide, the first time the update is
        traced (`limit_cpu_lapack_threads`); None leaves it alone. Not done for random
        projections, which call no LAPACK.
      seed: seeds random projections.
    """
    if not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank={rank} must be a positive integer")
    if update_proj_gap <= 0:
        raise ValueError(f"update_proj_gap={update_proj_gap} must be > 0")
    if fira and apollo_scaling != "none":
        raise ValueError("fira and apollo_scaling are alternatives; choose one")
    uniform = not (stagger or lazy_refresh)
    limiter = norm_growth_limit is not None and (fira or apollo_scaling != "none")
    gap0 = int(update_proj_gap)

    def plans_for(params):
        return _make_plans(params, matrix_dims, rank, side)

    def offsets(plan: _Plan, total: int) -> np.ndarray:
        j = plan.first + np.arange(plan.batch)
        return ((j * gap0) // max(total, 1)) % gap0 if stagger else np.zeros(plan.batch, np.int64)

    # ------------------------------------------------------------------ init

    def init_fn(params):
        plans = plans_for(params)
        treedef = jax.tree.structure(params)
        fields = {f: [] for f in LowRankState._fields[1:]}
        for plan, p in zip(plans, jax.tree.leaves(params), strict=True):
            if not plan.lowrank:
                fields["mu"].append(jnp.zeros(p.shape, jnp.float32))
                fields["nu"].append(jnp.zeros(p.shape, jnp.float32))
                for f in LowRankState._fields[3:]:
                    fields[f].append(
                        _empty(
                            jnp.int32 if f in ("proj_step", "next_refresh", "gap") else jnp.float32
                        )
                    )
                continue
            bs = plan.batch_shape
            fields["mu"].append(jnp.zeros(bs + plan.low_shape, jnp.float32))
            fields["nu"].append(jnp.zeros(bs + plan.low_shape, jnp.float32))
            fields["projector"].append(
                jnp.zeros(bs + (plan.k, plan.rank), plan.dtype)
                if projection == "svd"
                else _empty(plan.dtype)
            )
            fields["proj_step"].append(jnp.zeros(bs, jnp.int32))
            fields["next_refresh"].append(jnp.zeros(bs, jnp.int32))
            fields["gap"].append(jnp.full(bs, gap0, jnp.int32))
            fields["cos_history"].append(
                jnp.full(bs + (lazy_queue,), jnp.nan, jnp.float32) if lazy_refresh else _empty()
            )
            fields["top_vector"].append(
                jnp.zeros(bs + (plan.k,), jnp.float32) if lazy_refresh else _empty()
            )
            fields["residual_norm"].append(jnp.zeros(bs, jnp.float32) if limiter else _empty())
        return LowRankState(
            count=jnp.zeros((), jnp.int32),
            **{f: jax.tree.unflatten(treedef, v) for f, v in fields.items()},
        )

    # ------------------------------------------------------------------ helpers

    def svd_projector(g_mn: jax.Array, plan: _Plan) -> jax.Array:
        """[m, n] -> Q [k, r] in float32 (official: torch.linalg.svd of the fp32 gradient)."""
        g32 = g_mn.astype(jnp.float32)
        if svd_method == "gram":
            gram = g32 @ g32.T if plan.side == "left" else g32.T @ g32  # [k, k]
            _, vecs = jnp.linalg.eigh(gram)  # ascending eigenvalues
            q = vecs[:, ::-1][:, : plan.rank]
        else:
            algorithm = jax.lax.linalg.SvdAlgorithm.QR if svd_method == "qr" else None
            u, _, vh = jax.lax.linalg.svd(g32, full_matrices=False, algorithm=algorithm)
            q = u[:, : plan.rank] if plan.side == "left" else vh[: plan.rank].T
        return _canonical_signs(q) if canonical_signs else q

    def random_projectors(plans, count, flat) -> dict:
        """Every random projector of this step, {plan index: (Q at this step's proj_step, Q at
        the last one or None)} [B, k, r]: one vmapped generation per projector size k for all
        matrices of all parameters, not one per parameter (XLA:CPU runs each threefry as a
        rolled loop; per parameter, that was 5% of the tiny model's step). vmap gives each
        matrix the numbers it gets alone."""
        groups: dict[int, list] = {}
        for i, plan in enumerate(plans):
            if plan.lowrank:
                groups.setdefault(plan.k, []).append(i)
        out = {}
        for k, members in groups.items():
            index, new_step, old_step = [], [], []
            for i in members:
                plan = plans[i]
                pstep = flat["proj_step"][i].reshape(plan.batch)
                do = count == flat["next_refresh"][i].reshape(plan.batch)
                index.append(plan.first + jnp.arange(plan.batch))
                new_step.append(jnp.where(do, count, pstep))
                old_step.append(pstep)
            index, steps = jnp.concatenate(index), jnp.concatenate(new_step)
            reproject = moments_on_refresh == "reproject"
            if reproject:  # both at once: [new; old]
                index, steps = jnp.concatenate([index, index]), jnp.concatenate([steps, *old_step])
            q = jax.vmap(lambda i, s, k=k: random_projection(seed, i, s, k, rank))(index, steps)
            n = q.shape[0] // 2 if reproject else q.shape[0]
            start = 0
            for i in members:
                b = plans[i].batch
                out[i] = (q[start : start + b], q[n + start : n + start + b] if reproject else None)
                start += b
        return out

    def project(g, q, plan):  # g [B, m, n], q [B, k, r] -> [B, *low_shape]
        if plan.side == "left":
            return jnp.einsum("bkr,bkn->brn", q, g)
        return jnp.einsum("bmk,bkr->bmr", g, q)

    def back(x, q, plan):  # [B, *low_shape] -> [B, m, n]
        if plan.side == "left":
            return jnp.einsum("bkr,brn->bkn", q, x)
        return jnp.einsum("bmr,bkr->bmk", x, q)

    def rank_axis(plan):
        return 1 if plan.side == "left" else 2

    # ------------------------------------------------------------------ one projected leaf

    def lowrank_leaf(
        plan, total, count, g, mu, nu, proj, pstep, nxt, gap, hist, top, rnorm, q_random
    ):
        B, bs = plan.batch, plan.batch_shape
        g3 = g.reshape(B, plan.m, plan.n).astype(jnp.float32)
        mu, nu = mu.reshape(B, *plan.low_shape), nu.reshape(B, *plan.low_shape)
        nxt, gap, pstep = nxt.reshape(B), gap.reshape(B), pstep.reshape(B)
        do = count == nxt  # [B] which matrices refresh now

        # --- the projector before and after this step's refresh
        if projection == "random":
            new_pstep = jnp.where(do, count, pstep)
            q_new, q_old = q_random  # see random_projectors
            proj_out = proj
        else:
            q_old = proj.reshape(B, plan.k, plan.rank).astype(jnp.float32)
            if uniform:  # everyone refreshes together: one batched SVD under one cond
                q_new = jax.lax.cond(
                    do[0], lambda: jax.vmap(lambda x: svd_projector(x, plan))(g3), lambda: q_old
                )
            else:  # one matrix at a time, only those due; nothing at all on most steps
                q_new = jax.lax.cond(
                    jnp.any(do),
                    lambda: jax.lax.map(
                        lambda a: jax.lax.cond(
                            a[0], lambda: svd_projector(a[1], plan), lambda: a[2]
                        ),
                        (do, g3, q_old),
                    ),
                    lambda: q_old,
                )
            # Stored, and used, in the parameter dtype (official: cast back after the SVD).
            q_store = q_new.astype(plan.dtype)
            q_new = q_store.astype(jnp.float32)
            proj_out = q_store.reshape(*bs, plan.k, plan.rank)
            new_pstep = jnp.where(do, count, pstep)

        # --- moments into the new basis (optional; official keeps them as they are)
        if moments_on_refresh == "reproject":
            c = jnp.einsum("bkr,bks->brs", q_new, q_old)  # [B, r_new, r_old]
            if plan.side == "left":
                mu_r = jnp.einsum("brs,bsn->brn", c, mu)
                nu_r = jnp.einsum("brs,bsn->brn", c * c, nu)
            else:
                mu_r = jnp.einsum("bms,brs->bmr", mu, c)
                nu_r = jnp.einsum("bms,brs->bmr", nu, c * c)
            sel = do[:, None, None]
            mu, nu = jnp.where(sel, mu_r, mu), jnp.where(sel, nu_r, nu)

        # --- Q-GaLore lazy refresh: grow the gap of matrices whose subspace stopped moving
        if lazy_refresh:
            hist, top = hist.reshape(B, lazy_queue), top.reshape(B, plan.k)
            top_new = q_new[:, :, 0]
            cos = jnp.abs(jnp.sum(top * top_new, -1)) / (
                jnp.linalg.norm(top, axis=-1) * jnp.linalg.norm(top_new, axis=-1) + 1e-30
            )
            pushed = jnp.concatenate([hist[:, 1:], cos[:, None]], axis=1)
            hist_new = jnp.where((do & (count > 0))[:, None], pushed, hist)
            full = ~jnp.any(jnp.isnan(hist_new), axis=1)
            grow = do & (count > 0) & full & (jnp.nanmean(hist_new, axis=1) >= lazy_threshold)
            gap = jnp.where(grow, gap * lazy_factor, gap)
            hist, top = hist_new, jnp.where(do[:, None], top_new, top)
        first_off = jnp.asarray(offsets(plan, total), jnp.int32)
        after = jnp.where((count == 0) & (first_off > 0), first_off, count + gap)
        nxt = jnp.where(do, after, nxt)

        # --- Adam in the projected space
        r = project(g3, q_new, plan)
        mu = b1 * mu + (1 - b1) * r
        nu = b2 * nu + (1 - b2) * r * r
        nrm = mu / (jnp.sqrt(nu) + eps)

        ax = rank_axis(plan)
        if apollo_scaling != "none":
            if apollo_scaling == "channel":
                s = jnp.linalg.norm(nrm, axis=ax, keepdims=True) / (
                    jnp.linalg.norm(r, axis=ax, keepdims=True) + 1e-8
                )
            else:
                s = jnp.linalg.norm(nrm, axis=(1, 2), keepdims=True) / (
                    jnp.linalg.norm(r, axis=(1, 2), keepdims=True) + 1e-8
                )
            d = scale * g3 * s
            if limiter:
                d, rnorm = _limit(d, rnorm.reshape(B), norm_growth_limit)
        else:
            d = scale * back(nrm, q_new, plan)
            if fira:
                phi = jnp.linalg.norm(nrm, axis=ax, keepdims=True) / (
                    jnp.linalg.norm(r, axis=ax, keepdims=True) + 1e-8
                )
                resid = (g3 - scale * back(r, q_new, plan)) * phi
                if limiter:
                    resid, rnorm = _limit(resid, rnorm.reshape(B), norm_growth_limit)
                d = d + resid

        leaves = dict(
            d=d.reshape(plan.shape),
            mu=mu.reshape(*bs, *plan.low_shape),
            nu=nu.reshape(*bs, *plan.low_shape),
            projector=proj_out,
            proj_step=new_pstep.reshape(bs),
            next_refresh=nxt.reshape(bs),
            gap=gap.reshape(bs),
            cos_history=hist.reshape(*bs, lazy_queue) if lazy_refresh else hist,
            top_vector=top.reshape(*bs, plan.k) if lazy_refresh else top,
            residual_norm=rnorm.reshape(bs) if limiter else rnorm,
        )
        return leaves

    # ------------------------------------------------------------------ update

    def update_fn(updates, state, params=None):
        del params
        if projection == "svd" and cpu_lapack_threads and jax.default_backend() == "cpu":
            limit_cpu_lapack_threads(cpu_lapack_threads)
        plans = plans_for(updates)
        total = sum(p.batch for p in plans if p.lowrank)
        treedef = jax.tree.structure(updates)
        count = state.count
        t = (count + 1).astype(jnp.float32)
        step_size = jnp.sqrt(1 - b2**t) / (1 - b1**t)  # official: folded into the step size

        flat = {f: treedef.flatten_up_to(getattr(state, f)) for f in LowRankState._fields[1:]}
        q_random = random_projectors(plans, count, flat) if projection == "random" else {}
        out = {f: [] for f in ("d",) + LowRankState._fields[1:]}
        for i, (plan, g) in enumerate(zip(plans, jax.tree.leaves(updates), strict=True)):
            leaf = {f: flat[f][i] for f in flat}
            if plan.lowrank:
                with jax.named_scope(f"lowrank/{plan.path}"):
                    res = lowrank_leaf(
                        plan,
                        total,
                        count,
                        g,
                        **{
                            "mu": leaf["mu"],
                            "nu": leaf["nu"],
                            "proj": leaf["projector"],
                            "pstep": leaf["proj_step"],
                            "nxt": leaf["next_refresh"],
                            "gap": leaf["gap"],
                            "hist": leaf["cos_history"],
                            "top": leaf["top_vector"],
                            "rnorm": leaf["residual_norm"],
                            "q_random": q_random.get(i),
                        },
                    )
            else:
                g32 = g.astype(jnp.float32)
                mu = b1 * leaf["mu"] + (1 - b1) * g32
                nu = b2 * leaf["nu"] + (1 - b2) * g32 * g32
                res = {**leaf, "d": mu / (jnp.sqrt(nu) + eps), "mu": mu, "nu": nu}
            for f in out:
                out[f].append(res[f])
        directions = zip(out.pop("d"), jax.tree.leaves(updates), strict=True)
        new_updates = jax.tree.unflatten(
            treedef, [(step_size * d).astype(g.dtype) for d, g in directions]
        )
        new_state = LowRankState(
            count=optax.safe_increment(count),
            **{f: jax.tree.unflatten(treedef, v) for f, v in out.items()},
        )
        return new_updates, new_state

    return optax.GradientTransformation(init_fn, update_fn)


def _limit(x_BMN: jax.Array, prev_B: jax.Array, gamma: float) -> tuple[jax.Array, jax.Array]:
    """Norm-growth limiter (Fira Alg. 1, APOLLO): if ‖x‖ grew by more than γ since the last
    step, scale it down to γ times the last norm. The first step (prev = 0) only records."""
    cur = jnp.linalg.norm(x_BMN, axis=(1, 2))
    lim = jnp.where(prev_B > 0, jnp.maximum(cur / (prev_B + 1e-8), gamma) / gamma, 1.0)
    return x_BMN / lim[:, None, None], cur / lim


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
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    **options: Any,
) -> optax.GradientTransformation:
    """GaLore-AdamW (Zhao et al. 2024, Alg. 2; official `galore_torch.GaLoreAdamW`): defaults
    are the official code's (eps 1e-6, betas (0.9, 0.999)) and the paper's (α = 0.25, T = 200).
    `options` go to `scale_by_lowrank` (side, projection, moments_on_refresh, stagger, fira,
    lazy_refresh, ...). The state is a `LowRankState` (first) and the lr step count."""
    return optax.chain(
        scale_by_lowrank(
            matrix_dims,
            rank=rank,
            update_proj_gap=update_proj_gap,
            scale=scale,
            b1=b1,
            b2=b2,
            eps=eps,
            **options,
        ),
        _learning_rate_and_decay(learning_rate, weight_decay, weight_decay_mask),
    )


def apollo(
    learning_rate: optax.ScalarOrSchedule,
    matrix_dims: Any = None,
    *,
    rank: int = 256,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    scaling: Literal["channel", "tensor"] = "channel",
    norm_growth_limit: float | None = 1.01,
    seed: int = 0,
    **kwargs: Any,
) -> optax.GradientTransformation:
    """APOLLO (Zhu et al. 2024): random projection, low-rank Adam used only to scale the raw
    gradient per channel (`scaling="tensor"` with rank 1 is APOLLO-Mini). Matches the official
    `apollo_torch.APOLLOAdamW` (tests/train/test_lowrank_parity.py) with one convention change:
    `scale` here is the factor α itself; the official `scale` argument is α² (its code
    multiplies by √scale), so its APOLLO-Mini `scale=128` is `scale=128 ** 0.5` here."""
    return galore(
        learning_rate,
        matrix_dims,
        rank=rank,
        update_proj_gap=update_proj_gap,
        scale=scale,
        projection="random",
        apollo_scaling=scaling,
        norm_growth_limit=norm_growth_limit,
        seed=seed,
        **kwargs,
    )


# ----------------------------------------------------------------------------- sharding


def state_logical_names(
    opt_state: Any,
    params: Any,
    param_logical_names: Any,
    matrix_dims: Any = None,
    *,
    rank: int,
    side: Side = "std",
) -> Any:
    """Logical axis names for every leaf of a state that holds `LowRankState`s (from `galore`,
    `apollo` or `scale_by_lowrank` built with the same matrix_dims, rank and side). Only shapes
    are read: pass `jax.eval_shape` results.

    Dense moments take their parameter's names. Projected moments keep the batch (layers) names
    and the name of the major axis of their full-size side; the rank axis is unnamed. The
    projector is named by the side it spans. So under FSDP/tensor rules the moments `[L, 5461, r]`
    of an MLP kernel shard like its "mlp" axis, and no layer-sized leaf is replicated.
    Bookkeeping ([B] counters, scalar placeholders) gets `()`: replicated.
    Returns a pytree with the state's structure and tuple leaves, for `mesh.shardings_for`.
    """
    plans = _make_plans(params, matrix_dims, rank, side)
    treedef = jax.tree.structure(params)
    names = [tuple(n) for n in treedef.flatten_up_to(param_logical_names)]
    dims = _resolve_dims(matrix_dims, params)

    def for_lowrank(st: LowRankState) -> LowRankState:
        out = {f: [] for f in LowRankState._fields[1:]}
        for plan, nm, dm in zip(plans, names, dims, strict=True):
            if not plan.lowrank:
                for f in out:
                    out[f].append(nm if f in ("mu", "nu") else ())
                continue
            b, rows = dm
            bn, rn, cn = nm[:b], nm[b : b + rows], nm[b + rows :]
            full, spanned = (cn, rn) if plan.side == "left" else (rn, cn)
            moment = bn + ((None, full[0]) if plan.side == "left" else (full[0], None))
            proj = bn + (spanned[0], None) if projection_stored(st, treedef, plan) else ()
            per_field = {
                "mu": moment,
                "nu": moment,
                "projector": proj,
                "proj_step": bn,
                "next_refresh": bn,
                "gap": bn,
                "cos_history": bn + (None,),
                "top_vector": bn + (None,),
                "residual_norm": bn,
            }
            for f in out:
                out[f].append(per_field[f])
        fixed = {}
        for f, v in out.items():  # unused bookkeeping is a scalar placeholder
            leaves = treedef.flatten_up_to(getattr(st, f))
            fixed[f] = jax.tree.unflatten(
                treedef, [n if len(x.shape) else () for n, x in zip(v, leaves, strict=True)]
            )
        return LowRankState(count=(), **fixed)

    def projection_stored(st, td, plan) -> bool:
        idx = plans.index(plan)
        return len(td.flatten_up_to(st.projector)[idx].shape) > 0

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
