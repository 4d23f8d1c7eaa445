"""Hugging Face Llama: the transformer family (attention, SwiGLU, LM head) as a folder that
`transformers.AutoModelForCausalLM.from_pretrained` loads as `LlamaForCausalLM`, and back.

Our baseline is HF's Llama: pre-RMSNorm blocks, SwiGLU, final RMSNorm, and RoPE in the
rotate-half layout (pairs (i, i + Dh/2), `arch.attention_ops.apply_rope`, as HF's
`rotate_half`), so q/k need no permutation (Meta's interleaved checkpoints do, see HF's
`convert_llama_weights_to_hf.py`). Only the layout of matrices differs: our kernels are
[in..., out...] (q [D,H,Dh], o [H,Dh,D]); torch `Linear` weights are [out, in] with the heads
flattened (q_proj [H*Dh, D], o_proj [D, H*Dh]). `LAYER` and `TOP` below are the whole map.
A lookahead head (`arch/planner.py`) whose inference output is its LM head's (the MTP heads, a
planner without condition_lm) exports as that LM head; its training-only modules are left out.

The folder: config.json (the Llama fields as transformers 4.x writes them; 5.x reads them too),
model.safetensors (metadata {"format": "pt"}, which transformers requires), generation_config.json
and the tokenizer files of `export.hf_tokenizer`. The embedding keeps its padding rows:
vocab_size is our `padded_vocab` (the tokenizer's size rounded up to `vocab_multiple`), so the
exported logits equal ours column for column; padding ids are never targets (training only
lowers their logits) and no text encodes to them, and generation_config.json lists them in
`suppress_tokens` so that `generate` never samples one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from menagerie.train.errors import CheckpointError, ConfigError

from .transformer import TRAINING_ONLY, conditions

FAMILIES = ("transformer",)
PARTS = {"mixer": "attention", "ffn": "swiglu", "head": "lm"}  # the parts Llama has

# HF name under model.layers.{i}. -> (our path under blocks, number of input axes of our kernel;
# None: a vector, the same in both).
LAYER = {
    "input_layernorm.weight": (("mixer_norm", "scale"), None),
    "self_attn.q_proj.weight": (("mixer", "q", "kernel"), 1),
    "self_attn.k_proj.weight": (("mixer", "k", "kernel"), 1),
    "self_attn.v_proj.weight": (("mixer", "v", "kernel"), 1),
    "self_attn.o_proj.weight": (("mixer", "o", "kernel"), 2),
    "post_attention_layernorm.weight": (("ffn_norm", "scale"), None),
    "mlp.gate_proj.weight": (("ffn", "gate", "kernel"), 1),
    "mlp.up_proj.weight": (("ffn", "up", "kernel"), 1),
    "mlp.down_proj.weight": (("ffn", "down", "kernel"), 1),
}
# HF name -> (our path); the embedding table is [V, D] in both, lm_head only when untied.
TOP = {
    "model.embed_tokens.weight": (("embed", "table"), None),
    "model.norm.weight": (("final_norm", "scale"), None),
    "lm_head.weight": (("head", "out", "kernel"), 1),
}


def lm_head_only(model: Any) -> bool:
    """Whether the head's inference output is its LM head's alone (the LM head, the MTP heads,
    a planner whose plan does not condition the LM): Llama's lm_head, the rest left out."""
    return model.head.kind in TRAINING_ONLY and not conditions(model)


def check(model: Any) -> None:
    """ConfigError naming the first part of `model` that LlamaForCausalLM cannot express."""
    for slot, kind in PARTS.items():
        got = getattr(model, slot).kind
        if got != kind and not (slot == "head" and lm_head_only(model)):
            parts = ", ".join(f"{s} {k}" for s, k in PARTS.items())
            raise ConfigError(
                f"--format hf writes Llama models ({parts}); this run's model.{slot}.kind is "
                f"'{got}', which LlamaForCausalLM cannot express"
            )
    if model.mixer.window is not None:
        raise ConfigError(
            f"--format hf writes Llama models, whose attention sees every earlier token; this "
            f"run's model.mixer.window is {model.mixer.window}; use --format torch"
        )


# ---------------------------------------------------------------------------- config


def hf_config(cfg: Any, eos_id: int, dtype: str) -> dict[str, Any]:
    """config.json of a run config `cfg` (a `RunConfig` of the transformer family)."""
    m = cfg.model
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": m.padded_vocab,
        "hidden_size": m.d_model,
        "intermediate_size": m.ffn.dim(m),
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.mixer.n_heads,
        "num_key_value_heads": m.mixer.kv_heads,
        "head_dim": m.mixer.dim_head(m),
        "hidden_act": "silu",
        "max_position_embeddings": cfg.train.seq_len,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.mixer.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": m.tie_embeddings,
        "bos_token_id": None,  # our documents start with no BOS token; each ends with EOS
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "initializer_range": m.init_std,
        "torch_dtype": dtype,
        "use_cache": True,
    }


def model_config(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The `model:` section of a run that holds the Llama of config.json `hf`; ConfigError (one
    line) for a model that is not a Llama or uses a feature ours does not have."""
    kind = hf.get("model_type")
    if kind != "llama":
        raise ConfigError(
            f"'{where}' holds a {kind!r} model (config.json model_type); import-hf reads Llama "
            "(LlamaForCausalLM) checkpoints only"
        )
    rope = hf.get("rope_parameters") or {}  # transformers 5.x
    act = hf.get("hidden_act", "silu")
    scaled = rope.get("rope_type", "default") != "default"
    unsupported = {  # name -> its value when ours cannot express it
        "hidden_act": act if act != "silu" else None,
        "attention_bias": hf.get("attention_bias") or None,
        "mlp_bias": hf.get("mlp_bias") or None,
        "rope_scaling": hf.get("rope_scaling") or (rope if scaled else None),
    }
    for name, value in unsupported.items():
        if value is not None:
            raise ConfigError(
                f"'{where}' is a Llama with {name}={value!r}, which menagerie's transformer does "
                "not have (it has SiLU, no biases, plain RoPE)"
            )
    try:
        heads = int(hf["num_attention_heads"])
        d = int(hf["hidden_size"])
        return {
            "family": "transformer",
            "vocab_size": int(hf["vocab_size"]),
            "d_model": d,
            "n_layers": int(hf["num_hidden_layers"]),
            "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
            "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
            "init_std": float(hf.get("initializer_range", 0.02)),
            "mixer": {
                "kind": "attention",
                "n_heads": heads,
                "n_kv_heads": int(hf.get("num_key_value_heads") or heads),
                "head_dim": int(hf.get("head_dim") or d // heads),
                "rope_theta": float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
            },
            "ffn": {"kind": "swiglu", "hidden_dim": int(hf["intermediate_size"])},
        }
    except KeyError as e:
        raise ConfigError(f"'{where}/config.json' has no {e.args[0]!r}; is it a Llama?") from None


# ---------------------------------------------------------------------------- weights


def _to_hf(w: np.ndarray, n_in: int | None) -> np.ndarray:
    """Our [in..., out...] kernel as a torch weight [prod(out), prod(in)]."""
    if n_in is None:
        return w
    return w.reshape(math.prod(w.shape[:n_in]), -1).T


def _layer(blocks: dict, i: int, stacked: bool) -> dict:
    """Layer i's parameter subtree (scanned stacks hold every layer in a leading axis)."""
    return _map(lambda x: x[i], blocks) if stacked else blocks[i]


def _map(fn: Callable, tree: Any) -> Any:
    return {k: _map(fn, v) for k, v in tree.items()} if isinstance(tree, dict) else fn(tree)


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def to_hf_state_dict(model: Any, params: dict) -> dict[str, np.ndarray]:
    """The `LlamaForCausalLM.state_dict()` of our `params` (a nested dict of arrays, as
    `LoadedRun.params`), as float32 numpy arrays; no lm_head.weight when tied."""
    params = _map(lambda x: np.asarray(x, np.float32), params)
    out = {}
    for name, (path, n_in) in TOP.items():
        if name == "lm_head.weight" and model.head.kind != "lm":  # a lookahead head's LM head
            path = ("head", "lm", *path[1:])
        if name != "lm_head.weight" or not model.tie_embeddings:
            out[name] = _to_hf(_get(params, path), n_in)
    for i in range(model.n_layers):
        layer = _layer(params["blocks"], i, model.scan_layers)
        for name, (path, n_in) in LAYER.items():
            out[f"model.layers.{i}.{name}"] = _to_hf(_get(layer, path), n_in)
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def from_hf_state_dict(model: Any, tensors: Mapping[str, Any], abstract: dict) -> dict:
    """Our parameters (a nested dict shaped like `abstract`, the model's pure-dict parameter
    shapes) from a Llama state dict `tensors` (name -> array, any float dtype); CheckpointError
    (one line) for a missing tensor, a shape that differs, or a tensor Llama does not have."""
    dtype = next(iter(_leaves(abstract))).dtype
    names = dict.fromkeys(n for n in TOP if n != "lm_head.weight" or not model.tie_embeddings)
    layers = [{} for _ in range(model.n_layers)]
    first = _map(lambda x: x.shape[1:], abstract["blocks"]) if model.scan_layers else None
    template = first or _map(lambda x: x.shape, abstract["blocks"][0])  # one layer's shapes
    out: dict = {}
    for name, (path, n_in) in TOP.items():
        if name in names:
            _set(out, path, _from_hf(tensors, name, _get(abstract, path).shape, n_in, dtype))
    for i, layer in enumerate(layers):
        for name, (path, n_in) in LAYER.items():
            full = f"model.layers.{i}.{name}"
            names[full] = None
            _set(layer, path, _from_hf(tensors, full, _get(template, path), n_in, dtype))
    out["blocks"] = (
        _stack(layers) if model.scan_layers else {i: layer for i, layer in enumerate(layers)}
    )
    extra = sorted(n for n in tensors if n not in names and not n.endswith("rotary_emb.inv_freq"))
    if extra and not (model.tie_embeddings and extra == ["lm_head.weight"]):
        raise CheckpointError(
            f"the checkpoint holds {len(extra)} tensor(s) a Llama of its config.json does not "
            f"have (first: {extra[0]}); it is not a plain Llama"
        )
    return out


def _from_hf(tensors: Mapping[str, Any], name: str, like: tuple, n_in: int | None, dtype) -> Any:
    """Tensor `name` in our layout: of shape `like` (an [in..., out...] kernel or a vector)."""
    import jax.numpy as jnp

    if name not in tensors:
        raise CheckpointError(
            f"the checkpoint has no tensor '{name}'; it is incomplete (or not a Llama of its "
            "config.json)"
        )
    t = tensors[name]
    want = like if n_in is None else (math.prod(like[n_in:]), math.prod(like[:n_in]))
    if tuple(t.shape) != tuple(want):
        raise CheckpointError(
            f"tensor '{name}' has shape {tuple(t.shape)}, but config.json implies {tuple(want)}"
        )
    t = jnp.asarray(t).astype(dtype)
    return t if n_in is None else t.T.reshape(like)


def _leaves(tree: Any):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree


def _stack(layers: list[dict]) -> dict:
    import jax
    import jax.numpy as jnp

    return jax.tree.map(lambda *xs: jnp.stack(xs), *layers)


# ---------------------------------------------------------------------------- the folder


def write(run: Any, out_dir: Path, dtype: str) -> None:
    """The `--format hf` export of a loaded run (`export.run.LoadedRun`) into `out_dir`."""
    import jax.numpy as jnp
    from safetensors.flax import save_file

    from .hf_tokenizer import write_tokenizer

    cfg, tok = run.cfg, run.tokenizer
    state = to_hf_state_dict(cfg.model, run.params)
    jdtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    save_file(
        {k: jnp.asarray(v, jdtype) for k, v in state.items()},
        str(out_dir / "model.safetensors"),
        metadata={"format": "pt"},
    )
    _write_json(out_dir / "config.json", hf_config(cfg, tok.eos_id, dtype))
    generation = {
        "eos_token_id": tok.eos_id,
        "suppress_tokens": list(range(tok.vocab_size, cfg.model.padded_vocab)) or None,
    }
    _write_json(out_dir / "generation_config.json", generation)
    write_tokenizer(tok, out_dir, cfg.train.seq_len)


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def reference_logits(out_dir: Path) -> Callable[[np.ndarray], np.ndarray]:
    """tokens [B,T] int -> logits [B,T,V] float32 numpy of the folder loaded by
    `transformers.AutoModelForCausalLM` in float32 on CPU (`--verify`)."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()  # stderr keeps to one line per error
    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = transformers.AutoModelForCausalLM.from_pretrained(out_dir, **{dtype_key: torch.float32})
    if type(model).__name__ != "LlamaForCausalLM":
        raise ConfigError(f"'{out_dir}' loads as {type(model).__name__}, not LlamaForCausalLM")
    model.eval()

    def logits(tokens_BT: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            ids = torch.from_numpy(np.asarray(tokens_BT, np.int64))
            return model(input_ids=ids).logits.float().numpy()

    return logits


def verify_requirements() -> None:
    """ConfigError unless the libraries `reference_logits` needs are installed."""
    import importlib.util

    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(
            f"--verify loads the export with transformers; install {' and '.join(missing)} "
            "(pip install torch transformers)"
        )
