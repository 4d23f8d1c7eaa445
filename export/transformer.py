"""The transformer family for the plain-torch mirror (`export/torch_transformer.py`,
`--format torch`): its config.json and state dict from our config and parameters.

The mirror's names are our parameter paths with `blocks` -> `layers.{i}` and every array
renamed `weight` (kernels, norm scales, the embedding table), except `router_bias`; the head
is `head.weight`, absent when tied (the mirror's head is then the embedding's tensor). Our
kernels are [in..., out...]; torch `Linear` weights are [out, in] with the heads flattened
(q [H*Dh, D], o [D, H*Dh]). `PART_WEIGHTS` below is the whole map of a block.

Parts the mirror has: mixer attention; ffn swiglu, mlp, or lte over swiglu or mlp (any
routing); head lm, or a lookahead head (`arch/planner.py`) computed as at inference: the LM
head, after a conditioning planner's plan (`planner.*`: its layers, plan norm and W_c, its
gate folded in). The parameters only a head's training losses read are not written
(`TRAINING_ONLY`). `check` refuses other parts in one line. The attention's `impl` (xla, cudnn
or the Pallas kernel) and LTE's `impl` (the sparse kernel) choose how the same function is
computed, so they are not written (its `window` and `sinks` are: they change the function);
nor are the training-only fields (LTE's losses, router learning rate).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from menagerie.train.errors import ConfigError

# The parts the mirror has, by slot; LTE's inner FFN must be one of `INNER`.
PARTS = {
    "mixer": ("attention",),
    "ffn": ("swiglu", "mlp", "lte"),
    "head": ("lm", "planner", "mtp_parallel", "mtp_sequential"),
}
# A head's parameters that only its training losses read (the planner's lookahead decoder and
# latent map, the MTP heads' extra blocks): not exported. A planner without condition_lm adds
# its layers and plan norm (its plan then reaches nothing at inference).
TRAINING_ONLY = {
    "lm": (),
    "planner": ("offsets", "decoder_norm", "decoder_up", "decoder_down", "out_norm", "latent"),
    "mtp_parallel": ("trunks", "norms"),
    "mtp_sequential": ("h_norms", "e_norms", "projections", "trunks", "out_norms"),
}
INNER = ("swiglu", "mlp")
# Name parts kept float32 under --dtype bfloat16: the norm scales, and the router, whose
# threshold or top-k decision a bfloat16 rounding would flip.
SENSITIVE = ("norm", "router")

# mirror name under a part -> (our path under the part, number of input axes of our kernel;
# None: a vector, the same in both)
ATTENTION = {
    "q.weight": (("q", "kernel"), 1),
    "k.weight": (("k", "kernel"), 1),
    "v.weight": (("v", "kernel"), 1),
    "o.weight": (("o", "kernel"), 2),
}
FFNS = {
    "swiglu": {
        "gate.weight": (("gate", "kernel"), 1),
        "up.weight": (("up", "kernel"), 1),
        "down.weight": (("down", "kernel"), 1),
    },
    "mlp": {"up.weight": (("up", "kernel"), 1), "down.weight": (("down", "kernel"), 1)},
}
ROUTER = {"router.weight": (("router", "kernel"), 1), "router_bias": (("router_bias",), None)}
PREDICTOR_OUT = {"router_out.weight": (("router_out", "kernel"), 1)}  # dejavu's W2


def check(model: Any) -> None:
    """ConfigError (one line) naming the first part of `model` the mirror does not have."""
    have = "; ".join(f"{slot} {', '.join(kinds)}" for slot, kinds in PARTS.items())
    for slot, kinds in PARTS.items():
        kind = getattr(model, slot).kind
        if kind not in kinds:
            raise ConfigError(
                f"--format torch: this run's model.{slot}.kind is '{kind}', which the torch "
                f"transformer mirror does not have (it has {have}; lte over {', '.join(INNER)})"
            )
    if model.ffn.kind == "lte" and model.ffn.inner.kind not in INNER:
        raise ConfigError(
            f"--format torch: this run's model.ffn.inner.kind is '{model.ffn.inner.kind}', "
            f"which the torch transformer mirror's LTE does not wrap (it wraps {', '.join(INNER)})"
        )


def mirror_config(model: Any) -> dict[str, Any]:
    """config.json: the mirror's `TransformerConfig` fields of our model config (vocab_size is
    the padded table size)."""
    check(model)
    ffn, mixer = model.ffn, model.mixer
    out = {
        "vocab_size": model.padded_vocab,
        "d_model": model.d_model,
        "n_layers": model.n_layers,
        "n_heads": mixer.n_heads,
        "n_kv_heads": mixer.kv_heads,
        "head_dim": mixer.dim_head(model),
        "rope_theta": mixer.rope_theta,
        "norm_eps": model.norm_eps,
        "tie_embeddings": model.tie_embeddings,
        "ffn": ffn.kind,
        "ffn_hidden_dim": (ffn.inner if ffn.kind == "lte" else ffn).dim(model),
        "lte": None,
        "planner": planner_config(model) if conditions(model) else None,
        "window": mixer.window,
        "sinks": mixer.sinks,
    }
    if ffn.kind == "lte":
        out["lte"] = {
            "inner": ffn.inner.kind,
            "expert_size": ffn.expert_size,
            "routing": ffn.routing,
            "top_k": ffn.top_k,
            "predictor_rank": ffn.predictor_rank,
            "tau": ffn.tau,
            # as `arch.lte.LTE._hard` without a step: topk never routes hard
            "hard": ffn.hard_from_step is not None and ffn.routing != "topk",
            "all_experts": ffn.all_experts,
        }
    return out


def conditions(model: Any) -> bool:
    """Whether the head is a planner whose plan conditions the LM (the mirror's `Planner`)."""
    return model.head.kind == "planner" and model.head.condition_lm


def planner_config(model: Any) -> dict[str, Any]:
    """config.json's `planner`: the mirror's `PlannerConfig` fields of our planner head."""
    head = model.head
    attention = head.attention()
    return {
        "block": head.block,
        "layers": head.planner_layers,
        "n_heads": attention.n_heads,
        "n_kv_heads": attention.kv_heads,
        "head_dim": attention.dim_head(model),
        "rope_theta": attention.rope_theta,
        "hidden_dim": head.ffn().dim(model),
    }


def training_only(model: Any) -> tuple[str, ...]:
    """The head's parameter groups the export leaves out (`TRAINING_ONLY`)."""
    unused_plan = model.head.kind == "planner" and not conditions(model)
    return TRAINING_ONLY[model.head.kind] + (("layers", "plan_norm") if unused_plan else ())


def block_weights(ffn_map: dict) -> dict[str, tuple[tuple[str, ...], int | None]]:
    """mirror name under a block -> (our path under it, kernel input axes), for the attention
    mixer and an FFN of map `ffn_map`."""
    out = {"mixer_norm.weight": (("mixer_norm", "scale"), None)}
    out |= {f"mixer.{name}": (("mixer", *path), n) for name, (path, n) in ATTENTION.items()}
    out["ffn_norm.weight"] = (("ffn_norm", "scale"), None)
    out |= {f"ffn.{name}": (("ffn", *path), n) for name, (path, n) in ffn_map.items()}
    return out


def part_weights(model: Any) -> dict[str, tuple[tuple[str, ...], int | None]]:
    """mirror name under `layers.{i}.` -> (our path under a block, kernel input axes)."""
    ffn = model.ffn
    if ffn.kind == "lte":
        inner = {f"inner.{k}": (("inner", *p), n) for k, (p, n) in FFNS[ffn.inner.kind].items()}
        return block_weights(inner | ROUTER | (PREDICTOR_OUT if ffn.routing == "dejavu" else {}))
    return block_weights(FFNS[ffn.kind])


def head_weights(model: Any) -> dict[str, tuple[tuple[str, ...], int | None]]:
    """mirror name -> (our path, kernel input axes) of the head: the LM head's matrix when
    untied, and a conditioning planner's layers, plan norm and W_c (`mirror_state_dict` folds a
    gate g into it: the mirror's W_c is our g W_c)."""
    lm = ("head",) if model.head.kind == "lm" else ("head", "lm")
    out = {} if model.tie_embeddings else {"head.weight": ((*lm, "out", "kernel"), 1)}
    if conditions(model):
        for i in range(model.head.planner_layers):
            for name, (path, n) in block_weights(FFNS["swiglu"]).items():
                out[f"planner.layers.{i}.{name}"] = (("head", "layers", i, *path), n)
        out["planner.plan_norm.weight"] = (("head", "plan_norm", "scale"), None)
        out["planner.condition.weight"] = (("head", "condition", "kernel"), 1)
    return out


def mirror_state_dict(model: Any, params: dict) -> dict[str, np.ndarray]:
    """The mirror's `Transformer.state_dict()` of our `params` (a nested dict of arrays, as
    `LoadedRun.params`) as float32 numpy arrays, without `head.weight` when tied. ConfigError
    if `params` hold an array the map does not place (a part that grew a parameter)."""
    check(model)
    params = _map(lambda x: np.asarray(x, np.float32), params)
    used: set[tuple] = set()

    def take(path: tuple, n_in: int | None) -> np.ndarray:
        used.add(path)
        return _to_torch(_get(params, path), n_in)

    out = {"embed.weight": take(("embed", "table"), None)}
    blocks = part_weights(model)
    for i in range(model.n_layers):
        for name, (path, n_in) in blocks.items():
            out[f"layers.{i}.{name}"] = _to_torch(_layer_leaf(params, path, i, model), n_in)
            used.add(("blocks", *path))
    out["final_norm.weight"] = take(("final_norm", "scale"), None)
    out |= {name: take(path, n_in) for name, (path, n_in) in head_weights(model).items()}
    if conditions(model) and model.head.condition_gate:  # the mirror's W_c is our g W_c
        gate = take(("head", "condition_gate"), None)
        out["planner.condition.weight"] = out["planner.condition.weight"] * gate
    dropped = {("head", group) for group in training_only(model)}
    paths = (p for p in _paths(params, model) if p not in used and p[:2] not in dropped)
    left = sorted(".".join(map(str, p)) for p in paths)
    if left:
        raise ConfigError(
            f"--format torch: the mirror does not place {len(left)} parameter(s) of this run "
            f"(first: {left[0]}); the part has grown one that export/transformer.py does not map"
        )
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _to_torch(w: np.ndarray, n_in: int | None) -> np.ndarray:
    """Our [in..., out...] kernel as a torch weight [prod(out), prod(in)]; vectors as they are."""
    if n_in is None:
        return w
    return w.reshape(math.prod(w.shape[:n_in]), -1).T


def _layer_leaf(params: dict, path: tuple[str, ...], i: int, model: Any) -> np.ndarray:
    """Layer i's array at `path` (scanned stacks hold every layer in a leading axis)."""
    if model.scan_layers:
        return _get(params["blocks"], path)[i]
    return _get(params["blocks"][i], path)


def _paths(params: dict, model: Any):
    """Every array's path, a block's without its layer index (as `used` records them)."""
    for path in _leaf_paths(params):
        if path[0] == "blocks" and not model.scan_layers:
            path = (path[0], *path[2:])
        yield path


def _leaf_paths(tree: Any, prefix: tuple = ()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaf_paths(v, (*prefix, k))
    else:
        yield prefix


def _map(fn, tree: Any) -> Any:
    return {k: _map(fn, v) for k, v in tree.items()} if isinstance(tree, dict) else fn(tree)


def _get(tree: dict, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree
