"""Expert-sparse FFN for inference (LTE, arXiv 2402.06126): only the active experts' weights run.

An FFN's F hidden neurons form E = F / S contiguous experts of S neurons (S = `expert_size`).
Each token n activates its own set of experts (`active_NE`, bool). The op is

    h_NF = act(x_ND @ w_in_KFD^T)        swiglu: silu(x @ w_in[0]^T) * (x @ w_in[1]^T) (K = 2)
                                         gelu:   gelu(x @ w_in[0]^T), exact erf form (K = 1)
    y_ND = (h_NF * repeat(active_NE, S)) @ w_out_FD

Every matrix is neuron-major: neuron f's weights are row f (`w_in` [K, F, D] is torch's
`nn.Linear` layout, the "column-major W_up" LTE's kernel reads), so expert e is the contiguous
rows [e S, (e + 1) S) of each matrix and a path reads its weights in S x D blocks. With
`w_in` as [K, D, F] an expert is S columns, D strided pieces of S floats; on this CPU that
made the decode path 1.6x slower. A model stores [D, F] kernels, so it makes the neuron-major
copy once per generation (`arch.lte.LTE.prepare_inference`), not once per token.

`sparse_ffn_reference` computes exactly this, densely (all F neurons, then the mask). The other
paths compute the same sum over the active (token, expert) pairs only, in float32, and return
x's dtype:

- "gather" (jnp; the CPU path). With at most `UNION_TOKENS` tokens (decode), a `fori_loop`
  over the union of the tokens' experts, `UNION_CHUNK` experts per iteration: it gathers their
  weight blocks, runs every token through them and masks each token's unselected experts (the
  work of a token's own experts when N = 1; fewer, wider iterations than one per expert).
  With more tokens (prefill) the (token, expert) pairs are grouped by expert (LTE's
  per-token weight gather would read the weights once per token in prefill): each expert's
  active tokens, in token order, are cut into blocks of R rows (R = `block_rows(N)`, 256 in
  prefill); a block's last rows are padding, masked. A `fori_loop` whose trip count is the
  number of non-empty blocks (data dependent) gathers a block's x rows, slices the expert's S
  rows of every matrix, and scatter-adds the block's output. The
  index arrays are sized for the worst case (every expert active), so the path is exact for
  every mask and needs no bound on active experts: `max_active` does not apply to it.
  `jax.lax.ragged_dot` would be the natural grouped matmul, but on XLA:CPU it runs every group
  densely (measured: ~300x the dense matmul at E = 88). Gradients (`jax.custom_vjp`, either
  forward): a loop over the expert-grouped blocks takes the VJP of one block's math and
  scatter-adds it.
- "pallas" / "interpret": two Pallas kernels, the structure of Deja Vu's `gather_gemv` and
  `gather_transposed_gemv` and of LTE's kernel (load only the selected experts' rows of every
  matrix). Tokens go in groups of G = 16 (the smallest Triton dot); a group shares the union
  of its tokens' experts, listed in an index table that each program reads from memory (as
  `sparse_attention` reads its block tables). Kernel 1, grid (group, slot): h of the slot's
  expert for the group's tokens, zeroed for tokens that did not select it. Kernel 2, grid
  (group, column tile of D): sum over the group's slots of h @ w_out[expert rows]; a
  `fori_loop` bounded by the group's expert count. The kernels are forward-only (inference).
  `max_active` (default E) is the number of slots per group, a static grid size; a group whose
  union is larger would be wrong in the kernel, so the op then runs the gather path instead
  (`lax.cond` on the data): always exact, and `max_active` is only a speed setting.

For decode (a few tokens) a group's union is about the tokens' own sets; in prefill with
independent per-token sets the union of 16 tokens is close to all experts, so the GPU kernel
saves little there: the expert-grouped blocks of the gather path are the prefill design, not
yet a Pallas kernel.

`impl`: "auto" (the Pallas kernel on GPU, "gather" elsewhere), "gather", "pallas" (GPU),
"interpret" (the GPU kernel in the Pallas interpreter), "reference". The names other than
"gather" follow `kernels.dispatch`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from menagerie.kernels.dispatch import KernelUnsupportedError, resolve_impl

ACTIVATIONS = {"swiglu": 2, "gelu": 1}  # activation -> K, the number of input matrices
FFN_IMPLS = ("auto", "gather", "pallas", "interpret", "reference")
PREFILL_BLOCK_ROWS = 256  # rows per (expert, block) matmul; 128 and 512 measured slower on CPU
UNION_TOKENS = 16  # at most this many tokens: the decode path (a loop over their experts' union)
UNION_CHUNK = 4  # experts per iteration of the decode path (measured on CPU: 1, 2, 4, 8)
GROUP = 16  # tokens per Pallas program: the smallest Triton dot
OUT_TILE = 128  # columns of y per program of the down-projection kernel


def _activate(pre_K, activation: str):
    """h from the K input projections (float32)."""
    if activation == "swiglu":
        return jax.nn.silu(pre_K[0]) * pre_K[1]
    return jax.nn.gelu(pre_K[0], approximate=False)


def check_args(x_ND, w_in_KFD, w_out_FD, active_NE, expert_size: int, activation: str) -> int:
    """Validates the contract; returns E, the number of experts. One-line ValueErrors."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not one of {tuple(ACTIVATIONS)}")
    k = ACTIVATIONS[activation]
    if x_ND.ndim != 2 or w_in_KFD.ndim != 3 or w_out_FD.ndim != 2 or active_NE.ndim != 2:
        raise ValueError(
            f"want x [N, D], w_in [K, F, D], w_out [F, D], active [N, E]; got {x_ND.shape}, "
            f"{w_in_KFD.shape}, {w_out_FD.shape}, {active_NE.shape}"
        )
    _, f, d = w_in_KFD.shape
    if w_in_KFD.shape[0] != k:
        raise ValueError(
            f"activation={activation!r} takes K={k} input matrices; w_in has K={w_in_KFD.shape[0]}"
        )
    if x_ND.shape[1] != d or w_out_FD.shape != (f, d):
        raise ValueError(
            f"x {x_ND.shape}, w_in {w_in_KFD.shape} (neuron-major [K, F, D]), w_out "
            f"{w_out_FD.shape} differ"
        )
    if expert_size < 1 or f % expert_size:
        raise ValueError(f"F={f} is not a multiple of expert_size={expert_size}")
    e = f // expert_size
    if active_NE.shape != (x_ND.shape[0], e):
        raise ValueError(f"active must be [N, E] = [{x_ND.shape[0]}, {e}]; got {active_NE.shape}")
    return e


def sparse_ffn_reference(x_ND, w_in_KFD, w_out_FD, active_NE, *, expert_size, activation="swiglu"):
    """The masked dense FFN (float32, HIGHEST precision): what the op computes. Same contract as
    `sparse_ffn`."""
    check_args(x_ND, w_in_KFD, w_out_FD, active_NE, expert_size, activation)
    hi = lax.Precision.HIGHEST
    x = x_ND.astype(jnp.float32)
    pre_KNF = jnp.einsum("nd,kfd->knf", x, w_in_KFD.astype(jnp.float32), precision=hi)
    mask_NF = jnp.repeat(active_NE.astype(jnp.float32), expert_size, axis=1)
    h_NF = _activate(pre_KNF, activation) * mask_NF
    return jnp.dot(h_NF, w_out_FD.astype(jnp.float32), precision=hi).astype(x_ND.dtype)


# ----------------------------------------------------------------------------- gather path


def block_rows(n: int) -> int:
    """Rows per block: the next power of two >= N, at most PREFILL_BLOCK_ROWS."""
    return min(PREFILL_BLOCK_ROWS, 1 << max(0, n - 1).bit_length())


class _Plan(NamedTuple):
    """Every expert's active tokens cut into blocks of R rows; blocks ordered by expert."""

    order_EP: jax.Array  # int32 [E, P]: per expert, its active tokens first (P = N rounded to R)
    count_E: jax.Array  # int32 [E]: active tokens per expert
    expert_B: jax.Array  # int32 [B]: block b's expert (B = E * P / R, the worst case)
    chunk_B: jax.Array  # int32 [B]: block b covers order_EP[expert, chunk * R : (chunk + 1) * R]
    n_blocks: jax.Array  # int32 []: blocks in use; the loops run this many


def _plan(active_NE, rows: int) -> _Plan:
    n, e = active_NE.shape
    per_expert = -(-n // rows)
    order_EN = jnp.argsort(~active_NE.T, axis=1, stable=True).astype(jnp.int32)
    order_EP = jnp.pad(order_EN, ((0, 0), (0, per_expert * rows - n)))
    count_E = active_NE.sum(0, dtype=jnp.int32)
    blocks_E = -(-count_E // rows)
    ends_E = jnp.cumsum(blocks_E)
    b = jnp.arange(e * per_expert, dtype=jnp.int32)
    expert_B = jnp.minimum(jnp.searchsorted(ends_E, b, side="right"), e - 1).astype(jnp.int32)
    chunk_B = b - (ends_E - blocks_E)[expert_B]
    return _Plan(order_EP, count_E, expert_B, chunk_B, ends_E[-1])


@dataclasses.dataclass(frozen=True)
class _Static:
    expert_size: int
    activation: str
    rows: int


def _block(st: _Static, plan: _Plan, b):
    """(expert, token rows [R], valid [R]) of block b; invalid rows are padding."""
    e, j = plan.expert_B[b], plan.chunk_B[b]
    rows_R = lax.dynamic_slice_in_dim(plan.order_EP[e], j * st.rows, st.rows)
    valid_R = j * st.rows + jnp.arange(st.rows) < plan.count_E[e]
    return e, rows_R, valid_R


def _expert_weights(st: _Static, w_in_KFD, w_out_FD, e):
    """Expert e's rows of every matrix: (w_in [K, S, D], w_out [S, D])."""
    start = e * st.expert_size
    w_in_KSD = lax.dynamic_slice_in_dim(w_in_KFD, start, st.expert_size, axis=1)
    return w_in_KSD, lax.dynamic_slice_in_dim(w_out_FD, start, st.expert_size, axis=0)


def _up(x_RD, w_SD):
    """x @ w^T in float32: one neuron-major input matrix's S neurons for R rows."""
    return lax.dot_general(x_RD, w_SD, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _expert_ffn(st: _Static, valid_R, x_RD, w_in_KSD, w_out_SD):
    """One expert on a block of rows (float32 [R, D]); padding rows give 0. Its K input
    matrices run as one [R, D] x [D, K S] matmul (measured 10% faster than K of them)."""
    (k, s, d), r = w_in_KSD.shape, x_RD.shape[0]
    pre_RKS = _up(x_RD, w_in_KSD.reshape(k * s, d)).reshape(r, k, s)
    pre_KRS = [pre_RKS[:, i] for i in range(k)]
    h_RS = jnp.where(valid_R[:, None], _activate(pre_KRS, st.activation), 0.0)
    return jnp.dot(h_RS.astype(w_out_SD.dtype), w_out_SD, preferred_element_type=jnp.float32)


def _blocks_forward(st: _Static, x_ND, w_in_KFD, w_out_FD, active_NE):
    """The prefill forward: a loop over the expert-grouped row blocks (float32 [N, D])."""
    plan = _plan(active_NE, st.rows)

    def body(b, y_ND):
        e, rows_R, valid_R = _block(st, plan, b)
        w_in_KSD, w_out_SD = _expert_weights(st, w_in_KFD, w_out_FD, e)
        return y_ND.at[rows_R].add(_expert_ffn(st, valid_R, x_ND[rows_R], w_in_KSD, w_out_SD))

    return lax.fori_loop(0, plan.n_blocks, body, jnp.zeros(x_ND.shape, jnp.float32))


def _union_forward(st: _Static, x_ND, w_in_KFD, w_out_FD, active_NE):
    """The decode forward: every token through the union of the tokens' experts, UNION_CHUNK
    experts per iteration, each token's unselected experts masked (float32 [N, D])."""
    (n, d), e, s, c = x_ND.shape, active_NE.shape[1], st.expert_size, UNION_CHUNK
    union_E = active_NE.any(axis=0)
    count = union_E.sum(dtype=jnp.int32)
    order_U = jnp.pad(jnp.argsort(~union_E, stable=True).astype(jnp.int32), (0, c))
    w_in_KESD = w_in_KFD.reshape(w_in_KFD.shape[0], e, s, d)
    w_out_ESD = w_out_FD.reshape(e, s, d)

    def body(i, y_ND):
        ids_C = lax.dynamic_slice_in_dim(order_U, i * c, c)
        keep_NC = active_NE[:, ids_C] & (i * c + jnp.arange(c) < count)  # the pad repeats e 0
        w_KCSD = jnp.take(w_in_KESD, ids_C, axis=1)
        pre_KNCS = jnp.einsum("nd,kcsd->kncs", x_ND, w_KCSD, preferred_element_type=jnp.float32)
        h_NCS = jnp.where(keep_NC[..., None], _activate(pre_KNCS, st.activation), 0.0)
        w_CSD = jnp.take(w_out_ESD, ids_C, axis=0)
        h_NCS = h_NCS.astype(w_CSD.dtype)
        return y_ND + jnp.einsum("ncs,csd->nd", h_NCS, w_CSD, preferred_element_type=jnp.float32)

    return lax.fori_loop(0, -(-count // c), body, jnp.zeros((n, d), jnp.float32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gather_ffn(st: _Static, x_ND, w_in_KFD, w_out_FD, active_NE):
    forward = _union_forward if x_ND.shape[0] <= UNION_TOKENS else _blocks_forward
    return forward(st, x_ND, w_in_KFD, w_out_FD, active_NE).astype(x_ND.dtype)


def _gather_ffn_fwd(st, x_ND, w_in_KFD, w_out_FD, active_NE):
    y_ND = _gather_ffn(st, x_ND, w_in_KFD, w_out_FD, active_NE)
    return y_ND, (x_ND, w_in_KFD, w_out_FD, active_NE)


def _add_slice(acc, update, e, st: _Static, axis: int):
    start = e * st.expert_size
    old = lax.dynamic_slice_in_dim(acc, start, st.expert_size, axis=axis)
    return lax.dynamic_update_slice_in_dim(acc, old + update, start, axis=axis)


def _gather_ffn_bwd(st, res, dy_ND):
    """Per expert-grouped block: the VJP of `_expert_ffn` on its own slices, scatter-added
    (float32), whichever forward ran."""
    x_ND, w_in_KFD, w_out_FD, active_NE = res
    dy_ND, plan = dy_ND.astype(jnp.float32), _plan(active_NE, st.rows)

    def body(b, grads):
        dx_ND, dw_in_KFD, dw_out_FD = grads
        e, rows_R, valid_R = _block(st, plan, b)
        w_in_KSD, w_out_SD = _expert_weights(st, w_in_KFD, w_out_FD, e)
        block = functools.partial(_expert_ffn, st, valid_R)
        _, vjp = jax.vjp(block, x_ND[rows_R], w_in_KSD, w_out_SD)
        dx_RD, dw_in_KSD, dw_out_SD = vjp(dy_ND[rows_R])
        dx_ND = dx_ND.at[rows_R].add(dx_RD.astype(jnp.float32))
        dw_in_KFD = _add_slice(dw_in_KFD, dw_in_KSD.astype(jnp.float32), e, st, axis=1)
        dw_out_FD = _add_slice(dw_out_FD, dw_out_SD.astype(jnp.float32), e, st, axis=0)
        return dx_ND, dw_in_KFD, dw_out_FD

    zeros = tuple(jnp.zeros(a.shape, jnp.float32) for a in (x_ND, w_in_KFD, w_out_FD))
    grads = lax.fori_loop(0, plan.n_blocks, body, zeros)
    dx, dw_in, dw_out = (g.astype(a.dtype) for g, a in zip(grads, res[:3], strict=True))
    return dx, dw_in, dw_out, None


_gather_ffn.defvjp(_gather_ffn_fwd, _gather_ffn_bwd)


def sparse_ffn_gather(x_ND, w_in_KFD, w_out_FD, active_NE, *, expert_size, activation="swiglu"):
    """The jnp path: the union loop (decode) or expert-grouped row blocks (prefill), module
    docstring. Exact for every mask."""
    check_args(x_ND, w_in_KFD, w_out_FD, active_NE, expert_size, activation)
    st = _Static(expert_size, activation, block_rows(x_ND.shape[0]))
    return _gather_ffn(st, x_ND, w_in_KFD, w_out_FD, active_NE.astype(bool))


# ----------------------------------------------------------------------------- Pallas kernels


@dataclasses.dataclass(frozen=True)
class _KernelStatic:
    expert_size: int
    activation: str
    slots: int  # M: expert slots per token group (max_active)
    out_tile: int
    interpret: bool


def _kdot(a, b):
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jnp.dot(a, b, precision=prec, preferred_element_type=jnp.float32)


def _up_kernel(count_ref, expert_ref, x_ref, keep_ref, w_in_ref, h_ref, *, st: _KernelStatic):
    """Program (group g, slot t): h [G, S] of the slot's expert, 0 for tokens without it."""
    g, t = pl.program_id(0), pl.program_id(1)
    used = t < count_ref[g]

    @pl.when(used)
    def _():
        s = st.expert_size
        rows = pl.ds(pl.multiple_of(expert_ref[g, t] * s, s), s)
        x = x_ref[...]
        pre_K = [_kdot(x, w_in_ref[k, rows, :].T) for k in range(ACTIVATIONS[st.activation])]
        h = _activate(pre_K, st.activation) * keep_ref[...][:, None]
        h_ref[...] = h.astype(h_ref.dtype)

    @pl.when(jnp.logical_not(used))
    def _():
        h_ref[...] = jnp.zeros(h_ref.shape, h_ref.dtype)


def _down_kernel(count_ref, expert_ref, h_ref, w_out_ref, y_ref, *, st: _KernelStatic):
    """Program (group g, column tile j): y [G, tile] = sum over used slots of h @ w_out rows."""
    g, j = pl.program_id(0), pl.program_id(1)
    s, tile = st.expert_size, st.out_tile
    cols = pl.ds(pl.multiple_of(j * tile, tile), tile)

    def body(t, acc):
        rows = pl.ds(pl.multiple_of(expert_ref[g, t] * s, s), s)
        return acc + _kdot(h_ref[t], w_out_ref[rows, cols])

    acc = lax.fori_loop(0, count_ref[g], body, jnp.zeros(y_ref.shape, jnp.float32))
    y_ref[...] = acc.astype(y_ref.dtype)


def _group_tables(active_NE, slots: int):
    """Per group of GROUP tokens: count [G'], expert [G', M] (the union, ascending, padded),
    keep [G', M, GROUP] (float32: did the token select the slot's expert), overflow []."""
    n, e = active_NE.shape
    groups = -(-n // GROUP)
    act_GRE = jnp.pad(active_NE, ((0, groups * GROUP - n), (0, 0))).reshape(groups, GROUP, e)
    union_GE = act_GRE.any(axis=1)
    count_G = union_GE.sum(1, dtype=jnp.int32)
    expert_GM = jnp.argsort(~union_GE, axis=1, stable=True).astype(jnp.int32)[:, :slots]
    keep_GRM = jnp.take_along_axis(act_GRE, expert_GM[:, None, :], axis=2)
    keep_GMR = jnp.swapaxes(keep_GRM, 1, 2).astype(jnp.float32)
    return count_G, expert_GM, keep_GMR, jnp.any(count_G > slots)


def _pallas_ffn(st: _KernelStatic, x_ND, w_in_KFD, w_out_FD, tables):
    count_G, expert_GM, keep_GMR, _ = tables
    n, d = x_ND.shape
    groups, m, s = expert_GM.shape[0], st.slots, st.expert_size
    x_PD = jnp.pad(x_ND, ((0, groups * GROUP - n), (0, 0)))
    h_GMRS = pl.pallas_call(
        functools.partial(_up_kernel, st=st),
        grid=(groups, m),
        in_specs=[
            pl.BlockSpec(count_G.shape, lambda g, t: (0,)),
            pl.BlockSpec(expert_GM.shape, lambda g, t: (0, 0)),
            pl.BlockSpec((GROUP, d), lambda g, t: (g, 0)),
            pl.BlockSpec((None, None, GROUP), lambda g, t: (g, t, 0)),
            pl.BlockSpec(w_in_KFD.shape, lambda g, t: (0, 0, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, GROUP, s), lambda g, t: (g, t, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((groups, m, GROUP, s), x_ND.dtype),
        interpret=st.interpret,
        name="sparse_ffn_up",
    )(count_G, expert_GM, x_PD, keep_GMR, w_in_KFD)
    y_PD = pl.pallas_call(
        functools.partial(_down_kernel, st=st),
        grid=(groups, d // st.out_tile),
        in_specs=[
            pl.BlockSpec(count_G.shape, lambda g, j: (0,)),
            pl.BlockSpec(expert_GM.shape, lambda g, j: (0, 0)),
            pl.BlockSpec((None, m, GROUP, s), lambda g, j: (g, 0, 0, 0)),
            pl.BlockSpec(w_out_FD.shape, lambda g, j: (0, 0)),
        ],
        out_specs=pl.BlockSpec((GROUP, st.out_tile), lambda g, j: (g, j)),
        out_shape=jax.ShapeDtypeStruct((groups * GROUP, d), x_ND.dtype),
        interpret=st.interpret,
        name="sparse_ffn_down",
    )(count_G, expert_GM, h_GMRS, w_out_FD)
    return y_PD[:n]


def sparse_ffn_pallas(
    x_ND, w_in_KFD, w_out_FD, active_NE, *, expert_size, activation="swiglu", interpret=False,
    max_active=None,
):  # fmt: skip
    """The Pallas kernels (module docstring). A group with more than `max_active` experts in its
    union sends the whole call to the gather path (exact either way)."""
    e = check_args(x_ND, w_in_KFD, w_out_FD, active_NE, expert_size, activation)
    slots = e if max_active is None else max_active
    d = x_ND.shape[1]
    st = _KernelStatic(expert_size, activation, slots, OUT_TILE if d % OUT_TILE == 0 else d,
                       interpret)  # fmt: skip
    tables = _group_tables(active_NE.astype(bool), slots)
    kernel = functools.partial(_pallas_ffn, st, tables=tables)
    if slots >= e:
        return kernel(x_ND, w_in_KFD, w_out_FD)
    gather = functools.partial(
        sparse_ffn_gather, active_NE=active_NE, expert_size=expert_size, activation=activation
    )
    return lax.cond(tables[3], gather, kernel, x_ND, w_in_KFD, w_out_FD)


# ----------------------------------------------------------------------------- dispatcher


def sparse_ffn(
    x_ND, w_in_KFD, w_out_FD, active_NE, *, expert_size: int, activation: str = "swiglu",
    impl: str = "auto", max_active: int | None = None,
):  # fmt: skip
    """y = (act(x @ w_in) * repeat(active, expert_size)) @ w_out, computing active experts only.

    Args:
      x_ND: [N, D] tokens (f32 or bf16).
      w_in_KFD: [K, F, D], neuron-major (torch `nn.Linear` layout); K = 2 for "swiglu" (0 =
        gate, 1 = up), K = 1 for "gelu" (exact erf gelu, `jax.nn.gelu(approximate=False)`, in
        every impl).
      w_out_FD: [F, D], the down projection.
      active_NE: bool [N, E], E = F / expert_size: expert e is neurons [e S, (e + 1) S).
      expert_size: S, neurons per expert.
      impl: "auto" | "gather" | "pallas" | "interpret" | "reference" (module docstring).
      max_active: Pallas kernels only: expert slots per group of 16 tokens (default E). A group
        with more active experts runs the gather path instead, so the result is always exact.
    Returns:
      [N, D] in x's dtype (float32 accumulation).
    """
    if impl not in FFN_IMPLS:
        raise KernelUnsupportedError(f"impl={impl!r} is not one of {FFN_IMPLS}")
    e = check_args(x_ND, w_in_KFD, w_out_FD, active_NE, expert_size, activation)
    if max_active is not None and not 1 <= max_active <= e:
        raise ValueError(f"max_active={max_active} must be None or in [1, E={e}]")
    kw = dict(expert_size=expert_size, activation=activation)
    resolved = "gather" if impl == "gather" else resolve_impl(impl)
    if resolved == "reference" and impl == "auto":
        resolved = "gather"
    args = (x_ND, w_in_KFD, w_out_FD, active_NE)
    if resolved == "reference":
        return sparse_ffn_reference(*args, **kw)
    if resolved == "gather":
        return sparse_ffn_gather(*args, **kw)
    interpret = resolved == "interpret"
    return sparse_ffn_pallas(*args, **kw, interpret=interpret, max_active=max_active)
