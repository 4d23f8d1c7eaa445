"""menagerie.arch: model code (Flax NNX modules, their configs, parameter and FLOP counts).

    cfg = TransformerConfig(d_model=512, mixer=AttentionConfig(n_heads=8)).with_vocab(50257)
    model = build(cfg, rngs=nnx.Rngs(0))
    out = model(tokens_BT, Ctx.make(tokens_BT, segment_ids=segment_ids_BT))  # -> Output

Families subclass `ModelConfig` (key `family`), parts subclass a slot of `arch.parts` (key
`kind`); defining the class registers it. Importing this package registers the built-in ones.
"""

from __future__ import annotations

from typing import Any

from . import axes
from .attention import Attention, AttentionConfig
from .config import Choice, Config, ModelConfig
from .lm_head import LMHead, LMHeadConfig
from .lte import LTE, LTEConfig
from .megalodon import Megalodon, MegalodonConfig
from .mlp import MLP, MLPConfig
from .mosaics import (
    ContextMemory,
    ContextMemoryConfig,
    MemoryLevels,
    MemoryLevelsConfig,
    Mosaics,
    MosaicsConfig,
    PersistentMemory,
    PersistentMemoryConfig,
)
from .parts import Ctx, FFNConfig, HeadConfig, MixerConfig, Output, PartConfig
from .planner import (
    ParallelMTP,
    ParallelMTPConfig,
    Planner,
    PlannerConfig,
    SequentialMTP,
    SequentialMTPConfig,
)
from .swiglu import SwiGLU, SwiGLUConfig
from .transformer import Transformer, TransformerConfig


def build(cfg: ModelConfig, *, rngs: Any) -> Any:
    """Build the model of `cfg`'s family; `cfg.vocab_size` must be resolved (`with_vocab`)."""
    if cfg.vocab_size is None:
        raise ValueError(
            "model.vocab_size is None; call cfg.with_vocab(tokenizer_vocab_size) before build()"
        )
    return cfg.build(rngs=rngs)


__all__ = [
    "Attention",
    "AttentionConfig",
    "ContextMemory",
    "ContextMemoryConfig",
    "Choice",
    "Config",
    "Ctx",
    "FFNConfig",
    "HeadConfig",
    "LMHead",
    "LMHeadConfig",
    "LTE",
    "LTEConfig",
    "MLP",
    "MLPConfig",
    "Megalodon",
    "MegalodonConfig",
    "MemoryLevels",
    "MemoryLevelsConfig",
    "MixerConfig",
    "ModelConfig",
    "Mosaics",
    "MosaicsConfig",
    "Output",
    "ParallelMTP",
    "ParallelMTPConfig",
    "PartConfig",
    "PersistentMemory",
    "PersistentMemoryConfig",
    "Planner",
    "PlannerConfig",
    "SequentialMTP",
    "SequentialMTPConfig",
    "SwiGLU",
    "SwiGLUConfig",
    "Transformer",
    "TransformerConfig",
    "axes",
    "build",
]
