"""The registry: every registered family and part is counted exactly and names every parameter
axis with a declared rule and role; choices dispatch on their key."""

from __future__ import annotations

import jax
import pydantic
import pytest
from flax import nnx
from menagerie.arch import (
    FFNConfig,
    HeadConfig,
    MixerConfig,
    ModelConfig,
    TransformerConfig,
    axes,
    build,
)
from menagerie.arch.config import upgrade_model_dict

SMALL = dict(vocab_size=96, d_model=32, n_layers=2)
SLOTS = {"mixer": MixerConfig, "ffn": FFNConfig, "head": HeadConfig}


def _variants():
    """Every family with its defaults, and the transformer with every registered part in each
    slot, tied and untied, scanned and looped."""
    for family, cls in sorted(ModelConfig.choices.items()):
        yield f"{family}", cls(**SMALL)
    for slot, base in SLOTS.items():
        for kind, part in sorted(base.choices.items()):
            for tied in (True, False):
                for scan in (True, False):
                    cfg = TransformerConfig(
                        **SMALL, tie_embeddings=tied, scan_layers=scan, **{slot: part()}
                    )
                    yield f"{slot}={kind}-tied{tied}-scan{scan}", cfg


VARIANTS = dict(_variants())


def _params(cfg):
    model = nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0)))
    return nnx.state(model, nnx.Param)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_num_params_equals_the_built_model(name):
    cfg = VARIANTS[name]
    leaves = nnx.to_flat_state(_params(cfg))
    total = sum(v.get_value().size for _, v in leaves)
    vocab_sized = sum(
        v.get_value().size for _, v in leaves if "vocab" in v.get_metadata()["out_sharding"]
    )
    assert cfg.num_params() == total
    assert cfg.num_params(include_embeddings=False) == total - vocab_sized


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_parameter_axis_is_declared_with_a_rule_and_a_role(name):
    declared = axes.all_axes()
    for path, var in nnx.to_flat_state(_params(VARIANTS[name])):
        names = var.get_metadata()["out_sharding"]
        assert len(names) == var.get_value().ndim, (path, names)
        for axis in names:
            assert axis in declared, (path, axis)
            assert declared[axis].role != "activation", (path, axis)
        # A matrix (decayed, projectable) has two non-stack axes and no vector axis: per-channel
        # tables such as Megalodon's CEMA alpha [embed, cema_ndim] are not matrices.
        dims = names[axes.stack_prefix(names) :]
        vector = any(declared[a].role == "vector" for a in dims)
        assert axes.is_matrix(names) == (len(dims) >= 2 and not vector), path


def test_undeclared_axis_is_an_error_not_a_replication():
    from menagerie.train import mesh as mesh_lib
    from menagerie.train.errors import ConfigError

    state = _params(VARIANTS["transformer"])
    state["final_norm"]["scale"].set_metadata(out_sharding=("no_such_axis",))
    with pytest.raises(ConfigError, match="undeclared logical axis 'no_such_axis'"):
        mesh_lib.logical_names(state)


def test_declaring_an_axis_twice_differently_is_an_error():
    axes.declare(axes.get("mlp"))  # identical: fine
    with pytest.raises(ValueError, match="declared twice"):
        axes.declare(axes.Axis("mlp", "feature", None))


def test_flops_per_token_is_the_sum_of_the_parts():
    cfg = TransformerConfig(**SMALL)
    per_layer = cfg.mixer.flops_per_token(cfg, 64) + cfg.ffn.flops_per_token(cfg, 64)
    expected = cfg.n_layers * per_layer + cfg.head.flops_per_token(cfg, 64)
    assert cfg.flops_per_token(64) == expected


def test_choices_dispatch_on_their_key():
    cfg = ModelConfig.model_validate({"d_model": 64, "family": "transformer", "ffn": "swiglu"})
    assert isinstance(cfg, TransformerConfig) and cfg.ffn.kind == "swiglu"
    cfg = TransformerConfig.model_validate({"mixer": {"n_heads": 8}})  # kind from the default
    assert cfg.mixer.kind == "attention" and cfg.mixer.n_heads == 8
    with pytest.raises(pydantic.ValidationError, match="unknown kind 'nope'"):
        TransformerConfig.model_validate({"ffn": {"kind": "nope"}})
    with pytest.raises(pydantic.ValidationError, match="Extra inputs"):
        TransformerConfig.model_validate({"ffn": {"kind": "swiglu", "n_heads": 3}})
    again = ModelConfig.model_validate(cfg.model_dump())
    assert again == cfg


def test_a_kind_cannot_be_registered_twice():
    with pytest.raises(TypeError, match="'swiglu' is taken"):

        class Impostor(FFNConfig):
            kind: str = "swiglu"


def test_old_flat_model_dicts_upgrade():
    old = {
        "family": "transformer",
        "d_model": 64,
        "n_heads": 4,
        "n_kv_heads": 2,
        "mlp_dim": 128,
        "attention_impl": "xla",
        "mixer": "attention",
        "ffn": "swiglu",
        "head": "lm",
    }
    cfg = ModelConfig.model_validate(upgrade_model_dict(old))
    assert (cfg.mixer.n_heads, cfg.mixer.n_kv_heads, cfg.ffn.hidden_dim) == (4, 2, 128)
    assert jax.tree.leaves(cfg.model_dump()) == jax.tree.leaves(
        TransformerConfig(
            d_model=64, mixer={"n_heads": 4, "n_kv_heads": 2}, ffn={"hidden_dim": 128}
        ).model_dump()
    )
