"""`menagerie import-hf MODEL_DIR --out RUN_DIR`: a local Hugging Face Llama checkpoint as a
menagerie run that `menagerie train` continues (continued pretraining) and `menagerie eval`
evaluates.

The run folder is what training writes: config.yaml (the Llama as a transformer-family model,
`export.hf.model_config`; data.tokenizer "byte" for our exported byte tokenizer, else the
folder's byte-level BPE copied to RUN_DIR/tokenizer.json; defaults and the caller's overrides
for the rest, e.g. data.source and train.steps) and checkpoint 0 saved by the `Checkpointer`
from the `Trainer`'s own state layout: the imported parameters, a fresh optimizer state, step 0.
Training resumes from it as from any checkpoint (the schedule starts at its step 0).

Every check that needs no writing runs first (config.json, tokenizer, every tensor and its
shape); RUN_DIR must be new or empty, and a failure after that removes what the import wrote.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from menagerie.train.errors import (
    CheckpointError,
    ConfigError,
    removed_on_failure,
    run_folder_io,
)

from . import hf
from .hf_tokenizer import read_tokenizer

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def import_hf(model_dir: str | Path, out: str | Path, overrides: list[str] = ()) -> Path:
    """Make the run folder `out` (new or empty) of the Llama checkpoint in `model_dir`;
    `overrides` are dotted config overrides (data.source=..., train.steps=...). Returns `out`."""
    from menagerie.train.checkpoint import CONFIG_FILE
    from menagerie.train.config import build_config
    from menagerie.train.trainer import Trainer

    model_dir, out = Path(model_dir), Path(out)
    config = _read_config(model_dir)
    model = hf.model_config(config, str(model_dir))
    tok = read_tokenizer(model_dir, config)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out '{out}' exists and is not an empty folder; choose a new one")
    tokenizer = "byte" if tok.kind == "byte" else str(out.absolute() / "tokenizer.json")
    raw = {"model": model, "data": {"tokenizer": tokenizer}}
    cfg = build_config(raw, [*overrides, f"run_dir={out}"])
    if cfg.data.tokenizer != tokenizer:
        raise ConfigError(
            f"data.tokenizer={cfg.data.tokenizer!r}: an imported run keeps the checkpoint's own "
            "tokenizer; drop that override"
        )
    params = _params(cfg.model, _read_tensors(model_dir))
    with removed_on_failure(out):
        with run_folder_io("write the imported run", out):
            out.mkdir(parents=True, exist_ok=True)
            if tok.json is not None:
                (out / "tokenizer.json").write_text(tok.json)
            # Before the Trainer: it reads the tokenizer file, and takes a folder that holds
            # this config.yaml for the run's own (it refuses other non-empty folders).
            (out / CONFIG_FILE).write_text(cfg.to_yaml())
        Trainer(cfg).save_initial(params)  # the Trainer prepares the data with the tokenizer
    return out


def _read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise ConfigError(f"'{model_dir}' is not a folder; pass a Hugging Face model folder")
    if not path.is_file():
        raise ConfigError(f"'{model_dir}' has no config.json: not a Hugging Face model folder")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read '{path}': {e}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"'{path}' is not a JSON object")
    return config


def _read_tensors(model_dir: Path) -> dict[str, Any]:
    """Every tensor of model.safetensors (or of the shards its index names), as jax arrays."""
    from safetensors import SafetensorError, safe_open

    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"cannot read '{index}': {e}") from None
        files = sorted(set(weight_map.values()))
    elif (model_dir / SAFETENSORS).is_file():
        files = [SAFETENSORS]
    else:
        other = [p.name for p in model_dir.glob("*.bin")] + [p.name for p in model_dir.glob("*.pt")]
        hint = (
            f" (it has {other[0]}: save it with save_pretrained(..., safe_serialization=True))"
            if other
            else ""
        )
        raise CheckpointError(f"'{model_dir}' has no {SAFETENSORS}{hint}")
    tensors = {}
    for name in files:
        path = model_dir / name
        if not path.is_file():
            raise CheckpointError(f"'{path}', named in {SAFETENSORS_INDEX}, is missing")
        try:
            with safe_open(str(path), framework="flax") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                    tensors[key] = f.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read '{path}': {e}") from None
    return tensors


def _params(model: Any, tensors: dict[str, Any]) -> dict:
    """Our parameters from the HF tensors, shaped like the built model's (before any write)."""
    from flax import nnx
    from menagerie import arch

    abstract = nnx.eval_shape(lambda: arch.build(model, rngs=nnx.Rngs(0)))
    return hf.from_hf_state_dict(model, tensors, nnx.to_pure_dict(nnx.split(abstract)[1]))


def describe(out: Path) -> str:
    """The CLI's closing line: where the run is and how to go on."""
    return (
        f"imported into {out} (checkpoint 0); continue with `menagerie train -c "
        f"{out / 'config.yaml'} train.steps=N`, evaluate with `menagerie eval run_dir={out}`"
    )


__all__ = ["describe", "import_hf"]
