"""Heads that learn to look ahead: a hierarchical lookahead planner and two multi-token baselines.

All three are `model.head` parts (`arch.parts`): their LM logits are next-token logits [B,T,V]
float32 from the LM head (`arch.lm_head`, tied or untied), and their extra losses go through
`aux_loss`, each with its own metrics under `head/`. They read future tokens only from
`ctx.targets`, through one rule (`future_targets`): the token k steps after position t is

    x_{t+k} = ctx.targets[t+k-1],  counted iff  t+k-1 < T  and  segment_ids[t+k-1] = segment_ids[t]
                                               and  loss_mask[t+k-1] = 1

(the loss mask at t+k-1 already says x_{t+k} is in that token's document: no target crosses a
document boundary or the row's end). Losses are means over the counted targets. Without
`ctx.targets` (generation, export) no loss is computed.

kind: planner (the design of ../shared/references/planners.md, "Suggested use"). h [B,T,D] is the
backbone's final (normed) hidden state; blocks of P = `block` tokens start at multiples of P from
the row's first position (the row is padded to N = ceil(T/P) blocks).

    s_j = mean of h_t over block j's tokens in the document of its last token a_j
    z_0..z_{N-1} = RMSNorm(planner layers(s_0..s_{N-1}))     causal over blocks: z_j reads s_<=j
    LM input at t in block j+1:  h_t + g W_c z_j  if t is in a_j's document  (`condition_lm`)
    lookahead:  p(x_{(j+1)P+i} | z_j) = softmax(U RMSNorm(r + MLP(RMSNorm(r)))),  r = z_j + e_i
    latent:     L_lat = mean_d SmoothL1(W_l z_j - sg(s_{j+1}))   (blocks j+1 in a_j's document)

for i = 0..P-1 (e_i a learned offset embedding, U the shared unembedding). The lookahead targets
of z_j are the INPUT tokens of block j+1, x_{(j+1)P+i} = future_targets at a_j with k = i + 1, so
the first is the LM's own next token at a_j. z_j reads tokens <= a_j = (j+1)P - 1 only, and
conditions block j+1 only (offset by one block, as MEGABYTE's global-to-local shift); block 0
gets no plan. Nothing of block j+1 is an input of its plan or of its predictions: the lookahead
is teacherless (Bachmann & Nagarajan 2024), at block level. aux_loss = lookahead_weight *
lookahead_loss + latent_weight * latent_loss; metrics lookahead_loss, lookahead_accuracy,
lookahead_block_accuracy (blocks whose counted lookahead targets are all the argmax: the exact
match of decoding each block in parallel from its plan), latent_loss.

Choices and deviations, said here:
- Pooling is a mean (Hourglass's average shortening), restricted to the document of the block's
  last token; the planner's attention is masked by that document too, and a plan conditions
  only tokens of its own document. A block straddling two documents thus plans for the second.
- The planner runs at width d_model (no separate planner width), so pooled states enter it
  without a projection. Its layers are the repo's pre-norm attention (RoPE over block indices)
  + SwiGLU blocks (`CausalBlock`).
- The plan enters through a scalar gate g that starts at zero (W_c starts as the other
  matrices), so at initialisation the conditioned LM is exactly the LM head. A zero W_c without
  a gate (`condition_gate: false`, the first design) grows under Adam by about lr per entry per
  step whatever its gradient, and its plan swamped the LM's input early on text: bits/byte
  x1.054 of the plain LM head's at 240 steps against x1.025 gated (lookahead 0.3), x1.017
  against x0.992 (0.1). On path-star the two gave the same (README). The plan is added after
  the backbone's final norm, just before the unembedding.
- `condition_lm` defaults to true: a plan that steers the next block is the point of the design
  (and of generation that uses the plan); with it off the planner is only an auxiliary loss on
  the backbone and costs nothing outside training. With it on, incremental decoding
  (`Planner.decode`) keeps the planner layers' caches over blocks, the running sum of the
  current block's states and the current plan: each token is conditioned on the plan of the
  block before its own, and the block's last token runs the planner one block further.
- The latent target is the mean-pooled block state, with SmoothL1 (Huber, delta 1) as NextLat
  uses; pairs whose block j+1 leaves a_j's document do not count.
- Lookahead logits cost one more [B,T,V] unembedding (N blocks x P offsets = T rows).
- `writer_layers` > 0 adds the plan writer (`arch.plan_writer`, not in planners.md): from z_j
  and the states h_{<=a_j} it writes block j+1 last token first, and its greedy tokens steer the
  LM: at t = a_j .. a_j+P-1 (in a_j's document) the LM input gains W_p Emb(the written token for
  x_{t+1}), W_p zero at init. The tokens read nothing of block j+1, so the LM stays causal; the
  writer's own loss (`writer_weight`, in aux_loss; metrics writer_loss, writer_accuracy and
  writer_block_accuracy, the greedy blocks' exact match) is teacher-forced on block j+1's
  tokens, written last first: unlike the lookahead loss it is not teacherless. `writer_taps`
  mixes the states just before each memory state into it. It costs a greedy write per block in
  training and at inference (`Planner.decode` keeps the hidden states as the writer's memory).

kind: mtp_parallel (Gloeckle et al. 2024, arXiv 2404.19737). n = `n_future` heads share the
unembedding; head 1 is the LM head itself (its logits are the model's output), head k >= 2
predicts x_{t+k} from h_t through its own causal transformer block and RMSNorm. aux_loss =
mtp_weight * sum_{k>=2} CE_k: with mtp_weight 1 the total is the paper's plain sum of the n
losses. Deviations: the paper's head 1 is a transformer layer too and its trunk is n - 1 layers
shorter (equal parameters is a choice of config here, not of the head); the paper's memory trick
(forward/backward one head at a time) is not done: all heads' logits live at once.

kind: mtp_sequential (DeepSeek-V3, arXiv 2412.19437 section 2.2). D = `depth` modules; module k
combines its input h^{k-1} (h^0 = h) with the embedding of the token k steps ahead:

    h'^k_t = M_k [RMSNorm(h^{k-1}_t); RMSNorm(Emb(x_{t+k}))],   M_k in R^{D x 2D}
    h^k = TRM_k(h'^k),   p(x_{t+k+1}) = softmax(U RMSNorm_k(h^k_t))

with TRM_k a causal pre-norm attention + SwiGLU block (`CausalBlock`), Emb the model's embedding
and U the shared unembedding (DeepSeek's per-module norm before the shared head, as its released
weights' `shared_head.norm`). aux_loss = mtp_weight / D * sum_k CE_k (DeepSeek's lambda / D).
x_{t+k} is read from ctx.targets (the input tokens, except in path-star's teacherless mode, where
the module sees the true path: DeepSeek's MTP is teacher-forced by design). Where x_{t+k} is
past the row or in the next document its embedding is still fed, harmlessly: every prediction
that reads it (at t or, through the causal, document-masked TRM, later in t's document) targets
a token past that boundary and does not count.

The two MTP heads are plain LM heads at inference (decoding unaffected).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from .attention import AttentionConfig
from .axes import Axis, declare
from .config import ModelConfig, check_positive
from .layers import Embed, Linear, dtype_of, linear, param, rms_norm
from .lm_head import LMHead, LMHeadConfig
from .parts import Aux, Ctx, HeadConfig, decode_pre_norm_block, init_block_cache
from .plan_writer import PlanWriter
from .swiglu import SwiGLUConfig

declare(
    Axis("head_in", "feature", None, doc="input width of a head's projection into the stream"),
    Axis("plan_offset", "feature", None, doc="token offsets within a planned block"),
    Axis("memory_tap", "feature", None, doc="earlier states mixed into a writer's memory state"),
    Axis("kv", "feature", None, doc="a writer layer's key taps and value taps"),
)


def future_targets(ctx: Ctx, k: int) -> tuple[jax.Array, jax.Array]:
    """(x_{t+k} [B,T] int32, counted [B,T] float32) at every position t: x_{t+k} =
    ctx.targets[t+k-1] (0 past the row), counted iff inside the row, in t's document and
    ctx.loss_mask 1 there (see the module docstring)."""
    t, shift = ctx.targets.shape[1], k - 1
    pad = ((0, 0), (0, min(shift, t)))
    tokens = jnp.pad(ctx.targets[:, shift:], pad)
    same_doc = jnp.pad(ctx.segment_ids[:, shift:] == ctx.segment_ids[:, : t - shift], pad)
    counted = same_doc & (jnp.pad(ctx.loss_mask[:, shift:], pad) > 0)
    return tokens, counted.astype(jnp.float32)


def token_loss(logits: jax.Array, tokens: jax.Array, counted: jax.Array) -> tuple[jax.Array, ...]:
    """(mean cross-entropy, accuracy) over the counted positions; logits [..., V] float32."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens)
    hits = (jnp.argmax(logits, axis=-1) == tokens).astype(jnp.float32)
    n = jnp.maximum(jnp.sum(counted), 1.0)
    return jnp.sum(ce * counted) / n, jnp.sum(hits * counted) / n


def block_exact_match(logits_BNPV: jax.Array, tokens_BNP: jax.Array, counted_BNP: jax.Array):
    """The fraction of blocks with a counted target whose counted targets are all the argmax:
    decoding each block in parallel from its plan, exactly right (on path-star, with a block
    ending where the answer starts, the exact match of the whole answer planned at once)."""
    return tokens_exact_match(jnp.argmax(logits_BNPV, axis=-1), tokens_BNP, counted_BNP)


def tokens_exact_match(guess_BNP: jax.Array, tokens_BNP: jax.Array, counted_BNP: jax.Array):
    """The fraction of blocks with a counted target whose counted targets `guess` has right."""
    counted = counted_BNP > 0
    wrong_BN = jnp.any((guess_BNP != tokens_BNP) & counted, axis=-1)
    has_BN = jnp.any(counted, axis=-1)
    right = jnp.sum(has_BN & ~wrong_BN, dtype=jnp.float32)
    return right / jnp.maximum(jnp.sum(has_BN, dtype=jnp.float32), 1.0)


class HeadBlocksConfig(HeadConfig):
    """Fields and counts shared by heads with extra transformer blocks (not a kind itself)."""

    n_heads: int = 4
    """Attention heads of each extra block of the head."""
    hidden_dim: int | None = None
    """SwiGLU width of those blocks. None: Llama's 8/3 d_model rule (as `swiglu`)."""

    def attention(self) -> AttentionConfig:
        return AttentionConfig(n_heads=self.n_heads)

    def ffn(self) -> SwiGLUConfig:
        return SwiGLUConfig(hidden_dim=self.hidden_dim)

    def check(self, model: ModelConfig) -> None:
        check_positive(self, "model.head.", ints=("n_heads", "hidden_dim"))
        d = model.d_model
        if d % self.n_heads or (d // self.n_heads) % 2:
            raise ValueError(
                f"model.head.n_heads={self.n_heads} must divide model.d_model={d} into even "
                "head widths (RoPE rotates pairs)"
            )

    def block_params(self, model: ModelConfig) -> int:
        """One `CausalBlock`: two norm scales 2 D + attention + SwiGLU."""
        attention = self.attention().num_params(model)
        return 2 * model.d_model + attention + self.ffn().num_params(model)

    def block_flops(self, model: ModelConfig, seq_len: int) -> float:
        """Training FLOPs per position of one `CausalBlock` over `seq_len` positions."""
        attention = self.attention().flops_per_token(model, seq_len)
        return attention + self.ffn().flops_per_token(model, seq_len)

    def embedding_params(self, model: ModelConfig) -> int:
        """The LM head's matrix when untied (the unembedding is shared by every prediction)."""
        return LMHeadConfig().num_params(model)


class CausalBlock(nnx.Module):
    """x + attention(RMSNorm x), then x + SwiGLU(RMSNorm x): the repo's pre-norm block at width
    d_model, causal and document-masked by `ctx`."""

    def __init__(self, cfg: HeadBlocksConfig, model: ModelConfig, *, rngs: nnx.Rngs):
        self.mixer_norm = rms_norm(model, rngs=rngs)
        self.mixer = cfg.attention().build(model, rngs=rngs)
        self.ffn_norm = rms_norm(model, rngs=rngs)
        self.ffn = cfg.ffn().build(model, rngs=rngs)

    def __call__(self, x_BSD: jax.Array, ctx: Ctx) -> jax.Array:
        x_BSD = x_BSD + self.mixer(self.mixer_norm(x_BSD), ctx)[0]
        return x_BSD + self.ffn(self.ffn_norm(x_BSD), ctx)[0]

    def init_cache(self, batch: int, max_len: int) -> tuple[Any, Any]:
        return init_block_cache(self.mixer, self.ffn, batch, max_len)

    def decode(self, x_BSD: jax.Array, cache: Any, start) -> tuple[jax.Array, Any]:
        """The block for S positions start.. given its caches (`arch.parts`)."""
        parts = dict(
            mixer=self.mixer, mixer_norm=self.mixer_norm, ffn=self.ffn, ffn_norm=self.ffn_norm
        )
        return decode_pre_norm_block(x_BSD, cache, start, **parts)


# ---- the planner ------------------------------------------------------------------------------


class PlannerConfig(HeadBlocksConfig):
    """A causal planner over blocks of `block` tokens whose plan conditions the next block and
    predicts all its tokens (the module docstring has the equations)."""

    kind: Literal["planner"] = "planner"
    """Selects this head."""
    block: int = 8
    """Tokens per block P (planners.md suggests 8 or 16 for path-star)."""
    planner_layers: int = 2
    """Causal blocks of the planner over the block sequence."""
    condition_lm: bool = True
    """Add the plan of block j to the LM's input at every token of block j+1 (off: the planner
    is only an auxiliary loss, and costs nothing outside training)."""
    condition_gate: bool = True
    """The plan enters the LM as g W_c z_j with a scalar gate g from zero and W_c initialised as
    the other matrices; false: W_c z_j with W_c from zero, no gate (the first design, which the
    path-star bench keeps for its recorded tables). On the default text job the gate took
    bits/byte from x1.017 of the LM head's to x0.992 (lookahead 0.1); on path-star G(2, 5) the
    writer arm gave the same either way (README)."""
    lookahead_weight: float = 0.1
    """Weight of the teacherless lookahead loss. DeepSeek-V3's lambda is 0.3, then 0.1 (planners.md
    suggests 0.3); 0.1 kept the default text job's bits/byte within 1% of the LM head's at 240
    steps where 0.3 cost 2.5% (README). The path-star bench sets 0.3."""
    latent_weight: float = 0.0
    """Weight of the latent lookahead loss (0: off, and no latent map is built)."""
    decoder_hidden: int | None = None
    """Hidden width of the lookahead decoder's MLP. None: 2 d_model."""
    writer_layers: int = 0
    """Layers of the plan writer (`arch.plan_writer`): it writes block j+1 last token first from
    the plan and the prefix, and its greedy tokens condition the LM. 0: no writer."""
    writer_weight: float = 1.0
    """Weight of the writer's teacher-forced (reverse) loss."""
    writer_taps: int = 0
    """Earlier states mixed into each of the writer's memory states (a short causal depthwise
    convolution, as Canon layers: m_t = h_t + sum_k c_k h_{t-k}); 0: the states as they are."""
    writer_tap_init: float = 0.0
    """Every tap's initial value (0: the memory starts as the states alone). On path-star
    G(5, 5), taps on the states: 1.0 took the runs stuck at copying (0.000, seeds 0 at width 64
    and 1 at width 128) to 0.885 and 0.734, each missing the lookups of the edge list's last
    edge; taps on keys and values from 0.25 learned every seed (README, the bench's arm)."""
    writer_key_tap_init: float | None = None
    """With the taps on keys and values: the key taps' initial value (`writer_tap_init` then
    sets the value taps'); None: `writer_tap_init` for both. 0 with value taps at 1: every key
    starts as its own position's and every value carries the positions before it."""
    writer_taps_on: Literal["states", "keys_values"] = "states"
    """Where the taps mix: the states (one c_k [D] per tap, shared by every layer's keys and
    values), or each writer layer's keys and values after their projections, with taps of their
    own (c^K_k, c^V_k [H, Dh] per layer: a key can then stay its own position's while its value
    carries the position before, as Canon-B mixes q, k and v)."""

    def check(self, model: ModelConfig) -> None:
        super().check(model)
        ints = ("block", "planner_layers", "decoder_hidden")
        check_positive(self, "model.head.", ints=ints)
        at_least_0 = ("lookahead_weight", "latent_weight", "writer_weight", "writer_layers")
        for name in (*at_least_0, "writer_taps"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.head.{name}={getattr(self, name)} must be >= 0")

    def hidden(self, model: ModelConfig) -> int:
        """The lookahead decoder's hidden width F."""
        return 2 * model.d_model if self.decoder_hidden is None else self.decoder_hidden

    def build(self, model: ModelConfig, *, rngs: nnx.Rngs) -> Planner:
        return Planner(self, model, rngs=rngs)

    def num_params(self, model: ModelConfig) -> int:
        """LM head + planner layers and final norm + W_c and g (condition_lm) + decoder
        (offsets P D, two norms 2 D, MLP 2 D F) + W_l (latent_weight > 0) + the writer."""
        d = model.d_model
        planner = self.planner_layers * self.block_params(model) + d
        maps = d * d * (int(self.condition_lm) + int(self.latent_weight > 0))
        maps += int(self.condition_lm and self.condition_gate)
        decoder = self.block * d + 2 * d + 2 * d * self.hidden(model)
        return (
            LMHeadConfig().num_params(model) + planner + maps + decoder + self.writer_params(model)
        )

    def writer_params(self, model: ModelConfig) -> int:
        """Writer layers (three norms 3 D, q k v o 4 D H Dh, SwiGLU, key and value taps 2 K H Dh
        when on them) + steps P D + state taps K D (when on them) + final norm D + W_p D^2; 0
        without a writer."""
        if not self.writer_layers:
            return 0
        d, attention = model.d_model, self.attention()
        hd = attention.n_heads * attention.dim_head(model)
        on_kv = self.writer_taps if self.writer_taps_on == "keys_values" else 0
        layer = 3 * d + 4 * d * hd + self.ffn().num_params(model) + 2 * on_kv * hd
        state_taps = self.writer_taps - on_kv
        return self.writer_layers * layer + (self.block + state_taps) * d + d + d * d

    def writer_flops(self, model: ModelConfig, seq_len: int) -> float:
        """Training FLOPs per token of the writer: each token is one step of one block, written
        teacher-forced (forward and backward) and greedily (forward only), each step a writer
        layer per layer (about a causal block over `seq_len`: its queries read a prefix) and an
        unembedding; W_p trained at every token."""
        if not self.writer_layers:
            return 0.0
        d, v = model.d_model, model.padded_vocab
        layers = self.writer_layers * self.block_flops(model, seq_len)
        return layers * 4 / 3 + 8 * d * v + 6 * d * d

    def flops_per_token(self, model: ModelConfig, seq_len: int) -> float:
        """LM head + lookahead (decoder MLP and one more unembedding per token) + per block
        (planner layers, W_c, W_l) / P + the writer."""
        d, v = model.d_model, model.padded_vocab
        lookahead = 6 * 2 * d * self.hidden(model) + 6 * d * v
        blocks = math.ceil(seq_len / self.block)
        maps = 6 * d * d * (int(self.condition_lm) + int(self.latent_weight > 0))
        per_block = self.planner_layers * self.block_flops(model, blocks) + maps
        head = LMHeadConfig().flops_per_token(model, seq_len) + lookahead + per_block / self.block
        return head + self.writer_flops(model, seq_len)


def in_blocks(x_BT: jax.Array, p: int, fill) -> jax.Array:
    """[B,T,...] -> [B,N,P,...], N = ceil(T/P), the row padded with `fill` ("edge": its last
    value)."""
    b, t = x_BT.shape[:2]
    n = -(-t // p)
    pad = [(0, 0), (0, n * p - t)] + [(0, 0)] * (x_BT.ndim - 2)
    x_BT = (
        jnp.pad(x_BT, pad, mode="edge")
        if fill == "edge"
        else jnp.pad(x_BT, pad, constant_values=fill)
    )
    return x_BT.reshape(b, n, p, *x_BT.shape[2:])


@struct.dataclass
class PlanState:
    """A steering planner's decoding state: the planner layers' caches over blocks, the sum of
    the current block's hidden states [B,D] float32, g W_c z_{j-1} [B,D] for the current block j
    (zeros in block 0 and without `condition_lm`); with a writer, the hidden states so far
    [B,L,D] float32 (its memory) and the tokens it wrote at the last block's end [B,P] int32,
    in order."""

    layers: Any
    block_sum: jax.Array
    condition: jax.Array
    memory: jax.Array | None = None
    plan: jax.Array | None = None


class Planner(nnx.Module):
    """The LM head with a block planner (see the module docstring)."""

    def __init__(self, cfg: PlannerConfig, model: ModelConfig, *, rngs: nnx.Rngs):
        d, f, dtype = model.d_model, cfg.hidden(model), dtype_of(model.param_dtype)
        self.cfg = cfg
        self.lm = LMHead(model, rngs=rngs)
        self.layers = nnx.List(
            [CausalBlock(cfg, model, rngs=rngs) for _ in range(cfg.planner_layers)]
        )
        self.plan_norm = rms_norm(model, rngs=rngs)
        zeros, compute = jax.nn.initializers.zeros, dtype_of(model.compute_dtype)
        kw = dict(std=None, init=zeros, param_dtype=dtype, compute_dtype=compute, rngs=rngs)
        self.condition, self.condition_gate = self.conditioner(cfg, model, rngs, kw)
        shape, names = (cfg.block, d), ("plan_offset", "embed")
        self.offsets = param(rngs, shape, names, std=model.init_std, dtype=dtype)
        self.decoder_norm = rms_norm(model, rngs=rngs)
        self.decoder_up = linear(model, d, f, ("embed", "mlp"), rngs=rngs)
        self.decoder_down = linear(model, f, d, ("mlp", "embed"), rngs=rngs)
        self.out_norm = rms_norm(model, rngs=rngs)
        latent = cfg.latent_weight > 0
        self.latent = linear(model, d, d, ("head_in", "embed"), rngs=rngs) if latent else None
        writes = cfg.writer_layers > 0
        args = (cfg.writer_layers, cfg.block, cfg.writer_taps, cfg.attention(), cfg.ffn(), model)
        taps = dict(tap_init=cfg.writer_tap_init, taps_on=cfg.writer_taps_on)
        taps |= dict(key_tap_init=cfg.writer_key_tap_init)
        self.writer = PlanWriter(*args, **taps, rngs=rngs) if writes else None
        self.read_plan = Linear(d, d, ("head_in", "embed"), **kw) if writes else None

    def __call__(self, h_BTD: jax.Array, ctx: Ctx, *, embed: Embed) -> tuple[jax.Array, Aux]:
        steers = self.condition is not None or self.writer is not None
        if not steers and ctx.targets is None:
            return self.lm(h_BTD, ctx, embed=embed)  # nothing to condition, nothing to learn
        with jax.named_scope("planner"):
            s_BND, z_BND = self.plan(h_BTD, ctx)
            cond_BTD = jnp.zeros_like(h_BTD)
            if self.condition is not None:
                cond_BTD = cond_BTD + self.conditioning(z_BND, ctx).astype(h_BTD.dtype)
            if self.writer is not None:
                write = self.writing(z_BND, h_BTD, ctx, embed)
                _, plan_BNP = write()
                cond_BTD = cond_BTD + self.reading(plan_BNP, ctx, embed).astype(h_BTD.dtype)
            logits_BTV, _ = self.lm(h_BTD + cond_BTD, ctx, embed=embed)
            if ctx.targets is None:
                return logits_BTV, {}
            aux = self.losses(s_BND, z_BND, ctx, embed)
            if self.writer is not None:
                aux = self.writer_losses(aux, write, plan_BNP, ctx)
            return logits_BTV, aux

    def writing(self, z_BND, h_BTD, ctx: Ctx, embed: Embed):
        """write(teacher=None) -> the writer's (logits [B,N,P,V], tokens [B,N,P]) for every
        block, step i the token P - 1 - i of the next block; block j reads the states h_t,
        t <= a_j, of a_j's document (the memory computed once for both passes)."""
        _, last_BN = self.block_segments(ctx)
        ends_N = (jnp.arange(last_BN.shape[1]) + 1) * self.cfg.block - 1
        before_NT = jnp.arange(h_BTD.shape[1])[None, :] <= ends_N[:, None]
        allowed_BNT = before_NT[None] & (ctx.segment_ids[:, None, :] == last_BN[..., None])
        memory = self.writer.memory(h_BTD, ctx.segment_ids)
        head = lambda x: self.lm(x, None, embed=embed)[0]  # noqa: E731
        return lambda teacher=None: self.writer.write(  # noqa: E731
            z_BND, memory, allowed_BNT, embed, head, teacher
        )

    def reading(self, plan_BNP: jax.Array, ctx: Ctx, embed: Embed) -> jax.Array:
        """[B,T,D]: W_p Emb(the plan's token for x_{t+1}) at every position t from a_j to
        a_j + P - 1 in a_j's document (the plan written at a_j); zero before block 0 ends."""
        p, (b, n, _), t = self.cfg.block, plan_BNP.shape, ctx.segment_ids.shape[1]
        in_order = plan_BNP[..., ::-1].reshape(b, n * p)  # x_{(j+1)P+o}
        next_BT = jnp.pad(in_order, ((0, 0), (p, 0)))[:, 1 : t + 1]  # x_{t+1} at t
        j_T = (jnp.arange(t) + 1) // p - 1
        _, last_BN = self.block_segments(ctx)
        doc_BT = jnp.take(last_BN, jnp.maximum(j_T, 0), axis=1)
        keep_BT = (j_T >= 0) & (ctx.segment_ids == doc_BT)
        return jnp.where(keep_BT[..., None], self.read_plan(embed(next_BT)), 0)

    def writer_losses(self, aux: Aux, write, plan_BNP, ctx: Ctx) -> Aux:
        """The writer's teacher-forced loss (weighted into aux_loss), its accuracy, and the
        exact match of its greedy blocks `plan` (`writer_block_accuracy`)."""
        tokens, counted = (x[..., ::-1] for x in self.lookahead_targets(ctx))
        logits_BNPV, _ = write((tokens, counted))
        loss, accuracy = token_loss(logits_BNPV, tokens, counted)
        blocks = tokens_exact_match(plan_BNP, tokens, counted)
        total = aux["aux_loss"] + self.cfg.writer_weight * loss
        metrics = {"writer_loss": loss, "writer_accuracy": accuracy}
        return aux | metrics | {"writer_block_accuracy": blocks, "aux_loss": total}

    def init_state(self, batch: int, max_len: int) -> PlanState | None:
        """The decoding state before the first token (None when the planner steers nothing:
        the LM head alone then decodes)."""
        if self.condition is None and self.writer is None:
            return None
        blocks, (p, d) = -(-max_len // self.cfg.block), self.offsets.shape
        caches = [layer.init_cache(batch, blocks) for layer in self.layers]
        zeros = jnp.zeros((batch, d), jnp.float32)
        if self.writer is None:
            return PlanState(caches, zeros, zeros)
        memory = jnp.zeros((batch, max_len, d), jnp.float32)
        return PlanState(caches, zeros, zeros, memory, jnp.zeros((batch, p), jnp.int32))

    def decode(
        self, h_BTD: jax.Array, state: PlanState | None, start, *, embed: Embed
    ) -> tuple[jax.Array, PlanState | None]:
        """Logits [B,T,V] of T tokens at positions start.. of one document and the state after
        them: what `__call__` gives at those positions, token by token."""
        if state is None:
            return self.lm(h_BTD, None, embed=embed)[0], None

        def token(state: PlanState, h_pos):
            h_BD, pos = h_pos
            condition_BD = state.condition  # z_{j-1}'s, before block j's end updates it
            if state.memory is not None:
                h32_BD = h_BD.astype(jnp.float32)
                memory = jax.lax.dynamic_update_index_in_dim(state.memory, h32_BD, pos, 1)
                state = state.replace(memory=memory)
            total = state.block_sum + h_BD.astype(jnp.float32)
            ends = (pos + 1) % self.cfg.block == 0
            nxt = lambda: self.next_plan(state, total, pos, h_BD.dtype, embed)  # noqa: E731
            state = jax.lax.cond(ends, nxt, lambda: state.replace(block_sum=total))
            out_BD = h_BD + condition_BD.astype(h_BD.dtype)
            if state.plan is not None:  # the block written at a_j <= pos, read from a_j on
                read_BD = self.read_plan(embed(state.plan[:, (pos + 1) % self.cfg.block]))
                out_BD = out_BD + jnp.where(pos + 1 >= self.cfg.block, read_BD, 0).astype(
                    h_BD.dtype
                )
            return state, out_BD

        positions = start + jnp.arange(h_BTD.shape[1], dtype=jnp.int32)
        state, out_TBD = jax.lax.scan(token, state, (h_BTD.swapaxes(0, 1), positions))
        return self.lm(out_TBD.swapaxes(0, 1), None, embed=embed)[0], state

    def next_plan(self, state: PlanState, total_BD: jax.Array, pos, dtype, embed) -> PlanState:
        """Block j = pos // P is complete at `pos` (its states sum to `total`): the planner one
        block further (in the hidden states' `dtype`), its plan g W_c z_j for block j+1, the
        writer's tokens of block j+1 (from the memory up to `pos`), and an empty sum."""
        x_B1D = (total_BD / self.cfg.block)[:, None].astype(dtype)
        caches = []
        for layer, cache in zip(self.layers, state.layers, strict=True):
            x_B1D, cache = layer.decode(x_B1D, cache, pos // self.cfg.block)
            caches.append(cache)
        z_B1D, condition, plan = self.plan_norm(x_B1D), state.condition, state.plan
        if self.condition is not None:
            condition = self.planned(z_B1D)[:, 0].astype(jnp.float32)
        if self.writer is not None:
            h_BLD = state.memory.astype(dtype)
            allowed_B1L = jnp.broadcast_to(jnp.arange(h_BLD.shape[1]) <= pos, h_BLD.shape[:2])
            memory = self.writer.memory(h_BLD, None)
            head = lambda x: self.lm(x, None, embed=embed)[0]  # noqa: E731
            _, written = self.writer.write(z_B1D, memory, allowed_B1L[:, None], embed, head)
            plan = written[:, 0, ::-1]
        return PlanState(caches, jnp.zeros_like(total_BD), condition, state.memory, plan)

    def block_segments(self, ctx: Ctx) -> tuple[jax.Array, jax.Array]:
        """(segment ids [B,N,P] padded with the row's last, the document of each block's last
        real token [B,N])."""
        seg_BNP = in_blocks(ctx.segment_ids, self.cfg.block, "edge")
        return seg_BNP, seg_BNP[:, :, -1]

    def real(self, t: int) -> jax.Array:
        """[N,P] bool: which block slots hold a token of the row (not padding)."""
        return in_blocks(jnp.ones((1, t), bool), self.cfg.block, False)[0]

    def plan(self, h_BTD: jax.Array, ctx: Ctx) -> tuple[jax.Array, jax.Array]:
        """(pooled blocks s [B,N,D] float32, plans z [B,N,D]): z_j reads tokens <= (j+1)P-1."""
        seg_BNP, last_BN = self.block_segments(ctx)
        w_BNP = (self.real(h_BTD.shape[1]) & (seg_BNP == last_BN[..., None])).astype(jnp.float32)
        h_BNPD = in_blocks(h_BTD.astype(jnp.float32), self.cfg.block, 0.0)
        s_BND = jnp.einsum("bnp,bnpd->bnd", w_BNP, h_BNPD) / jnp.sum(w_BNP, -1)[..., None]
        n = s_BND.shape[1]
        blocks = Ctx.make(
            last_BN, positions=jnp.broadcast_to(jnp.arange(n), last_BN.shape), segment_ids=last_BN
        )
        x_BND = s_BND.astype(h_BTD.dtype)
        for layer in self.layers:
            x_BND = layer(x_BND, blocks)
        return s_BND, self.plan_norm(x_BND)

    @staticmethod
    def conditioner(cfg: PlannerConfig, model: ModelConfig, rngs: nnx.Rngs, zero: dict):
        """(W_c, g): W_c as the other matrices and g a scalar at zero (`condition_gate`), or
        W_c at zero and no g; (None, None) without `condition_lm`. The LM starts unchanged."""
        if not cfg.condition_lm:
            return None, None
        d, names = model.d_model, ("head_in", "embed")
        if not cfg.condition_gate:
            return Linear(d, d, names, **zero), None
        w_c = linear(model, d, d, names, rngs=rngs)  # before g: the key order of a36b329's runs
        dtype = dtype_of(model.param_dtype)
        gate = param(rngs, (), (), std=None, dtype=dtype, init=jax.nn.initializers.zeros)
        return w_c, gate

    def planned(self, z_BND: jax.Array) -> jax.Array:
        """g W_c z (or W_c z ungated): what a plan adds to the LM's input."""
        c_BND = self.condition(z_BND)
        if self.condition_gate is None:
            return c_BND
        return c_BND * self.condition_gate[...].astype(c_BND.dtype)

    def conditioning(self, z_BND: jax.Array, ctx: Ctx) -> jax.Array:
        """[B,T,D]: g W_c z_j at the tokens of block j+1 in the document of block j's last token;
        zero in block 0."""
        seg_BNP, last_BN = self.block_segments(ctx)
        c_BND = self.planned(z_BND)
        c_BND = jnp.pad(c_BND[:, :-1], ((0, 0), (1, 0), (0, 0)))  # block j+1 gets z_j
        prev_BN = jnp.pad(last_BN[:, :-1], ((0, 0), (1, 0)))
        first = jnp.arange(last_BN.shape[1]) == 0
        keep_BNP = (seg_BNP == prev_BN[..., None]) & ~first[None, :, None]
        c_BNPD = jnp.where(keep_BNP[..., None], c_BND[:, :, None], 0)
        b, n, p, d = c_BNPD.shape
        return c_BNPD.reshape(b, n * p, d)[:, : ctx.segment_ids.shape[1]]

    def lookahead_logits(self, z_BND: jax.Array, embed: Embed) -> jax.Array:
        """[B,N,P,V] float32: from z_j alone, logits of the P tokens of block j+1."""
        r_BNPD = z_BND[:, :, None] + self.offsets[...].astype(z_BND.dtype)
        y_BNPD = r_BNPD + self.decoder_down(jax.nn.gelu(self.decoder_up(self.decoder_norm(r_BNPD))))
        b, n, p, d = y_BNPD.shape
        logits, _ = self.lm(self.out_norm(y_BNPD).reshape(b, n * p, d), None, embed=embed)
        return logits.reshape(b, n, p, -1)

    def lookahead_targets(self, ctx: Ctx) -> tuple[jax.Array, jax.Array]:
        """(tokens, counted), [B,N,P] each: x_{(j+1)P+i}, i.e. `future_targets` with k = i+1 at
        block j's last position (j+1)P-1."""
        p = self.cfg.block
        tokens, counted = zip(*(future_targets(ctx, k) for k in range(1, p + 1)), strict=True)
        at_last = lambda x_BTP: in_blocks(jnp.stack(x_BTP, -1), p, 0)[:, :, -1]
        return at_last(tokens), at_last(counted)

    def losses(self, s_BND: jax.Array, z_BND: jax.Array, ctx: Ctx, embed: Embed) -> Aux:
        """Lookahead (and latent) losses, their weighted sum as aux_loss, and metrics."""
        cfg = self.cfg
        tokens, counted = self.lookahead_targets(ctx)
        logits_BNPV = self.lookahead_logits(z_BND, embed)
        loss, accuracy = token_loss(logits_BNPV, tokens, counted)
        blocks = block_exact_match(logits_BNPV, tokens, counted)
        aux = {"lookahead_loss": loss, "lookahead_accuracy": accuracy}
        aux["lookahead_block_accuracy"] = blocks
        total = cfg.lookahead_weight * loss
        if self.latent is not None:
            aux["latent_loss"] = self.latent_loss(s_BND, z_BND, ctx)
            total = total + cfg.latent_weight * aux["latent_loss"]
        return aux | {"aux_loss": total}

    def latent_loss(self, s_BND: jax.Array, z_BND: jax.Array, ctx: Ctx) -> jax.Array:
        """mean SmoothL1(W_l z_j - sg(s_{j+1})) over pairs whose block j+1 lies in the document
        of block j's last token."""
        seg_BNP, last_BN = self.block_segments(ctx)
        real_NP = self.real(ctx.segment_ids.shape[1])
        inside_BNP = ~real_NP[None, 1:] | (seg_BNP[:, 1:] == last_BN[:, :-1, None])
        counted_BN = jnp.all(inside_BNP, axis=-1).astype(jnp.float32)
        pred_BND = self.latent(z_BND[:, :-1]).astype(jnp.float32)
        err_BN = jnp.mean(optax.huber_loss(pred_BND, jax.lax.stop_gradient(s_BND[:, 1:])), -1)
        return jnp.sum(err_BN * counted_BN) / jnp.maximum(jnp.sum(counted_BN), 1.0)


# ---- multi-token prediction baselines ---------------------------------------------------------


class ParallelMTPConfig(HeadBlocksConfig):
    """Gloeckle et al. 2024: head k predicts token t+k through its own block; head 1 is the LM
    head."""

    kind: Literal["mtp_parallel"] = "mtp_parallel"
    """Selects this head."""
    n_future: int = 4
    """Heads n, the LM head included (the paper's best on code: 4)."""
    mtp_weight: float = 1.0
    """Weight of the sum of the heads' losses for k >= 2 (1: the paper's plain sum)."""

    def check(self, model: ModelConfig) -> None:
        super().check(model)
        if self.n_future < 2:
            raise ValueError(
                f"model.head.n_future={self.n_future} must be at least 2 (head 1 is the LM head)"
            )
        if self.mtp_weight < 0:
            raise ValueError(f"model.head.mtp_weight={self.mtp_weight} must be >= 0")

    def build(self, model: ModelConfig, *, rngs: nnx.Rngs) -> ParallelMTP:
        return ParallelMTP(self, model, rngs=rngs)

    def num_params(self, model: ModelConfig) -> int:
        """LM head + (n - 1) x (block + norm D)."""
        extra = (self.n_future - 1) * (self.block_params(model) + model.d_model)
        return LMHeadConfig().num_params(model) + extra

    def flops_per_token(self, model: ModelConfig, seq_len: int) -> float:
        """n unembeddings + (n - 1) blocks."""
        lm = LMHeadConfig().flops_per_token(model, seq_len)
        return self.n_future * lm + (self.n_future - 1) * self.block_flops(model, seq_len)


def summed_losses(
    logits: list[jax.Array], ctx: Ctx, offsets: dict[str, int]
) -> tuple[Aux, jax.Array]:
    """({name: {loss, accuracy}}, sum of the losses) of each logits [B,T,V] against the token
    its offset k ahead (`future_targets`), in the order of `offsets` ({name: k})."""
    aux, total = {}, jnp.zeros((), jnp.float32)
    for logits_BTV, (name, k) in zip(logits, offsets.items(), strict=True):
        loss, accuracy = token_loss(logits_BTV, *future_targets(ctx, k))
        aux[name] = {"loss": loss, "accuracy": accuracy}
        total = total + loss
    return aux, total


class ParallelMTP(nnx.Module):
    """Next-token logits from the LM head; heads 2..n only add losses (see the module
    docstring)."""

    def __init__(self, cfg: ParallelMTPConfig, model: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.lm = LMHead(model, rngs=rngs)
        extra = range(cfg.n_future - 1)
        self.trunks = nnx.List([CausalBlock(cfg, model, rngs=rngs) for _ in extra])
        self.norms = nnx.List([rms_norm(model, rngs=rngs) for _ in extra])

    def __call__(self, h_BTD: jax.Array, ctx: Ctx, *, embed: Embed) -> tuple[jax.Array, Aux]:
        logits_BTV, _ = self.lm(h_BTD, ctx, embed=embed)
        if ctx.targets is None:
            return logits_BTV, {}
        with jax.named_scope("mtp_parallel"):
            logits = self.future_logits(h_BTD, ctx, embed)
            aux, total = summed_losses(
                logits, ctx, {f"offset{k}": k for k in range(2, 2 + len(logits))}
            )
        return logits_BTV, aux | {"aux_loss": self.cfg.mtp_weight * total}

    def future_logits(self, h_BTD: jax.Array, ctx: Ctx, embed: Embed) -> list[jax.Array]:
        """Logits [B,T,V] float32 of x_{t+k} for k = 2..n."""
        out = []
        for trunk, norm in zip(self.trunks, self.norms, strict=True):
            out.append(self.lm(norm(trunk(h_BTD, ctx)), ctx, embed=embed)[0])
        return out


class SequentialMTPConfig(HeadBlocksConfig):
    """DeepSeek-V3's MTP modules: module k reads the embedding of token t+k and predicts t+k+1."""

    kind: Literal["mtp_sequential"] = "mtp_sequential"
    """Selects this head."""
    depth: int = 1
    """Modules D (DeepSeek-V3: 1)."""
    mtp_weight: float = 0.3
    """lambda: the modules' mean loss is weighted lambda (DeepSeek-V3: 0.3, then 0.1)."""

    def check(self, model: ModelConfig) -> None:
        super().check(model)
        check_positive(self, "model.head.", ints=("depth",))
        if self.mtp_weight < 0:
            raise ValueError(f"model.head.mtp_weight={self.mtp_weight} must be >= 0")

    def build(self, model: ModelConfig, *, rngs: nnx.Rngs) -> SequentialMTP:
        return SequentialMTP(self, model, rngs=rngs)

    def num_params(self, model: ModelConfig) -> int:
        """LM head + D x (three norms 3 D + M_k 2 D D + block)."""
        d = model.d_model
        per_module = 3 * d + 2 * d * d + self.block_params(model)
        return LMHeadConfig().num_params(model) + self.depth * per_module

    def flops_per_token(self, model: ModelConfig, seq_len: int) -> float:
        """(1 + D) unembeddings + D x (M_k + block)."""
        lm = LMHeadConfig().flops_per_token(model, seq_len)
        module = 6 * 2 * model.d_model**2 + self.block_flops(model, seq_len)
        return (1 + self.depth) * lm + self.depth * module


class SequentialMTP(nnx.Module):
    """Next-token logits from the LM head; D chained modules only add losses (see the module
    docstring)."""

    def __init__(self, cfg: SequentialMTPConfig, model: ModelConfig, *, rngs: nnx.Rngs):
        d, modules = model.d_model, range(cfg.depth)
        self.cfg = cfg
        self.lm = LMHead(model, rngs=rngs)
        self.h_norms = nnx.List([rms_norm(model, rngs=rngs) for _ in modules])
        self.e_norms = nnx.List([rms_norm(model, rngs=rngs) for _ in modules])
        proj = lambda: linear(model, 2 * d, d, ("head_in", "embed"), rngs=rngs)
        self.projections = nnx.List([proj() for _ in modules])
        self.trunks = nnx.List([CausalBlock(cfg, model, rngs=rngs) for _ in modules])
        self.out_norms = nnx.List([rms_norm(model, rngs=rngs) for _ in modules])

    def __call__(self, h_BTD: jax.Array, ctx: Ctx, *, embed: Embed) -> tuple[jax.Array, Aux]:
        logits_BTV, _ = self.lm(h_BTD, ctx, embed=embed)
        if ctx.targets is None:
            return logits_BTV, {}
        with jax.named_scope("mtp_sequential"):
            logits = self.module_logits(h_BTD, ctx, embed)
            aux, total = summed_losses(
                logits, ctx, {f"depth{k}": k + 1 for k in range(1, 1 + len(logits))}
            )
        return logits_BTV, aux | {"aux_loss": self.cfg.mtp_weight / self.cfg.depth * total}

    def module_logits(self, h_BTD: jax.Array, ctx: Ctx, embed: Embed) -> list[jax.Array]:
        """Logits [B,T,V] float32 of module k = 1..D, predicting x_{t+k+1}."""
        out, modules = (
            [],
            zip(
                self.h_norms,
                self.e_norms,
                self.projections,
                self.trunks,
                self.out_norms,
                strict=True,
            ),
        )
        for k, (h_norm, e_norm, proj, trunk, out_norm) in enumerate(modules, start=1):
            e_BTD = embed(future_targets(ctx, k)[0])  # Emb(x_{t+k})
            both = jnp.concatenate([h_norm(h_BTD), e_norm(e_BTD).astype(h_BTD.dtype)], -1)
            h_BTD = trunk(proj(both), ctx)
            out.append(self.lm(out_norm(h_BTD), ctx, embed=embed)[0])
        return out
