"""Run config: defaults, presets, dotted overrides and one-line errors."""

from pathlib import Path

import pytest
import yaml
from menagerie.train.config import RunConfig, build_config, load_config
from menagerie.train.errors import ConfigError
from menagerie.train.sweep import plan, read_sweep

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_defaults_validate_and_round_trip_through_yaml():
    cfg = RunConfig()
    again = build_config(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


SWEEPS = CONFIGS / "sweeps"  # sweep files, not run configs
PRESETS = sorted(p for p in CONFIGS.rglob("*.yaml") if SWEEPS not in p.parents)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_loads(preset):
    load_config(preset)


@pytest.mark.parametrize("sweep", sorted(SWEEPS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_sweep_file_plans(sweep, tmp_path):
    """Every run of every sweep file builds and checks as a run config (a sweep whose arm or
    size no longer loads, after a preset or a field changed, fails here, not hours in)."""
    runs, _ = plan(read_sweep(sweep), tmp_path)
    assert runs


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        None,
        [
            "train.steps=200",
            "optim.lr=1e-3",
            "model.tie_embeddings=false",
            "data.source=stdlib",
            "checkpoint.keep_every=null",
        ],
    )
    assert cfg.train.steps == 200 and isinstance(cfg.train.steps, int)
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.model.tie_embeddings is False
    assert cfg.checkpoint.keep_every is None


def test_override_beats_preset(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  steps: 10\n  batch_size: 4\n")
    cfg = load_config(p, ["train.steps=20"])
    assert (cfg.train.steps, cfg.train.batch_size) == (20, 4)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["train.stesp=10"], "did you mean 'steps'"),
        (["optimizer.lr=1"], "did you mean 'optim'"),
        (["model.d_modle=64"], "did you mean 'd_model'"),
        (["train.steps=abc"], "train.steps"),
        (["train.steps=0"], "train.steps=0 must be > 0"),
        (["optim.lr=-1"], "optim.lr=-1.0 must be > 0"),
        (["model.d_model=100", "model.mixer.n_heads=3"], "n_heads"),
        (["model.mixer.n_heads=4", "model.mixer.n_kv_heads=3"], "n_kv_heads"),
        (["model.n_heads=4"], "model.n_heads -> model.mixer.n_heads"),
        (["model.mlp_dim=64"], "model.mlp_dim -> model.ffn.hidden_dim"),
        (["model.mixer.n_hedas=4"], "did you mean 'n_heads'"),
        (["model.ffn.kind=swiglo"], "did you mean 'swiglu'"),
        (["optim.name=galore", "optim.rnak=4"], "did you mean 'rank'"),
        (["optim.name=adamw", "optim.rank=4"], "unknown config key 'optim.rank'"),
        (["optim.lr=.nan"], "optim.lr"),
        (["optim.weight_decay=-0.1"], "optim.weight_decay"),
        (["train.batch_size=10", "train.microbatches=3"], "does not divide"),
        (["mesh.data=-1", "mesh.fsdp=-1"], "only one mesh axis"),
        (["train=5"], "is a section"),
        (["steps"], "key.sub=value"),
        (["optim.schedule=linear"], "optim.schedule"),
    ],
)
def test_bad_config_is_one_clear_line(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    msg = str(info.value)
    assert fragment in msg, msg
    assert "\n" not in msg


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  steps: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(p)


def test_overrides_are_parsed_by_the_field_type():
    # String fields take the text as typed: no YAML comments, octals or yes/no booleans.
    cfg = load_config(None, ["run_dir=runs/exp #3", "data.source=yes", "data.text_field=0123"])
    assert (cfg.run_dir, cfg.data.source, cfg.data.text_field) == ("runs/exp #3", "yes", "0123")
    assert load_config(None, ["data.cache_dir=null"]).data.cache_dir is None
    assert load_config(None, ["run_dir=null"]).run_dir == "null"  # not nullable: the text
    # Other fields are typed values; a YAML 1.1 boolean where a number is due is an error.
    for override in ("train.steps=yes", "train.steps=on", "model.n_layers=2.5"):
        with pytest.raises(ConfigError, match=override.split("=")[0]):
            load_config(None, [override])
    assert load_config(None, ["model.tie_embeddings=false"]).model.tie_embeddings is False
