"""The official Memory Mosaics presets (configs/mosaics/*.yaml): each is the official run's
model, by the official `StackAssoMem` keyword arguments our exporter writes, and its parameter
count equals the official module's, counted here from the official state dict's shapes (the
naive StackAssoMem, facebookresearch/MemoryMosaics @ 1fff63b); the optimizer is the run's."""

from __future__ import annotations

import math
from pathlib import Path

import jax
import pytest
from flax import nnx
from menagerie.arch import MosaicsConfig, build
from menagerie.export.mosaics import official_config
from menagerie.train.config import load_config

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "mosaics"

# The official runs' model arguments (train_babistories.sh; nanoMosaics'
# train_shakespeare_char.py) and the optimizer fields they set, at their vocabularies
# (GPT-2's 50257, padded to the official 50304; bytes for the character-level run).
OFFICIAL = {
    "babistories": (
        dict(n_layer=12, n_head=12, n_embd=768, pmem_size=2688, pmem_count=1, weight_tying=True),
        dict(lr=5e-3, b1=0.9, b2=0.95, weight_decay=0.1, clip_norm=1.0, warmup_steps=2000),
        dict(seq_len=512, batch_size=512, steps=80000),
        50257,
    ),
    "shakespeare": (
        dict(n_layer=6, n_head=6, n_embd=384, pmem_size=1344, pmem_count=1, weight_tying=True),
        dict(lr=1e-3, b1=0.9, b2=0.99, warmup_steps=100),
        dict(seq_len=256, batch_size=64, steps=5000),
        257,
    ),
    "regbench": (
        dict(n_layer=2, n_head=8, n_embd=128, pmem_size=448, pmem_count=1, weight_tying=True),
        dict(lr=5e-4, weight_decay=0.1, clip_norm=1.0),
        dict(seq_len=64),
        None,  # the synthetic task's vocabulary
    ),
}  # fmt: skip


def _task_vocab(cfg) -> int:
    from menagerie.data.synthetic import TaskTokenizer

    return TaskTokenizer(cfg.data.task).vocab_size


def official_shapes(kw: dict, vocab: int) -> dict[str, tuple[int, ...]]:
    """Every parameter of the official naive `StackAssoMem(**kw)` by state-dict name: the
    shapes its modules' __init__ give (weight tying makes head.weight the embedding, counted
    once, as model.parameters() does)."""
    c, nh, p = kw["n_embd"], kw["n_head"], kw["pmem_size"]
    shapes = {"emb.weight": (vocab, c), "ln_out.weight": (c,)}
    for i in range(kw["n_layer"]):
        b = f"blocks.{i}."
        for mem in ("attn", "pmem"):
            for scalar in ("leaky_key_beta", "kernel_beta", "value_beta"):
                shapes[f"{b}{mem}.{scalar}"] = (nh,)
            shapes[f"{b}{mem}.k_featurizer.conv.weight"] = (c, c, 1)
            shapes[f"{b}{mem}.c_proj.weight"] = (c, c)
        shapes[f"{b}attn.v_featurizer.coef"] = (nh,)
        shapes[f"{b}attn.v_featurizer.linear.weight"] = (c, c)
        for j in range(kw["pmem_count"]):
            shapes[f"{b}pmem.pmem.M_k{j}"] = (1, nh, p, c // nh)
            shapes[f"{b}pmem.pmem.M_v{j}"] = (1, nh, p, c // nh)
        shapes[f"{b}ln1.weight"] = shapes[f"{b}ln2.weight"] = (c,)
    if not kw["weight_tying"]:
        shapes["head.weight"] = (vocab, c)
    return shapes


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_preset_is_the_official_run(name):
    """The preset's official arguments, optimizer and schedule are the run's, and num_params
    (and the built model, abstractly) equal the official module's count. Catches: a preset
    edited away from the official run (heads, pmem size or count, tying, lr, betas), the
    persistent memory's size not derived as 3.5 d, a count that drifts from the official."""
    model_kw, optim_kw, train_kw, vocab = OFFICIAL[name]
    cfg = load_config(PRESETS / f"{name}.yaml")
    assert isinstance(cfg.model, MosaicsConfig)
    model = cfg.model.with_vocab(vocab or _task_vocab(cfg))
    got = official_config(model, block_size=cfg.train.seq_len)
    assert {k: got[k] for k in model_kw} == model_kw
    assert got["block_size"] == train_kw["seq_len"]
    assert {k: getattr(cfg.optim, k) for k in optim_kw} == pytest.approx(optim_kw)
    assert {k: getattr(cfg.train, k) for k in train_kw} == train_kw
    official = sum(math.prod(s) for s in official_shapes(got, got["vocab_size"]).values())
    assert model.num_params() == official
    abstract = nnx.eval_shape(lambda: build(model, rngs=nnx.Rngs(0)))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))) == official


def test_babistories_pads_gpt2_to_the_official_vocabulary():
    """GPT-2's 50257 tokens give the official table of 50304 rows (vocab_multiple 128)."""
    cfg = load_config(PRESETS / "babistories.yaml")
    assert cfg.model.with_vocab(50257).padded_vocab == 50304


@pytest.mark.parametrize("name", ["small", "tiny"])
def test_cpu_presets_load_and_count(name):
    """The CPU presets validate and num_params is the built model's."""
    model = load_config(PRESETS / f"{name}.yaml").model.with_vocab(257)
    abstract = nnx.eval_shape(lambda: build(model, rngs=nnx.Rngs(0)))
    assert (
        sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))) == model.num_params()
    )
