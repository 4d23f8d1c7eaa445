"""`menagerie export --format mosaics` (`export/mosaics.py`): Memory Mosaics in the official
format (the naive `StackAssoMem` of facebookresearch/MemoryMosaics), with the plain `torch.nn`
mirror `export/torch_mosaics.py` copied in as `modeling_mosaics.py` for `--verify`.

CI has no official code, so what the official module does is recorded in
`mosaics_state_dict.json`, made once from it (facebookresearch/MemoryMosaics @ 1fff63b, torch
2.13.0 CPU, float32) for two tiny configs (tied with 2 memory copies, untied with 1): its
constructor called with our `official_config`, its `state_dict()` names and shapes in order, and
its logits (`logits_only=True`) of fixed tokens with the state dict `official_random_state`
draws. The claims: our export has exactly those names and shapes; the recorded official logits
are ours with that state dict mapped into our model here, and `official_state_dict` maps it back
bit for bit; the mirror gives our logits within 1e-4; the CLI writes a folder that `--verify`
checks and the mirror loads strictly; refused configs get one line and nothing is written.

Parameters are random around the official initialisation (per-head scalars moved off their
init, LayerNorm scales off 1, coef uniform) so that a misplaced scalar moves the logits.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pydantic
import pytest
import torch  # torch is in the test extra: never skipped
import yaml
from flax import nnx
from menagerie import arch
from menagerie.arch.mosaics import MosaicsConfig
from menagerie.export import mosaics as mosaics_format
from menagerie.train.errors import ConfigError

from ..cli_testing import snapshot
from ..random_params import random_module
from .export_testing import (
    export_verified,
    our_logits,
    run_main,
    saved_run,
)

RECORD = Path(__file__).with_name("mosaics_state_dict.json")


def recorded() -> dict:
    return json.loads(RECORD.read_text())


def config_of(kwargs: dict, scan_layers: bool = True) -> MosaicsConfig:
    """Our config of the official `StackAssoMem` keyword arguments `kwargs`."""
    h = kwargs["n_head"]
    return MosaicsConfig(
        d_model=kwargs["n_embd"],
        n_layers=kwargs["n_layer"],
        vocab_size=kwargs["vocab_size"],
        vocab_multiple=1,
        tie_embeddings=kwargs["weight_tying"],
        scan_layers=scan_layers,
        mixer={"kind": "context_memory", "n_heads": h},
        ffn={
            "kind": "persistent_memory",
            "n_heads": h,
            "size": kwargs["pmem_size"],
            "copies": kwargs["pmem_count"],
        },
    )


def leak_signs(shape: tuple) -> np.ndarray:
    """-1 for the even heads, +1 for the odd: the official leak rate is 10 |leaky_key_beta|, so a
    negative one (training can make it so) must act as its absolute value."""
    return np.where(np.arange(shape[-1]) % 2 == 0, -1.0, 1.0)


def official_random_state(entries: list, tied: bool, seed: int) -> dict[str, np.ndarray]:
    """A float32 official state dict of the (name, shape) `entries`, random around the official
    init: per-head scalars at their init + N(0, 0.05^2) (leaky_key_beta of the even heads
    negated, `leak_signs`), coef U(0, 1), LayerNorm scales
    1 + N(0, 0.2^2), memories N(0, 1/hs), matrices N(0, 1/fan_in), the embedding N(0, 1/C)
    tied and N(0, 1) untied. Tied, head.weight is emb.weight. (The recorded official logits are
    of this draw: numpy's default_rng streams are stable across versions.)"""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in entries:
        shape = tuple(shape)
        if name == "head.weight" and tied:
            out[name] = out["emb.weight"]
            continue
        normal = rng.standard_normal(shape)
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "leaky_key_beta":
            value = leak_signs(shape) * (np.linspace(0.5, 5.0, shape[0]) / 10 + 0.05 * normal)
        elif leaf == "kernel_beta":
            value = 0.1 + 0.05 * normal
        elif leaf == "value_beta":
            value = -0.05 + 0.05 * normal
        elif leaf == "coef":
            value = rng.uniform(size=shape)
        elif len(shape) == 1:  # LayerNorm scales
            value = 1 + 0.2 * normal
        elif leaf.startswith(("M_k", "M_v")):
            value = normal / np.sqrt(shape[-1])
        elif name == "emb.weight":
            value = normal / np.sqrt(shape[1]) if tied else normal
        else:
            value = normal / np.sqrt(shape[1] * (shape[2] if len(shape) == 3 else 1))
        out[name] = value.astype(np.float32)
    return out


def from_official(cfg: MosaicsConfig, sd: dict) -> dict:
    """Our parameters (a pure dict) of an official state dict: written here, independently of
    `export.mosaics`, from the official module's layouts (torch [out, in] weights, Conv1d of
    kernel 1, channel h * hs + d)."""
    d, h = cfg.d_model, cfg.mixer.n_heads
    hs = d // h

    def in_heads(w):  # [out, in] -> [D, H, hs]
        return w.T.reshape(d, h, hs)

    def out_heads(w):  # [out, in] -> [H, hs, D]
        return w.T.reshape(h, hs, d)

    def keys(prefix):
        return {
            "wk": {"kernel": in_heads(sd[f"{prefix}.k_featurizer.conv.weight"][:, :, 0])},
            "leaky_key_beta": sd[f"{prefix}.leaky_key_beta"],
            "kernel_beta": sd[f"{prefix}.kernel_beta"],
        }

    def layer(i):
        p = f"blocks.{i}"
        copies = range(cfg.ffn.copies)
        return {
            "ln1": {"scale": sd[f"{p}.ln1.weight"]},
            "mixer": {
                "keys": keys(f"{p}.attn"),
                "wv": {"kernel": in_heads(sd[f"{p}.attn.v_featurizer.linear.weight"])},
                "coef": sd[f"{p}.attn.v_featurizer.coef"],
                "value_beta": sd[f"{p}.attn.value_beta"],
                "c_proj": {"kernel": out_heads(sd[f"{p}.attn.c_proj.weight"])},
            },
            "ln2": {"scale": sd[f"{p}.ln2.weight"]},
            "ffn": {
                "keys": keys(f"{p}.pmem"),
                "mem_k": np.stack([sd[f"{p}.pmem.pmem.M_k{j}"][0] for j in copies]),
                "mem_v": np.stack([sd[f"{p}.pmem.pmem.M_v{j}"][0] for j in copies]),
                "value_beta": sd[f"{p}.pmem.value_beta"],
                "c_proj": {"kernel": out_heads(sd[f"{p}.pmem.c_proj.weight"])},
            },
        }

    layers = [layer(i) for i in range(cfg.n_layers)]
    if cfg.scan_layers:
        blocks = jax.tree.map(lambda *xs: np.stack(xs), *layers)
    else:
        blocks = dict(enumerate(layers))
    out = {
        "embed": {"table": sd["emb.weight"]},
        "blocks": blocks,
        "ln_out": {"scale": sd["ln_out.weight"]},
    }
    if not cfg.tie_embeddings:
        out["head"] = {"kernel": sd["head.weight"].T}
    return out


def model_of(cfg: MosaicsConfig, pure: dict):
    """Our model of `cfg` (built abstractly) holding the parameters `pure`."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: arch.build(cfg, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
    return nnx.merge(graphdef, state)


def random_mosaics(cfg: MosaicsConfig, seed: int):
    """Our model of `cfg` with random parameters around the official init (as
    `official_random_state`, drawn in our layout)."""
    model = random_module(lambda: arch.build(cfg, rngs=nnx.Rngs(0)), seed)
    rng = np.random.default_rng(seed + 1)

    def draw(path, x):
        name, x = path[-1].key, np.asarray(x)
        noise = rng.standard_normal(x.shape)
        if name == "leaky_key_beta":
            h = x.shape[-1]
            return leak_signs((h,)) * (np.linspace(0.5, 5.0, h) / 10 + 0.05 * noise)
        if name == "kernel_beta":
            return 0.1 + 0.05 * noise
        if name == "value_beta":
            return -0.05 + 0.05 * noise
        if name == "coef":
            return rng.uniform(size=x.shape)
        if name == "scale":
            return 1 + 0.2 * noise
        return x

    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    pure = jax.tree_util.tree_map_with_path(draw, pure)
    return model_of(cfg, jax.tree.map(lambda x: np.asarray(x, np.float32), pure))


def exported(cfg: MosaicsConfig, params: dict) -> list:
    sd = mosaics_format.official_state_dict(cfg, params)
    return [[name, list(value.shape)] for name, value in sd.items()]


# ---- against the recorded official module ------------------------------------------------------


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "loop"])
@pytest.mark.parametrize("name", ["tied", "untied"])
def test_names_shapes_and_config_are_the_official_ones(name, scan_layers):
    """Our state dict has exactly the recorded official names and shapes, in the official
    order, and `official_config` is the keyword set the official constructor was called with.
    Catches: a dropped or extra key (a missing M_v1, no head.weight when tied), a misnamed one,
    a memory without its leading axis of 1, a key map not shaped as the Conv1d [C, C, 1],
    the untied head not transposed, a layer missing with the loop layout, a config field
    renamed or left out."""
    rec = recorded()["configs"][name]
    cfg = config_of(rec["kwargs"], scan_layers)
    abstract = nnx.eval_shape(lambda: arch.build(cfg, rngs=nnx.Rngs(0)))
    params = jax.tree.map(
        lambda s: np.zeros(s.shape, np.float32), nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    )
    assert exported(cfg, params) == rec["state_dict"]
    block_size = rec["kwargs"]["block_size"]
    assert mosaics_format.official_config(cfg, block_size=block_size) == rec["kwargs"]


@pytest.mark.parametrize("name", ["tied", "untied"])
def test_recorded_official_logits_and_the_mapping_back(name):
    """The recorded official state dict (its `official_random_state` draw) mapped into our model
    by `from_official` gives the recorded official logits within 1e-4, and
    `official_state_dict` maps our parameters back to that state dict bit for bit (scanned and
    looped layers). Catches, in the export: a square matrix not transposed (a key map, the
    value map, a c_proj), the contextual and persistent memories' scalars or key maps swapped,
    M_k and M_v swapped, memory copies in the wrong order, the head scaled or a layer's
    parameters taken from another layer; in our model: any equation that differs from the
    official (a missing 1 / sqrt(C), the value shift the wrong way)."""
    rec = recorded()["configs"][name]
    tied = rec["kwargs"]["weight_tying"]
    sd = official_random_state(rec["state_dict"], tied, seed=rec["seed"])
    for scan_layers in (True, False):
        cfg = config_of(rec["kwargs"], scan_layers)
        back = mosaics_format.official_state_dict(cfg, from_official(cfg, sd))
        assert list(back) == list(sd)
        for key, value in sd.items():
            np.testing.assert_array_equal(back[key], value, err_msg=key)
    cfg = config_of(rec["kwargs"])
    ours = our_logits(model_of(cfg, from_official(cfg, sd)), np.asarray(rec["tokens"]))
    theirs = np.asarray(rec["logits"], np.float32)
    assert theirs.std() > 0.1, "degenerate logits"
    err = np.abs(ours - theirs).max()
    print(f"{name}: max |ours - recorded official| = {err:.2e}")
    assert err < 1e-4, f"max |ours - official| = {err:.3g}"


# ---- the torch mirror ----------------------------------------------------------------------------

MIRROR_CONFIGS = {
    "tied-scan-h2-copies2": dict(
        d_model=16,
        n_layers=2,
        tie_embeddings=True,
        scan_layers=True,
        mixer={"kind": "context_memory", "n_heads": 2},
        ffn={"kind": "persistent_memory", "n_heads": 2, "size": 12, "copies": 2},
    ),
    "untied-loop-h4-copies1": dict(
        d_model=16,
        n_layers=1,
        tie_embeddings=False,
        scan_layers=False,
        mixer={"kind": "context_memory", "n_heads": 4},
        ffn={"kind": "persistent_memory", "n_heads": 4, "copies": 1},  # size 3.5 D = 56
    ),
}


@pytest.mark.parametrize("name", sorted(MIRROR_CONFIGS))
def test_the_torch_mirror_gives_our_logits(name, tmp_path):
    """The folder that `write` makes, loaded by its own `modeling_mosaics.load` (strict), gives
    our float32 logits within 1e-4 (length 1 and 19). Catches, in the mirror: a weight used
    in the wrong orientation, the value shift toward the past, the persistent keys not
    squared, the context softmax over s <= t or with row 0 not zeroed, the leak rate without
    abs, the LayerNorm eps or the logit scale wrong; in the format: a parameter not written or
    config.json missing a field the mirror reads (pmem_count, weight_tying)."""
    cfg = MosaicsConfig(vocab_size=40, vocab_multiple=1, **MIRROR_CONFIGS[name])
    model = random_mosaics(cfg, seed=7)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    run = SimpleNamespace(
        cfg=SimpleNamespace(model=cfg, train=SimpleNamespace(seq_len=32)), params=params
    )
    mosaics_format.write(run, tmp_path, "float32")
    theirs, conf = mosaics_format.load_module(tmp_path).load(tmp_path)
    assert conf.weight_tying == cfg.tie_embeddings and conf.pmem_count == cfg.ffn.copies
    tokens = np.random.default_rng(8).integers(0, cfg.vocab_size, (2, 19))
    ours = our_logits(model, tokens)  # causal: a prefix's logits are the whole one's cut
    assert ours.std() > 0.1, "degenerate logits"
    for length in (1, 19):
        with torch.no_grad():
            got = theirs(torch.from_numpy(tokens[:, :length])).numpy()
        err = np.abs(ours[:, :length] - got).max()
        print(f"{name} T={length}: max |ours - torch mirror| = {err:.2e}")
        assert err < 1e-4, f"T={length}: max |ours - torch mirror| = {err:.3g}"


# ---- the CLI: a run folder with a checkpoint of random parameters -------------------------------

RUN_MODEL = {
    "family": "mosaics",
    "d_model": 32,
    "n_layers": 2,
    "mixer": {"kind": "context_memory", "n_heads": 2},
    "ffn": {"kind": "persistent_memory", "n_heads": 2, "size": 16, "copies": 2},
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny Memory Mosaics run folder (config.yaml, checkpoint 0 of random parameters) made
    by `Trainer.save_initial`: a trained run's files, without compiling a train step."""
    root = tmp_path_factory.mktemp("mosaics-export")
    return saved_run(root, RUN_MODEL, 24, lambda cfg: random_mosaics(cfg, seed=5))


def test_cli_export_verifies_and_the_folder_loads(run_dir, tmp_path):
    """`menagerie export RUN --format mosaics --verify` writes model.pt, config.json and
    modeling_mosaics.py, and its check (the folder's own loader against `load_run`'s model on
    the run's validation windows) finds the float32 logits within 1e-4; config.json carries
    the run's seq_len as block_size, and the tied head is stored as the embedding's tensor.
    Catches: the format not registered, `reference_logits` missing, the mirror not copied,
    block_size not the run's length, a tied head saved as a second copy."""
    out = tmp_path / "mosaics"
    export_verified(run_dir, "mosaics", out)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.pt",
        "modeling_mosaics.py",
    ]
    conf = json.loads((out / "config.json").read_text())
    assert (conf["block_size"], conf["pmem_count"], conf["pmem_size"]) == (24, 2, 16)
    assert conf["weight_tying"] is True
    state = torch.load(out / "model.pt", weights_only=True)
    assert state["head.weight"].untyped_storage().data_ptr() == (
        state["emb.weight"].untyped_storage().data_ptr()
    )


def test_bfloat16_export_keeps_scalars_and_norms_float32(run_dir, tmp_path):
    """`--dtype bfloat16`: matrices, the embedding and the memories in bfloat16, the per-head
    scalars (used as exp(10 p)) and LayerNorm scales in float32; the folder loads (float32)
    and runs. Catches: every parameter rounded to bfloat16, the dtype ignored."""
    out = tmp_path / "bf16"
    argv = ["export", str(run_dir), "--format", "mosaics", "--out", str(out)]
    rc, _, stderr = run_main([*argv, "--dtype", "bfloat16"])
    assert rc == 0, stderr
    state = torch.load(out / "model.pt", weights_only=True)
    for name in ("attn.c_proj.weight", "attn.k_featurizer.conv.weight", "pmem.pmem.M_v1"):
        assert state[f"blocks.1.{name}"].dtype == torch.bfloat16, name
    assert state["emb.weight"].dtype == torch.bfloat16
    for name in ("ln1.weight", "attn.kernel_beta", "attn.v_featurizer.coef", "pmem.value_beta"):
        assert state[f"blocks.1.{name}"].dtype == torch.float32, name
    logits = mosaics_format.reference_logits(out)(np.zeros((1, 20), np.int64))
    assert logits.dtype == np.float32 and np.isfinite(logits).all()


@pytest.mark.parametrize(
    "model, fragment",
    [
        ({"mixer": {"kind": "attention"}}, "model.mixer.kind=attention"),
        ({"ffn": {"kind": "swiglu"}}, "model.ffn.kind=swiglu"),
        (
            {"mixer": {"kind": "context_memory", "n_heads": 4}, "ffn": {"n_heads": 8}},
            "model.mixer.n_heads=4 and model.ffn.n_heads=8",
        ),
        ({"norm_eps": 1e-6}, "model.norm_eps=1e-06"),
        ({"family": "transformer"}, "writes mosaics models; "),
    ],
    ids=["attention", "swiglu", "heads", "eps", "transformer"],
)
def test_unsupported_configs_are_refused_in_one_line(model, fragment, tmp_path):
    """A run the official StackAssoMem cannot express is refused in one line (exit 2) before
    anything is read or written. Catches: a mosaics run with an attention mixer or a SwiGLU
    FFN exported under official names it does not have, different head counts squeezed into
    the one official n_head, a norm eps the official LayerNorm does not have silently
    dropped, another family accepted."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"family": "mosaics", **model}}))
    before = snapshot(tmp_path)
    out = tmp_path / "out"
    rc, _, stderr = run_main(["export", str(run), "--format", "mosaics", "--out", str(out)])
    lines = stderr.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and fragment in lines[0], stderr
    print(lines[0])
    assert snapshot(tmp_path) == before


class OptionedContextMemory(pydantic.BaseModel):
    """A context_memory config with an option the official v1 model lacks (as a v2 switch)."""

    kind: str = "context_memory"
    n_heads: int = 2
    impl: str = "auto"
    keys: str = "leaky"


def test_a_part_option_away_from_its_default_is_refused():
    """Any part field but the free ones (n_heads, impl; size, copies) away from its default is
    refused, naming it, while the same config at the default passes. Catches: an option the
    official model lacks (a gated key extractor, a window) exported as if it were v1, or the
    check refusing a free field such as impl."""
    cfg = MosaicsConfig(
        vocab_size=40,
        d_model=16,
        mixer={"kind": "context_memory", "n_heads": 2, "impl": "reference"},
        ffn={"kind": "persistent_memory", "n_heads": 2, "size": 5, "copies": 3},
    )
    mosaics_format.check(cfg)
    mosaics_format.check(cfg.model_copy(update={"mixer": OptionedContextMemory()}))
    optioned = cfg.model_copy(update={"mixer": OptionedContextMemory(keys="gated")})
    with pytest.raises(ConfigError, match="model.mixer.keys='gated' has no counterpart") as err:
        mosaics_format.check(optioned)
    assert "\n" not in str(err.value)
    print(err.value)
