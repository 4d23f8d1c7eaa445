"""The pure functions jit compiles: the train step (with gradient accumulation) and the eval step.

State is one pytree, `{"step", "params", "opt_state", "bad_steps", "skipped"}`; parameters are a
pure dict (what `nnx.State.to_pure_dict` gives), merged into the model inside the step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from menagerie.arch import Ctx
from menagerie.arch.parts import UpdateRule

Batch = dict[str, jax.Array]


def token_losses(logits_BTV: jax.Array, targets_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token negative log-likelihood and log-partition, both float32 [B, T]."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    logz_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return logz_BT - target_logit_BT, logz_BT


def all_finite(tree: Any) -> jax.Array:
    """Whether every float in `tree` is finite: a bool scalar (one fused pass per leaf)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    if not leaves:
        return jnp.array(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _forward(graphdef: nnx.GraphDef, params: Any, batch: Batch, step=None, training=False):
    """The model on a batch, with the whole call context (targets and mask for heads that learn
    from them, the step for schedules inside parts)."""
    model = nnx.merge(graphdef, params)
    ctx = Ctx(
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
        step=step,
        targets=batch["targets"],
        loss_mask=batch["loss_mask"],
        deterministic=not training,
    )
    return model(batch["tokens"], ctx)


def _microbatches(batch: Batch, n: int) -> Batch:
    """[B, ...] -> [n, B/n, ...], microbatch m = rows m, m+n, m+2n, ... so that each microbatch
    spreads over every data-parallel device (rows are sharded contiguously)."""

    def split(x):
        return x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def make_train_step(
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    microbatches: int,
    z_loss: float,
    clip_norm: float | None,
    update_rules: Sequence[tuple[Any, UpdateRule]] = (),
) -> Callable[[dict, Batch], tuple[dict, dict]]:
    """The train step. `update_rules`: (mask, rule) pairs, a mask being a pytree of Python bools
    like the parameters; the updates of the parameters marked True follow the rule."""

    def loss_fn(params, mb: Batch, n_tokens: jax.Array, step: jax.Array):
        out = _forward(graphdef, params, mb, step, training=True)
        nll_BT, logz_BT = token_losses(out.logits, mb["targets"])
        mask_BT = mb["loss_mask"]
        nll_sum = jnp.sum(nll_BT * mask_BT)
        z_sum = jnp.sum(jnp.square(logz_BT) * mask_BT)
        aux = out.aux_loss.astype(jnp.float32) / microbatches
        total = (nll_sum + z_loss * z_sum) / n_tokens + aux
        model_metrics = {k: v.astype(jnp.float32) / microbatches for k, v in out.metrics.items()}
        return total, (nll_sum, z_sum, aux, model_metrics)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: dict, batch: Batch) -> tuple[dict, dict]:
        params, step = state["params"], state["step"]
        n_tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
        grads, (nll_sum, z_sum, aux, mm) = _summed_grads(
            grad_fn, params, batch, (n_tokens, step), microbatches
        )
        grad_norm = optax.tree.norm(grads)
        loss = nll_sum / n_tokens
        grads = _clipped(grads, grad_norm, clip_norm)
        updates, new_opt = optimizer.update(grads, state["opt_state"], params)
        updates = apply_update_rules(updates, update_rules, step)
        new_params = optax.apply_updates(params, updates)
        ok = (
            jnp.isfinite(loss)
            & jnp.isfinite(grad_norm)
            & jnp.isfinite(aux)
            & all_finite((new_params, new_opt))
        )
        new_state = _guarded_update(state, new_params, new_opt, ok)
        metrics = {
            "loss": loss,
            "z_loss": z_sum / n_tokens,
            "aux_loss": aux,
            "grad_norm": grad_norm,
            # The schedule advances once per applied update: this step's lr is at
            # (steps so far - skipped steps).
            "lr": schedule(state["step"] - state["skipped"]),
            "tokens": n_tokens,
            "finite": ok,
            "bad_steps": new_state["bad_steps"],
            "skipped": new_state["skipped"],
            **{f"model/{k}": v for k, v in mm.items()},
        }
        return new_state, metrics

    return train_step


def _summed_grads(grad_fn, params, batch: Batch, args: tuple, microbatches: int):
    """(gradients, loss parts) of the whole batch: `grad_fn(params, batch, *args)`, or with
    microbatches its values summed over them in a scan (one microbatch's activations live)."""
    if microbatches == 1:
        (_, parts), grads = grad_fn(params, batch, *args)
        return grads, parts
    mbs = _microbatches(batch, microbatches)
    first = jax.tree.map(lambda x: x[0], mbs)
    (_, parts_shape), _ = jax.eval_shape(grad_fn, params, first, *args)
    zeros = (
        jax.tree.map(jnp.zeros_like, params),
        jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), parts_shape),
    )

    def body(acc, mb):
        (_, parts), grads = grad_fn(params, mb, *args)
        return jax.tree.map(jnp.add, acc, (grads, parts)), None

    return jax.lax.scan(body, zeros, mbs)[0]


def _clipped(grads: Any, grad_norm: jax.Array, clip_norm: float | None) -> Any:
    """`grads` scaled to global norm at most `clip_norm` (None: as they are)."""
    if clip_norm is None:
        return grads
    scale = jnp.minimum(1.0, clip_norm / jnp.maximum(grad_norm, 1e-12))
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)


def _guarded_update(state: dict, new_params: Any, new_opt: Any, ok: jax.Array) -> dict:
    """The next state. A step that is not `ok` (a non-finite loss or gradient, or an update that
    leaves a parameter or an optimizer moment non-finite: finite gradients can overflow it) is
    skipped: params and optimizer state stay, and it counts in `bad_steps` and `skipped`."""

    def keep_if_ok(new, old):
        return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)

    return {
        "step": state["step"] + 1,
        "params": keep_if_ok(new_params, state["params"]),
        "opt_state": keep_if_ok(new_opt, state["opt_state"]),
        "bad_steps": jnp.where(ok, 0, state["bad_steps"] + 1),
        "skipped": state["skipped"] + jnp.where(ok, 0, 1),
    }


def apply_update_rules(
    updates: Any, rules: Sequence[tuple[Any, UpdateRule]], step: jax.Array
) -> Any:
    """`updates` with each (mask, rule) of `rules` applied to the parameters its mask marks:
    times `rule.scale`, and zero once `step` >= `rule.frozen_from` (after the optimizer, so no
    momentum or weight decay moves a frozen parameter)."""
    for mask, rule in rules:
        factor = jnp.float32(rule.scale)
        if rule.frozen_from is not None:
            factor = jnp.where(step >= rule.frozen_from, 0.0, factor)

        def scaled(u, marked, factor=factor):
            return (u * factor.astype(u.dtype)) if marked else u

        updates = jax.tree.map(scaled, updates, mask)
    return updates


def exact_match_counts(
    pred_BT: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array, prefix: str = ""
) -> dict[str, jax.Array]:
    """Exact match of predicted tokens on the tokens where mask_BT > 0, as float32 sums:
    `correct` (tokens predicted right), `seq_correct` (rows with a masked token, all of them
    right) and `sequences` (rows with a masked token); names start with `prefix`."""
    counted_BT = mask_BT > 0
    hit_BT = (pred_BT == targets_BT) & counted_BT
    has_B = jnp.any(counted_BT, axis=-1)
    all_right_B = has_B & (jnp.sum(hit_BT, -1) == jnp.sum(counted_BT, -1))
    return {
        f"{prefix}correct": jnp.sum(hit_BT, dtype=jnp.float32),
        f"{prefix}seq_correct": jnp.sum(all_right_B, dtype=jnp.float32),
        f"{prefix}sequences": jnp.sum(has_B, dtype=jnp.float32),
    }


def greedy_answers(graphdef: nnx.GraphDef, params: Any, batch: Batch, step=None) -> jax.Array:
    """[B,T] the model's argmax token at each position when it decodes the answers (the loss
    mask's targets) greedily, all rows at once: every answer that a row reads back as input
    (the input after an answer position, equal to its target: teacher forcing) is replaced by
    the model's own earlier prediction. An input that is not the answer (a teacherless row's
    `$`) stays. One forward pass per position from the batch's first answer on."""
    tokens_BT, targets_BT = batch["tokens"], batch["targets"]
    answer_BT = batch["loss_mask"] > 0
    read_back_BT = answer_BT[:, :-1] & (tokens_BT[:, 1:] == targets_BT[:, :-1])
    read_back_BT = jnp.pad(read_back_BT, ((0, 0), (0, 1)))
    last = tokens_BT.shape[1] - 1

    def position(t, carry):
        inputs_BT, pred_BT = carry
        logits_BTV = _forward(graphdef, params, batch | {"tokens": inputs_BT}, step).logits
        pred_B = jnp.argmax(logits_BTV[:, t], axis=-1).astype(tokens_BT.dtype)
        nxt = jnp.minimum(t + 1, last)
        inputs_BT = inputs_BT.at[:, nxt].set(
            jnp.where(read_back_BT[:, t], pred_B, inputs_BT[:, nxt])
        )
        return inputs_BT, pred_BT.at[:, t].set(pred_B)

    first = jnp.argmax(jnp.any(answer_BT, axis=0))  # 0 when there is no answer
    carry = (tokens_BT, jnp.zeros_like(tokens_BT))
    return jax.lax.fori_loop(first, last + 1, position, carry)[1]


def make_eval_step(
    graphdef: nnx.GraphDef, token_bytes: jax.Array, *, greedy: bool = False
) -> Callable:
    """Sums over a batch (the model as at train `step`), on the tokens of its loss mask: nll,
    tokens, target bytes (bits per byte = nll / ln 2 / bytes) and the teacher-forced
    `exact_match_counts`; with `greedy` (a synthetic task's answers) also those of
    `greedy_answers`, prefixed "greedy_"; and the model's own metrics (a head's or a part's,
    "model/..."), with `batches` 1 to average them. `eval_report` turns the sums of many batches
    into metrics."""

    def eval_step(params: Any, batch: Batch, step: jax.Array) -> dict:
        out = _forward(graphdef, params, batch, step)
        nll_BT, _ = token_losses(out.logits, batch["targets"])
        targets_BT, mask_BT = batch["targets"], batch["loss_mask"]
        sums = {
            "nll": jnp.sum(nll_BT * mask_BT),
            "tokens": jnp.sum(mask_BT),
            "bytes": jnp.sum(token_bytes[targets_BT] * mask_BT),
            **exact_match_counts(jnp.argmax(out.logits, axis=-1), targets_BT, mask_BT),
            **{f"model/{k}": v for k, v in out.metrics.items()},
            "batches": jnp.float32(1.0),
        }
        if greedy:
            pred_BT = greedy_answers(graphdef, params, batch, step)
            sums |= exact_match_counts(pred_BT, targets_BT, mask_BT, prefix="greedy_")
        return sums

    return eval_step


def eval_report(sums: dict[str, float], *, exact_match: bool) -> dict[str, float]:
    """Metrics from the eval-step outputs summed over batches (a missing key counts 0): loss
    (mean nll per token) and tokens, then for text bits_per_byte; for a synthetic task
    (`exact_match`: the mask holds its answers, tokens without bytes) accuracy per answer token,
    sequence_accuracy (every answer of a sequence right) and sequences, teacher-forced and, when
    summed, decoded greedily (greedy_accuracy, greedy_sequence_accuracy); then the model's own
    metrics ("model/...", as summed over `batches`: their mean over batches)."""
    nll, tokens = sums.get("nll", 0.0), sums.get("tokens", 0.0)
    loss = nll / max(tokens, 1.0)
    batches = max(sums.get("batches", 0.0), 1.0)
    model = {k: v / batches for k, v in sums.items() if k.startswith("model/")}
    if not exact_match:
        bpb = nll / math.log(2) / max(sums.get("bytes", 0.0), 1.0)
        return {"loss": loss, "bits_per_byte": bpb, "tokens": tokens} | model
    sequences = sums.get("sequences", 0.0)
    report = {"loss": loss}
    for kind in ("", "greedy_"):
        if not kind or f"{kind}correct" in sums:
            report[f"{kind}accuracy"] = sums.get(f"{kind}correct", 0.0) / max(tokens, 1.0)
            right = sums.get(f"{kind}seq_correct", 0.0)
            report[f"{kind}sequence_accuracy"] = right / max(sequences, 1.0)
    return report | {"tokens": tokens, "sequences": sequences} | model
