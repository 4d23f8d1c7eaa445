"""Ring attention (context parallelism): softmax attention with the sequence split over the mesh
axis `sequence`, keys and values passed from device to device around its ring.

What it computes: what `kernels.blocked_attention` computes (its dense reference defines it):
GQA, query t sees key s iff s <= t (when causal) and segment_ids[t] == segment_ids[s]; scores,
softmax and the running sums in float32, output in q's dtype. `attention_ops.attention` routes
here whenever the active mesh has a `sequence` axis of size P > 1 that is not already manual
and 2P divides the sequence length, so no device ever holds the whole sequence's keys and
values (other lengths are left to the compiler, with a warning: `ring_devices`).

Layout (zigzag, the load balancing of Llama 3's context parallelism, Dubey et al. 2024 §3.3.2):
the T tokens are cut into 2P chunks of C = T/(2P), and device i holds chunks i and 2P-1-i of
the queries, keys, values and segment ids; under the causal mask every device then has the
same work. Activations arrive split contiguously (device i: chunks 2i and 2i+1), so two
collective-permutes of half a block each move q, k, v and the segment ids to the zigzag layout,
and two more move the output back (their transposes do the same for the gradients).

Ring (Liu et al. 2023, "Ring Attention with Blockwise Transformers"; zigzag as in
zhuzilin/ring-flash-attention's `zigzag_ring_flash_attn`): at step s = 0..P-1 device i holds
the keys/values of device j = (i - s) mod P, adds their contribution to an online softmax
(running row max, row sum and unnormalized output, rescaled as in FlashAttention), and passes
the block on to device i+1; the send is issued before the step's compute, which does not
depend on it, so the transfer can overlap the compute. With the zigzag layout the visible
C x C blocks (query chunk x key chunk) are known per step, and only those are computed:
- s = 0 (own block): (i, i) and (2P-1-i, 2P-1-i) causal, (2P-1-i, i) whole;
- j < i: both query chunks see key chunk j and neither sees 2P-1-j;
- j > i: query chunk 2P-1-i sees both key chunks and chunk i sees neither.
So every later step computes two blocks, (2P-1-i, j) and one picked by the device index,
(i, j) or (2P-1-i, 2P-1-j), through a dynamic slice (no branch; the same program on every
device). Scores per device and head: (2P+1) C^2, against 2P C^2 for 1/P of the causal
triangle (the excess: the masked halves of the two causal diagonal blocks). Not causal: all
four blocks at every step.

Backward: a custom VJP, FlashAttention-2's backward from the saved row log-sum-exp, run as a
second ring: k, v (and the segment ids) travel again, and the float32 dk, dv accumulators of
each block travel with it, one last hop bringing them home. Autodiff through the steps would
save every step's [C, 2C] probabilities (O(T^2/P) per device), or with remat each step's k/v
block (O(T) per device); this saves only q, k, v, the output and the row log-sum-exp of the
device's own T/P tokens, and each step holds O(T/P) besides the C x C scores.

Communication per device and layer: forward P-1 sends of the local k, v and segment ids;
backward P-1 sends of k, v, segment ids and P of the float32 dk, dv; the zigzag reorder moves
the local blocks of q, k, v, the segment ids and the output once (two half-block permutes each;
only chunk 0 stays where it is), and the backward their gradients the other way.

Deviations from `kernels.blocked_attention`: the backward's delta is rowsum(do * o)
(FlashAttention's form), not sum(p * dp), since a row's probabilities span the ring; the
blocked kernel uses the latter so that a saturated softmax with huge scores (Memory Mosaics:
1e4) gives exactly zero score gradients. Steps are unrolled in Python (the program has O(P)
collective-permutes per layer), so it grows with P. The device index enters as data (an arange split
over `sequence`), not `lax.axis_index`, as in Megalodon's sequence parallelism: XLA:CPU
executables loaded from the persistent compilation cache get partition ids wrong.
"""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from . import axes

AXIS = "sequence"  # the mesh axis whose devices form the ring (train.mesh.MESH_AXES)
CHUNKS_PER_DEVICE = 2  # the zigzag layout: device i holds chunks i and 2P-1-i
_MASKED = float(np.finfo(np.float32).min)


def ring_devices(length: int) -> int:
    """P, the size of the active mesh's `sequence` axis, when ring attention serves a sequence
    of `length` tokens: a mesh is active, the axis is > 1 and not already manual, and 2P divides
    `length` (the zigzag chunks). Else 1: the compiler places the whole-sequence attention, which
    gathers the sequence; for a split axis that is warned once per length (sampling windows can
    be of any length; a training sequence is meant to be a multiple of 2P)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or AXIS not in mesh.axis_names or AXIS in mesh.manual_axes:
        return 1
    p = mesh.shape[AXIS]
    if p > 1 and length % (CHUNKS_PER_DEVICE * p):
        if (length, p) not in _warned:
            _warned.add((length, p))
            warnings.warn(
                f"ring attention cuts the sequence into 2 x mesh.sequence = {2 * p} chunks, which "
                f"do not divide {length} tokens: this attention gathers the whole sequence on "
                f"every device instead; use a length that is a multiple of {2 * p}",
                stacklevel=3,
            )
        return 1
    return p


_warned: set[tuple[int, int]] = set()


def ring_attention(
    q_BTHD: jax.Array,
    k_BTKD: jax.Array,
    v_BTKE: jax.Array,
    segment_ids_BT: jax.Array,
    *,
    causal: bool = True,
    scale: float | None = None,
) -> jax.Array:
    """Softmax attention over the active mesh's `sequence` axis (P = `ring_devices(T)` > 1).

    q [B,T,H,D], k [B,T,K,D], v [B,T,K,E] with K | H (query head h reads kv head h // G),
    segment_ids [B,T] int; scale default 1/sqrt(D); returns [B,T,H,E] in q's dtype, split like
    q. T must be a multiple of 2P (the zigzag chunks). Batch rows stay split over the mesh's
    batch axes and heads over `tensor` where those divide them (each device then runs its own
    rows and heads); an axis that does not divide is left to the compiler.
    """
    mesh = jax.sharding.get_abstract_mesh()
    p = mesh.shape[AXIS]
    b, t, h, d = q_BTHD.shape
    kv = k_BTKD.shape[2]
    if t % (CHUNKS_PER_DEVICE * p):
        raise ValueError(
            f"ring attention cuts the sequence into 2 x mesh.sequence = {2 * p} chunks, which "
            f"do not divide its {t} tokens; use a sequence length that is a multiple of {2 * p}"
        )
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    batch = _split(mesh, axes.get("batch").mesh, b)
    heads = _split(mesh, axes.get("act_heads").mesh, math.gcd(h, kv))
    spec = PartitionSpec(_entry(batch), AXIS, _entry(heads), None)
    seg_spec = PartitionSpec(_entry(batch), AXIS)
    body = functools.partial(_device_attention, p=p, causal=causal, scale=scale)
    return jax.shard_map(
        body,
        in_specs=(spec, spec, spec, seg_spec, PartitionSpec(AXIS)),
        out_specs=spec,
        axis_names={AXIS, *batch, *heads},
        check_vma=False,
    )(q_BTHD, k_BTKD, v_BTKE, segment_ids_BT, jnp.arange(p, dtype=jnp.int32))


def _split(mesh, rule, size: int) -> tuple[str, ...]:
    """The mesh axes of a logical rule that split a dimension of `size` here: present, > 1, not
    manual, and together dividing it (else none: the compiler places that dimension)."""
    names = (rule,) if isinstance(rule, str) else tuple(rule or ())
    names = tuple(
        a for a in names if a in mesh.axis_names and mesh.shape[a] > 1 and a not in mesh.manual_axes
    )
    return names if names and size % math.prod(mesh.shape[a] for a in names) == 0 else ()


def _entry(names: tuple[str, ...]):
    return names[0] if len(names) == 1 else (names or None)


def _device_attention(q_BTHD, k_BTKD, v_BTKE, seg_BT, index_1, *, p, causal, scale):
    """One device's part: its contiguous block of T/P tokens in, the same block's output out."""
    i = index_1[0]
    b, t, h, d = q_BTHD.shape
    kv, e = k_BTKD.shape[2], v_BTKE.shape[-1]
    g, c = h // kv, t // 2
    q_BTHD, k_BTKD, v_BTKE, seg_BT = (_to_zigzag(x, i, p) for x in (q_BTHD, k_BTKD, v_BTKE, seg_BT))
    # Halves lead (0: chunk i, 1: chunk 2P-1-i), then the blocked kernel's layout: heads before
    # tokens and the G query heads of a kv head together, so scores are [G*C, C] matmuls.
    q_2BKGCD = (q_BTHD * jnp.asarray(scale, q_BTHD.dtype)).reshape(b, 2, c, kv, g, d)
    q_2BKGCD = q_2BKGCD.transpose(1, 0, 3, 4, 2, 5)
    k_2BKCD = k_BTKD.reshape(b, 2, c, kv, d).transpose(1, 0, 3, 2, 4)
    v_2BKCE = v_BTKE.reshape(b, 2, c, kv, e).transpose(1, 0, 3, 2, 4)
    seg_2BC = seg_BT.reshape(b, 2, c).transpose(1, 0, 2)
    o_2BKGCE = _ring(p, causal, q_2BKGCD, k_2BKCD, v_2BKCE, seg_2BC, i)
    o_BTHE = o_2BKGCE.transpose(1, 0, 4, 2, 3, 5).reshape(b, t, h, e)
    return _from_zigzag(o_BTHE, i, p)


def _zigzag_pairs(p: int, parity: int) -> list[tuple[int, int]]:
    """(source device, destination device) of the chunks j with j % 2 == parity: chunk j sits
    in half `parity` of device j // 2 contiguously, and at device j (j < P) or 2P-1-j in the
    zigzag layout. A permutation: the even (odd) chunks land on distinct devices."""
    return [(j // 2, j if j < p else 2 * p - 1 - j) for j in range(parity, 2 * p, 2)]


def _to_zigzag(x, i, p: int):
    """Device i's contiguous chunks (2i, 2i+1) -> its zigzag chunks (i, 2P-1-i), along axis 1."""
    c = x.shape[1] // 2
    even, odd = (
        jax.lax.ppermute(half, AXIS, _zigzag_pairs(p, parity))
        for parity, half in enumerate((x[:, :c], x[:, c:]))
    )
    # i and 2P-1-i have opposite parities: chunk i came with the permute of i's parity.
    return jnp.where(i % 2 == 0, jnp.concatenate([even, odd], 1), jnp.concatenate([odd, even], 1))


def _from_zigzag(x, i, p: int):
    """The inverse of `_to_zigzag`."""
    c = x.shape[1] // 2
    first, second = x[:, :c], x[:, c:]
    to_even = jnp.where(i % 2 == 0, first, second)  # the chunk of even index
    to_odd = jnp.where(i % 2 == 0, second, first)
    back = (
        jax.lax.ppermute(half, AXIS, [(dst, src) for src, dst in _zigzag_pairs(p, parity)])
        for parity, half in enumerate((to_even, to_odd))
    )
    return jnp.concatenate(list(back), 1)


def _pass_on(tree, p: int):
    """Each device's arrays to the next device of the ring (i -> i+1 mod P)."""
    pairs = [(k, (k + 1) % p) for k in range(p)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, AXIS, pairs), tree)


def _blocks(s: int, i, causal: bool) -> list[tuple]:
    """(query half, key half, causal within the block) of the C x C blocks that step s computes
    on device i; half 0 is chunk i (keys: j), half 1 chunk 2P-1-i (keys: 2P-1-j), j = i - s."""
    if not causal:
        return [(a, k, False) for a in (0, 1) for k in (0, 1)]
    if s == 0:
        return [(0, 0, True), (1, 0, False), (1, 1, True)]
    h = jnp.where(s <= i, 0, 1)  # the keys come from an earlier device (j < i) iff s <= i
    return [(1, 0, False), (h, h, False)]


def _at(x, half):
    return jax.lax.dynamic_index_in_dim(x, half, 0, keepdims=False)


def _add_at(x, half, y):
    return jax.lax.dynamic_update_index_in_dim(x, _at(x, half) + y, half, 0)


def _scores(q_BKGCD, k_BKSD, segq_BC, segk_BS, causal: bool):
    """Float32 scores [B,K,G,C,S] of a block (masked entries `_MASKED`) and its mask [B,C,S]."""
    b, kv, g, c, d = q_BKGCD.shape
    s = k_BKSD.shape[2]
    s_BKMS = jnp.einsum(
        "bkmd,bksd->bkms",
        q_BKGCD.reshape(b, kv, g * c, d),
        k_BKSD,
        preferred_element_type=jnp.float32,
    )
    mask_BCS = segq_BC[:, :, None] == segk_BS[:, None, :]
    if causal:  # a diagonal block: local positions are the chunk's own
        mask_BCS = mask_BCS & jnp.tril(jnp.ones((c, s), jnp.bool_))[None]
    s_BKGCS = jnp.where(mask_BCS[:, None, None], s_BKMS.reshape(b, kv, g, c, s), _MASKED)
    return s_BKGCS, mask_BCS


def _block_forward(q_BKGCD, k_BKSD, v_BKSE, segq_BC, segk_BS, causal: bool):
    """A block's softmax statistics: unnormalized output [B,K,G,C,E], row max, row sum (f32)."""
    b, kv, g, c, _ = q_BKGCD.shape
    s_BKGCS, mask_BCS = _scores(q_BKGCD, k_BKSD, segq_BC, segk_BS, causal)
    m_BKGC = jnp.max(s_BKGCS, axis=-1)
    # A row that sees none of the block: max is the mask value, and the where keeps its sum 0.
    e_BKGCS = jnp.where(mask_BCS[:, None, None], jnp.exp(s_BKGCS - m_BKGC[..., None]), 0.0)
    p_BKMS = e_BKGCS.astype(v_BKSE.dtype).reshape(b, kv, g * c, -1)
    acc_BKME = jnp.einsum("bkms,bkse->bkme", p_BKMS, v_BKSE, preferred_element_type=jnp.float32)
    return acc_BKME.reshape(b, kv, g, c, -1), m_BKGC, jnp.sum(e_BKGCS, axis=-1)


def _merge(state, half, block):
    """Online softmax (FlashAttention): fold a block's statistics into query half `half`."""
    acc_a, m_a, sum_a = (_at(x, half) for x in state)
    acc_b, m_b, sum_b = block
    m_new = jnp.maximum(m_a, m_b)
    ca, cb = jnp.exp(m_a - m_new), jnp.exp(m_b - m_new)
    new = (acc_a * ca[..., None] + acc_b * cb[..., None], m_new, sum_a * ca + sum_b * cb)
    return tuple(
        jax.lax.dynamic_update_index_in_dim(x, y, half, 0) for x, y in zip(state, new, strict=True)
    )


def _ring_forward(p, causal, q_2BKGCD, k_2BKCD, v_2BKCE, seg_2BC, i):
    _, b, kv, g, c, _ = q_2BKGCD.shape
    e = v_2BKCE.shape[-1]
    state = (
        jnp.zeros((2, b, kv, g, c, e), jnp.float32),
        jnp.full((2, b, kv, g, c), _MASKED, jnp.float32),
        jnp.zeros((2, b, kv, g, c), jnp.float32),
    )
    held = (k_2BKCD, v_2BKCE, seg_2BC)
    for s in range(p):
        following = _pass_on(held, p) if s < p - 1 else None
        k, v, seg = held
        for a, h, tri in _blocks(s, i, causal):
            block = _block_forward(
                _at(q_2BKGCD, a), _at(k, h), _at(v, h), _at(seg_2BC, a), _at(seg, h), tri
            )
            state = _merge(state, a, block)
        held = following
    acc_2BKGCE, m_2BKGC, sum_2BKGC = state
    # Every query sees at least itself, so the sum is > 0.
    o_2BKGCE = (acc_2BKGCE / sum_2BKGC[..., None]).astype(q_2BKGCD.dtype)
    lse_2BKGC = m_2BKGC + jnp.log(sum_2BKGC)
    return o_2BKGCE, (q_2BKGCD, k_2BKCD, v_2BKCE, seg_2BC, i, o_2BKGCE, lse_2BKGC)


def _block_backward(
    q_BKGCD, k_BKSD, v_BKSE, segq_BC, segk_BS, do_BKGCE, lse_BKGC, delta_BKGC, causal: bool
):
    """A block's share of dq [B,K,G,C,D], dk [B,K,S,D], dv [B,K,S,E] (float32), FlashAttention-2
    (Dao 2023, Alg. 2) with p recomputed from the row log-sum-exp."""
    b, kv, g, c, d = q_BKGCD.shape
    s, e = k_BKSD.shape[2], v_BKSE.shape[-1]
    s_BKGCS, mask_BCS = _scores(q_BKGCD, k_BKSD, segq_BC, segk_BS, causal)
    p_BKGCS = jnp.where(mask_BCS[:, None, None], jnp.exp(s_BKGCS - lse_BKGC[..., None]), 0.0)
    do_BKME = do_BKGCE.reshape(b, kv, g * c, e)
    p_BKMS = p_BKGCS.astype(v_BKSE.dtype).reshape(b, kv, g * c, s)
    dv_BKSE = jnp.einsum("bkms,bkme->bkse", p_BKMS, do_BKME, preferred_element_type=jnp.float32)
    dp_BKMS = jnp.einsum("bkme,bkse->bkms", do_BKME, v_BKSE, preferred_element_type=jnp.float32)
    ds_BKGCS = p_BKGCS * (dp_BKMS.reshape(b, kv, g, c, s) - delta_BKGC[..., None])
    ds_BKMS = ds_BKGCS.astype(q_BKGCD.dtype).reshape(b, kv, g * c, s)
    dq_BKMD = jnp.einsum("bkms,bksd->bkmd", ds_BKMS, k_BKSD, preferred_element_type=jnp.float32)
    q_BKMD = q_BKGCD.reshape(b, kv, g * c, d)
    dk_BKSD = jnp.einsum("bkms,bkmd->bksd", ds_BKMS, q_BKMD, preferred_element_type=jnp.float32)
    return dq_BKMD.reshape(b, kv, g, c, d), dk_BKSD, dv_BKSE


def _ring_backward(p, causal, res, do_2BKGCE):
    q_2BKGCD, k_2BKCD, v_2BKCE, seg_2BC, i, o_2BKGCE, lse_2BKGC = res
    f32 = jnp.float32
    delta_2BKGC = jnp.sum(o_2BKGCE.astype(f32) * do_2BKGCE.astype(f32), axis=-1)
    dq_2BKGCD = jnp.zeros(q_2BKGCD.shape, f32)
    held, grads = (k_2BKCD, v_2BKCE, seg_2BC), None
    for s in range(p):
        following = _pass_on(held, p) if s < p - 1 else None
        k, v, seg = held
        dk_2BKCD, dv_2BKCE = jnp.zeros(k.shape, f32), jnp.zeros(v.shape, f32)
        for a, h, tri in _blocks(s, i, causal):
            dq, dk, dv = _block_backward(
                _at(q_2BKGCD, a),
                _at(k, h),
                _at(v, h),
                _at(seg_2BC, a),
                _at(seg, h),
                _at(do_2BKGCE, a),
                _at(lse_2BKGC, a),
                _at(delta_2BKGC, a),
                tri,
            )
            dq_2BKGCD = _add_at(dq_2BKGCD, a, dq)
            dk_2BKCD, dv_2BKCE = _add_at(dk_2BKCD, h, dk), _add_at(dv_2BKCE, h, dv)
        # The held block's gradient so far arrives from the previous device (it held the block
        # one step earlier); this step's share is computed without waiting for it.
        mine = (dk_2BKCD, dv_2BKCE)
        grads = mine if grads is None else jax.tree.map(jnp.add, _pass_on(grads, p), mine)
        held = following
    dk_2BKCD, dv_2BKCE = _pass_on(grads, p)  # the last hop: home to the block's own device
    return (
        dq_2BKGCD.astype(q_2BKGCD.dtype),
        dk_2BKCD.astype(k_2BKCD.dtype),
        dv_2BKCE.astype(v_2BKCE.dtype),
        np.zeros(seg_2BC.shape, jax.dtypes.float0),
        np.zeros(i.shape, jax.dtypes.float0),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _ring(p, causal, q_2BKGCD, k_2BKCD, v_2BKCE, seg_2BC, i):
    """Device i's attention in the zigzag layout: pre-scaled q [2,B,K,G,C,D], k [2,B,K,C,D],
    v [2,B,K,C,E], segment ids [2,B,C] (axis 0: chunk i, chunk 2P-1-i) -> [2,B,K,G,C,E]."""
    return _ring_forward(p, causal, q_2BKGCD, k_2BKCD, v_2BKCE, seg_2BC, i)[0]


_ring.defvjp(_ring_forward, _ring_backward)
