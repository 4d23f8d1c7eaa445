"""The official Megalodon presets (configs/megalodon/mega*.yaml): our parameter count equals the
official model's, counted here from the official modules' parameter shapes, and rounds to the
published size; the built model (abstract, nothing allocated) has that many parameters."""

from __future__ import annotations

import math
from pathlib import Path

import jax
import pytest
from flax import nnx
from menagerie.arch import MegalodonConfig, build
from menagerie.train.config import load_config

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "megalodon"

# ModelStore in XuezheMax/megalodon megalodon/model/mega.py @ cff8ba5, as ModelConf keywords,
# with the published size at vocab 32000 (../shared/references/megalodon.md) and its rounding.
OFFICIAL = {
    "mega200M": (
        dict(
            num_layers=12, model_dim=1024, num_heads=1, z_dim=256, value_dim=2048,
            ffn_hidden_dim=2560, chunk_size=2048, norm_num_groups=32,
        ),
        "220.6M",
    ),
    "mega1.3B": (
        dict(
            num_layers=24, model_dim=2048, num_heads=2, z_dim=512, value_dim=4096,
            ffn_hidden_dim=4864, chunk_size=2048, norm_num_groups=64,
        ),
        "1.343B",
    ),
    "mega7.3B": (
        dict(
            num_layers=32, model_dim=4096, num_heads=4, z_dim=1024, value_dim=8192,
            ffn_hidden_dim=8192, chunk_size=2048, norm_num_groups=64, swiglu=True,
        ),
        "7.386B",
    ),
}  # fmt: skip
# ModelConf defaults the presets keep (megalodon/config.py).
MODEL_CONF_DEFAULTS = dict(
    cema_ndim=16,
    swiglu=False,
    share_emb=False,
    norm_affine=True,
    rescale_nffn=False,
    scale_emb=False,
    rope_base=None,  # RotaryEmbedding: None means 10000
)
VOCAB = 32000


def official_shapes(conf: dict, vocab: int) -> dict[str, tuple[int, ...]]:
    """Every parameter of the official `Mega(ModelConf(**conf))` at model-parallel size 1, by
    its state-dict name, with the shape its module's __init__ gives it. Buffers (TimestepNorm's
    prior_count/prior_mean/prior_logv at prior_count 0, RoPE's freqs) are not parameters; a
    shared output weight (share_emb) is one parameter in model.parameters()."""
    c = MODEL_CONF_DEFAULTS | conf
    d, z, e, n, f = c["model_dim"], c["z_dim"], c["value_dim"], c["cema_ndim"], c["ffn_hidden_dim"]
    assert c["norm_affine"]
    shapes = {"embed.weight": (vocab, d)}  # ParallelEmbedding
    for i in range(c["num_layers"]):
        m, ffn = f"layers.{i}.mega.", f"layers.{i}.nffn."
        shapes |= {
            # TimestepNorm(mdim, groups): weight, bias [D]
            m + "timenorm.weight": (d,),
            m + "timenorm.bias": (d,),
            # MultiHeadComplexEMA(mdim, ndim)
            m + "cema.alpha": (d, n, 1),
            m + "cema.delta": (d, n, 1),
            m + "cema.theta": (d, 1, 1),
            m + "cema.gamma": (d, n, 2),
            m + "cema.omega": (d, 1),
            # FusedRMSNorm(mdim, elementwise_affine=norm_affine); znorm has no affine
            m + "rmsnorm.weight": (d,),
            # Column/RowParallelLinear: weight [out, in]
            m + "wv.weight": (e, d),
            m + "wv.bias": (e,),
            m + "wz.weight": (z, d),
            m + "wz.bias": (z,),
            m + "wr.weight": (e, d),
            m + "wr.bias": (e,),
            m + "wh1.weight": (d, d),
            m + "wh1.bias": (d,),
            m + "wh2.weight": (d, e),  # bias=False
            m + "gamma": (2, z),
            m + "beta": (2, z),
            # NormalizedFeedForwardNetwork: FusedLayerNorm, fc1/fc2 (fc3 with swiglu), no biases
            ffn + "norm.weight": (d,),
            ffn + "norm.bias": (d,),
            ffn + "fc1.weight": (f, d),
            ffn + "fc2.weight": (d, f),
        }
        if c["swiglu"]:
            shapes[ffn + "fc3.weight"] = (f, d)
        if c["rescale_nffn"]:
            shapes[ffn + "alpha"] = (d,)
    # MegaOutputLayer: final TimestepNorm, output Linear without bias
    shapes |= {"output.final_norm.weight": (d,), "output.final_norm.bias": (d,)}
    if not c["share_emb"]:
        shapes["output.output.weight"] = (vocab, d)
    return shapes


def official_count(conf: dict, vocab: int = VOCAB) -> int:
    return sum(math.prod(s) for s in official_shapes(conf, vocab).values())


def published(count: int, label: str) -> str:
    """`count` rounded as the label is: 220.6M (one decimal of millions), 1.343B (three of
    billions)."""
    if label.endswith("M"):
        return f"{count / 1e6:.1f}M"
    return f"{count / 1e9:.3f}B"


def preset_model(name: str) -> MegalodonConfig:
    cfg = load_config(PRESETS / f"{name}.yaml")  # the whole preset validates
    assert isinstance(cfg.model, MegalodonConfig)
    return cfg.model


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_preset_is_the_official_model_and_counts_its_parameters(name):
    conf, label = OFFICIAL[name]
    model = preset_model(name)
    c = MODEL_CONF_DEFAULTS | conf
    # The preset's fields are the official ones, under their official (or shared) names.
    assert (model.n_layers, model.d_model, model.tie_embeddings) == (
        c["num_layers"],
        c["model_dim"],
        c["share_emb"],
    )
    for key in ("num_heads", "z_dim", "value_dim", "ffn_hidden_dim", "cema_ndim", "chunk_size"):
        assert getattr(model, key) == c[key], key
    for key in ("norm_num_groups", "swiglu", "scale_emb", "rescale_nffn"):
        assert getattr(model, key) == c[key], key
    assert model.rope_base == 10000.0 and model.norm_eps == 1e-5
    assert model.chunk_size == 2048 and model.segment == 256  # the default CEMA segment cap
    # Vocabulary 32000 stays 32000: given explicitly, and as a 32000-token tokenizer rounds it.
    assert model.vocab_size == VOCAB and VOCAB % model.vocab_multiple == 0
    assert model.with_vocab(VOCAB).padded_vocab == VOCAB
    assert model.model_copy(update={"vocab_size": None}).with_vocab(VOCAB).padded_vocab == VOCAB

    ours, official = model.with_vocab(VOCAB).num_params(), official_count(conf)
    assert ours == official, (ours, official, ours - official)
    assert published(official, label) == label
    embeddings = 2 * VOCAB * c["model_dim"]  # untied: table and output layer
    assert model.num_params(include_embeddings=False) == official - embeddings


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_built_preset_has_the_official_parameters(name):
    """nnx.eval_shape: the real module tree, shapes only (nothing allocated, even at 7.4B)."""
    conf, _ = OFFICIAL[name]
    model = preset_model(name).with_vocab(VOCAB)
    abstract = nnx.eval_shape(lambda: build(model, rngs=nnx.Rngs(0)))
    params = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    assert sum(math.prod(p.shape) for p in params) == official_count(conf)
    # One leaf per official parameter (scanned layers stack the per-layer ones), with as many
    # entries as the official one (our CEMA drops the official unit axes).
    shapes = official_shapes(conf, VOCAB)
    layer0 = [s for k, s in shapes.items() if k.startswith("layers.0.")]
    rest = [s for k, s in shapes.items() if not k.startswith("layers.")]
    want = sorted(
        [math.prod(s) for s in rest] + [conf["num_layers"] * math.prod(s) for s in layer0]
    )
    assert sorted(math.prod(p.shape) for p in params) == want
