"""menagerie.arch: model code (Flax NNX modules, their configs, parameter and FLOP counts).

cfg = ModelConfig(d_model=512).with_vocab(tokenizer.vocab_size)
model = build(cfg, rngs=nnx.Rngs(0))
out = model(tokens_BT, positions=positions_BT, segment_ids=segment_ids_BT)  # -> Output
"""

from __future__ import annotations

from collections.abc import Callable

from flax import nnx

from .config import ModelConfig
from .transformer import FFNS, HEADS, MIXERS, Output, Transformer

# family -> constructor(cfg, *, rngs); new architectures (megalodon, ...) register here.
FAMILIES: dict[str, Callable[..., nnx.Module]] = {"transformer": Transformer}


def build(cfg: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """Build the model for `cfg.family`; `cfg.vocab_size` must be resolved (`with_vocab`)."""
    if cfg.vocab_size is None:
        raise ValueError(
            "model.vocab_size is None; call cfg.with_vocab(tokenizer_vocab_size) before build()"
        )
    return FAMILIES[cfg.family](cfg, rngs=rngs)


__all__ = ["FAMILIES", "FFNS", "HEADS", "MIXERS", "ModelConfig", "Output", "Transformer", "build"]
