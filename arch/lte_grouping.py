"""Expert grouping for LTE's dense-to-sparse conversion (arXiv 2402.06126, section 3.1).

LTE splits an FFN's F hidden neurons into E = F / S experts of exactly S neurons each (S = 32):
balanced k-means on the L2-normalised gate vector of each neuron (one d_model vector per neuron;
our gate kernel is [D, F], so the vectors are its columns: pass `gate_kernel_DF.T`). The FFN is
then permuted so that expert e is the contiguous block of neurons [e*S, (e+1)*S); the permuted
FFN computes the same function (`permute_ffn`).

    perm_F = expert_permutation(gate_kernel_DF.T, 32)      # one layer
    ffn = permute_ffn(ffn, perm_F)                          # or perm_LF for stacked layers

Method: Lloyd iterations whose assignment step is an exact balanced assignment.
- Init: k-means++ (Arthur & Vassilvitskii 2007), as scikit-learn and `KMeansConstrained` do.
- Assignment: every neuron to one cluster, every cluster exactly S neurons, minimising the
  total squared distance to the centroids: a transportation problem (F sources, E sinks of
  capacity S), solved by the auction algorithm for similar objects with eps-scaling (Bertsekas
  & Castanon 1989): each cluster is S slots with their own price; unassigned neurons bid for the
  cheapest slot of their best cluster. It ends optimal to within F * eps_final of the total cost
  (eps_final is 1e-9 of the cost range; the test checks it against linear_sum_assignment).
  The prices carry over from one Lloyd iteration to the next, so later assignments are cheap.
- Update: centroid = mean of its members (plain Euclidean, as KMeansConstrained does on the
  normalised rows); stop when the assignment no longer changes or after `iters` iterations.
- Output: cluster ids relabelled in order of each cluster's lowest neuron index, so the result
  does not depend on how clusters happened to be numbered.

Why not the official library. The official grouping (robogast/LTE `km_utils.py: ParamSplit`) is
`KMeansConstrained(n_clusters=E, size_min=size_max=S, random_state=0)` from the
`k-means-constrained` package: the same model (balanced k-means, k-means++ init), with each
assignment a min-cost flow over all F * E arcs solved by OR-Tools, and 10 restarts of up to 300
iterations by default. Installing it pulls OR-Tools (about 90 MB installed), pandas, joblib and six,
and OR-Tools pins protobuf < 6.34 where our venv has protobuf 7 (orbax, grain, tensorboardX), so
it would downgrade a core dependency. The dense transportation problem is small enough for
numpy: an F x E benefit matrix (11008 x 344 for a 7B model). A dense linear_sum_assignment
against each centroid repeated S times would be exact too, but is F x F (11008^2, ~1 GB and
cubic time) per Lloyd iteration. We do not match KMeansConstrained's labels bit for bit (other
random draws, one k-means++ start instead of ten); the objective and constraint are the same.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

_EPS_FINAL = 1e-9  # auction accuracy as a fraction of the benefit range
_EPS_START = 0.01  # first auction phase, same units
_EPS_SHRINK = 4.0  # eps-scaling factor between phases


def balanced_kmeans(
    vectors_FD: np.ndarray | jax.Array, n_clusters: int, *, seed: int = 0, iters: int = 25
) -> np.ndarray:
    """Balanced k-means: [F] int cluster ids in [0, n_clusters), each id on exactly
    F / n_clusters rows, locally minimising the within-cluster squared distance.

    vectors_FD: [F, D] float (numpy or jax); not normalised here (see `expert_permutation`).
    Clusters are numbered by their lowest row index (cluster 0 holds row 0). Deterministic for
    a given seed.
    """
    x_FD = _as_matrix(vectors_FD)
    size = _cluster_size(x_FD.shape[0], n_clusters)
    if n_clusters == 1:
        return np.zeros(x_FD.shape[0], np.int64)
    centroids_ED = _kmeans_plus_plus(x_FD, n_clusters, np.random.default_rng(seed))
    labels_F, prices_ES = None, np.zeros((n_clusters, size))
    for _ in range(iters):
        new_F, prices_ES = balanced_assignment(_benefit(x_FD, centroids_ED), size, prices_ES)
        if labels_F is not None and np.array_equal(new_F, labels_F):
            break
        labels_F = new_F
        centroids_ED = _centroids(x_FD, labels_F, n_clusters)
    return _canonical_labels(labels_F)


def expert_permutation(
    vectors_FD: np.ndarray | jax.Array, expert_size: int, *, seed: int = 0
) -> np.ndarray:
    """[F] permutation of the neurons: expert 0's `expert_size` neurons first (in their original
    order), then expert 1's, ... Experts are balanced k-means clusters of the L2-normalised rows
    of vectors_FD [F, D] (for LTE: the gate kernel transposed)."""
    x_FD = _as_matrix(vectors_FD)
    f = x_FD.shape[0]
    if expert_size < 1 or f % expert_size:
        raise ValueError(f"F={f} neurons do not split into experts of {expert_size}")
    x_FD = x_FD / np.maximum(np.linalg.norm(x_FD, axis=1, keepdims=True), 1e-12)
    labels_F = balanced_kmeans(x_FD, f // expert_size, seed=seed)
    return np.argsort(labels_F, kind="stable")


def permute_ffn(
    params: dict,
    perm_F: np.ndarray | jax.Array,
    *,
    in_names: Sequence[str] = ("gate", "up"),
    out_names: Sequence[str] = ("down",),
    axis_offset: int = 0,
) -> dict:
    """The FFN param tree with its hidden axis F permuted: new neuron j is old neuron perm[j].

    params: pure dict {name: {"kernel": ..., "bias"?: ...}} (`nnx.State.to_pure_dict` of an
    FFN). Input projections `in_names` have kernels [..., D, F] and biases [..., F]; output
    projections `out_names` have kernels [..., F, D] (their bias [..., D] is left alone). Other
    entries pass through unchanged.

    The perm's rank says whether layers are stacked: perm [F] permutes unstacked kernels
    ([D, F], [F, D]); perm [L, F] permutes kernels stacked over a leading layers axis
    ([L, D, F], [L, F, D]), layer l by perm[l]. `axis_offset` counts further leading kernel axes
    in front of those that share one permutation (e.g. perm [F] on kernels [L, D, F] with
    axis_offset=1 permutes every layer alike). A kernel whose shape does not fit is a ValueError.
    """
    perm = jnp.asarray(perm_F)
    missing = [n for n in (*in_names, *out_names) if n not in params]
    if missing:
        raise ValueError(f"permute_ffn: no {missing} in the FFN params (keys {sorted(params)})")
    out = dict(params)
    for name in in_names:
        out[name] = {
            k: _permute_leaf(v, perm, k, axis_offset, "in") for k, v in params[name].items()
        }
    for name in out_names:
        out[name] = {
            k: _permute_leaf(v, perm, k, axis_offset, "out") for k, v in params[name].items()
        }
    return out


def balanced_assignment(
    benefit_FE: np.ndarray, size: int, prices_ES: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Rows to columns, each column exactly `size` rows, maximising the total benefit.

    benefit_FE: [F, E] float with F = E * size. prices_ES: [E, size] slot prices to start from
    (zeros when None), e.g. the ones a previous call returned. Returns ([F] int column of each
    row, [E, size] final prices). Optimal to within F * eps_final (see the module docstring).
    """
    benefit_FE = np.asarray(benefit_FE, np.float64)
    span = max(float(np.ptp(benefit_FE)), np.finfo(np.float64).tiny)
    prices_ES = np.zeros((benefit_FE.shape[1], size)) if prices_ES is None else prices_ES.copy()
    eps = _EPS_START * span
    while True:
        slot_F = _auction(benefit_FE, prices_ES, eps)
        if eps <= _EPS_FINAL * span:
            return slot_F // size, prices_ES
        eps = max(eps / _EPS_SHRINK, _EPS_FINAL * span)


def _auction(benefit_FE: np.ndarray, prices_ES: np.ndarray, eps: float) -> np.ndarray:
    """One eps-phase of the Jacobi auction, from all rows unassigned: every unassigned row bids
    for the cheapest slot of its best column, raising that slot's price by its margin over the
    second-best slot plus eps; each column gives its cheapest slots to its highest bids (the
    k-th highest may take the k-th cheapest while it pays more than that slot costs). Updates
    prices_ES in place; returns the [F] flat slot (column * size + k) of each row."""
    f, (e, size) = benefit_FE.shape[0], prices_ES.shape
    slot_F = np.full(f, -1)
    holder_S = np.full(e * size, -1)
    prices_S = prices_ES.reshape(-1)  # a view: updates land in prices_ES
    while True:
        rows_U = np.flatnonzero(slot_F < 0)
        if rows_U.size == 0:
            return slot_F
        col_U, bid_U = _bids(benefit_FE[rows_U], prices_ES, eps)
        rows_U, slots_U, bid_U = _winners(rows_U, col_U, bid_U, prices_ES)
        slot_F[holder_S[slots_U][holder_S[slots_U] >= 0]] = -1  # evicted rows bid again
        holder_S[slots_U], slot_F[rows_U], prices_S[slots_U] = rows_U, slots_U, bid_U


def _bids(benefit_UE: np.ndarray, prices_ES: np.ndarray, eps: float):
    """Each row's best column and its bid: the price that leaves it indifferent between the
    cheapest slot there and its second-best slot (which may be that column's second-cheapest),
    plus eps."""
    cheapest_ES = np.partition(prices_ES, 1, axis=1) if prices_ES.shape[1] > 1 else prices_ES
    p1_E = cheapest_ES[:, 0]
    p2_E = cheapest_ES[:, 1] if prices_ES.shape[1] > 1 else np.full_like(p1_E, np.inf)
    value_UE = benefit_UE - p1_E
    rows = np.arange(value_UE.shape[0])
    col_U = np.argmax(value_UE, axis=1)
    best_U = value_UE[rows, col_U]
    value_UE[rows, col_U] = -np.inf
    second_U = np.maximum(value_UE.max(axis=1), benefit_UE[rows, col_U] - p2_E[col_U])
    return col_U, p1_E[col_U] + (best_U - second_U) + eps


def _winners(rows_U, col_U, bid_U, prices_ES):
    """(rows, flat slots, bids) of the accepted bids: in each column the k-th highest bid takes
    the k-th cheapest slot when it pays more than that slot's price."""
    size = prices_ES.shape[1]
    order = np.lexsort((-bid_U, col_U))
    rows_U, col_U, bid_U = rows_U[order], col_U[order], bid_U[order]
    first = np.searchsorted(col_U, col_U)  # start of each column's run in the sorted bids
    rank_U = np.arange(col_U.size) - first
    ok = rank_U < size
    rows_U, col_U, bid_U, rank_U = rows_U[ok], col_U[ok], bid_U[ok], rank_U[ok]
    cols_C, col_U = np.unique(col_U, return_inverse=True)  # sort only the bid-for columns
    slots_U = np.argsort(prices_ES[cols_C], axis=1)[col_U, rank_U]
    col_U = cols_C[col_U]
    ok = bid_U > prices_ES[col_U, slots_U]
    return rows_U[ok], col_U[ok] * size + slots_U[ok], bid_U[ok]


def _benefit(x_FD: np.ndarray, centroids_ED: np.ndarray) -> np.ndarray:
    """[F, E] -|x - c|^2 up to a per-row constant (2 x.c - |c|^2), float64."""
    dots_FE = (x_FD @ centroids_ED.T).astype(np.float64)
    return 2 * dots_FE - np.sum(np.square(centroids_ED, dtype=np.float64), axis=1)


def _kmeans_plus_plus(x_FD: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """[k, D] initial centroids: rows drawn with probability proportional to the squared
    distance to the nearest centroid drawn so far."""
    sq_F = np.sum(np.square(x_FD), axis=1)
    picks = [int(rng.integers(x_FD.shape[0]))]
    d2_F = np.maximum(sq_F - 2 * (x_FD @ x_FD[picks[0]]) + sq_F[picks[0]], 0)
    for _ in range(k - 1):
        total = d2_F.sum()
        p_F = d2_F / total if total > 0 else None  # all rows on the centroids: any row
        picks.append(int(rng.choice(x_FD.shape[0], p=p_F)))
        d2_new = np.maximum(sq_F - 2 * (x_FD @ x_FD[picks[-1]]) + sq_F[picks[-1]], 0)
        d2_F = np.minimum(d2_F, d2_new)
    return x_FD[picks].copy()


def _centroids(x_FD: np.ndarray, labels_F: np.ndarray, k: int) -> np.ndarray:
    """[k, D] mean of each cluster's rows (balanced: F / k rows each)."""
    members_KSD = x_FD[np.argsort(labels_F, kind="stable")].reshape(k, -1, x_FD.shape[1])
    return members_KSD.mean(axis=1, dtype=np.float64).astype(x_FD.dtype)


def _canonical_labels(labels_F: np.ndarray) -> np.ndarray:
    """Cluster ids renumbered in order of each cluster's lowest row index."""
    _, first_K = np.unique(labels_F, return_index=True)
    new_id_K = np.empty_like(first_K)
    new_id_K[np.argsort(first_K)] = np.arange(first_K.size)
    return new_id_K[labels_F]


def _as_matrix(vectors_FD) -> np.ndarray:
    """float32 numpy [F, D]; ValueError for another rank."""
    x_FD = np.asarray(vectors_FD, np.float32)
    if x_FD.ndim != 2:
        raise ValueError(f"expected vectors [F, D], got shape {x_FD.shape}")
    return x_FD


def _cluster_size(f: int, n_clusters: int) -> int:
    """F / n_clusters; ValueError when that is not a positive integer."""
    if not 1 <= n_clusters <= f or f % n_clusters:
        raise ValueError(f"F={f} rows do not split into {n_clusters} equal clusters")
    return f // n_clusters


def _permute_leaf(x, perm, key: str, axis_offset: int, side: str):
    """x with its F axis reordered by perm: the last axis of an input kernel [..., D, F] or bias
    [..., F], the second last of an output kernel [..., F, D]; an output bias [..., D] as is.
    perm's leading axes match x's after `axis_offset` broadcast ones."""
    if side == "out" and key == "bias":
        return x
    if key not in ("kernel", "bias"):
        raise ValueError(f"permute_ffn: cannot permute {key!r} (only kernel and bias)")
    f_axis, trailing = (-2, 2) if side == "out" else (-1, 2 if key == "kernel" else 1)
    lead = axis_offset + perm.ndim - 1
    x = jnp.asarray(x)
    if x.ndim != lead + trailing or x.shape[axis_offset:lead] != perm.shape[:-1]:
        raise ValueError(
            f"permute_ffn: {key} of shape {x.shape} does not fit perm {perm.shape} "
            f"with axis_offset={axis_offset}"
        )
    if x.shape[f_axis] != perm.shape[-1]:
        raise ValueError(f"permute_ffn: {key} has F={x.shape[f_axis]}, perm {perm.shape[-1]}")
    idx_shape = [1] * x.ndim
    idx_shape[axis_offset:lead] = perm.shape[:-1]
    idx_shape[f_axis] = perm.shape[-1]
    return jnp.take_along_axis(x, perm.reshape(idx_shape), axis=f_axis)
