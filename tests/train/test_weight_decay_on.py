"""`optim.weight_decay_on`: weight decay on matrices (by axis roles, the default) or on every
parameter (plain torch AdamW, as the official Megalodon code trains), in each optimizer."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from menagerie import arch
from menagerie.train import mesh as mesh_lib
from menagerie.train.config import load_config
from menagerie.train.errors import ConfigError
from menagerie.train.optim import decay_mask

from .conftest import ROOT

MEGALODON = ROOT / "configs" / "megalodon"
# The tiny Megalodon's parameters that are not matrices: norm scales and biases, projection
# biases, CEMA's per-channel vectors, the q/k affine rows.
NOT_MATRICES = {
    "final_norm/weight",
    "final_norm/bias",
    "blocks/mega/timenorm/weight",
    "blocks/mega/timenorm/bias",
    "blocks/mega/cema/alpha",
    "blocks/mega/cema/delta",
    "blocks/mega/cema/theta",
    "blocks/mega/cema/gamma",
    "blocks/mega/cema/omega",
    "blocks/mega/rmsnorm",
    "blocks/mega/wz/bias",
    "blocks/mega/wv/bias",
    "blocks/mega/wr/bias",
    "blocks/mega/wh1/bias",
    "blocks/mega/gamma",
    "blocks/mega/beta",
    "blocks/nffn/norm_weight",
    "blocks/nffn/norm_bias",
}


def _flat(tree) -> dict[str, object]:
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, tuple))
    return {"/".join(str(k.key) for k in path): leaf for path, leaf in leaves}


def _tiny_megalodon():
    """(logical names, random float32 params, as numpy) of configs/megalodon/tiny.yaml's model."""
    model_cfg = load_config(MEGALODON / "tiny.yaml").model.with_vocab(257)
    abstract = nnx.eval_shape(lambda: arch.build(model_cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(abstract, nnx.Param)
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda a: rng.normal(0, 0.5, a.shape).astype(a.dtype), nnx.to_pure_dict(state)
    )
    return mesh_lib.logical_names(state), params


def test_matrices_leave_out_vectors_and_all_takes_every_parameter():
    names, _ = _tiny_megalodon()
    matrices = _flat(decay_mask(names))
    assert {k for k, decayed in matrices.items() if not decayed} == NOT_MATRICES
    assert {"embed/table", "output/kernel", "blocks/mega/wh2/kernel"} <= {
        k for k, decayed in matrices.items() if decayed
    }
    assert decay_mask(names, "matrices") == decay_mask(names)  # the default
    everything = _flat(decay_mask(names, "all"))
    assert everything.keys() == matrices.keys() and all(everything.values())
    with pytest.raises(ValueError, match="'matrices' or 'all'"):
        decay_mask(names, "vectors")


@pytest.mark.parametrize("name", ["adamw", "galore"])
def test_each_optimizer_decays_exactly_the_parameters_selected(name):
    """One step from the same gradient with each setting: the updates differ on the
    non-matrices by exactly the decay step, and not at all on the matrices. AdamW (optax)
    decays p, -lr wd p; GaLore's `lowrank` decays the updated p, -lr wd (p + step)."""
    names, params = _tiny_megalodon()
    grads = jax.tree.map(lambda p: 0.01 * np.cos(7 * p), params)
    lr, wd = 0.1, 0.5
    common = [f"optim.name={name}", f"optim.lr={lr}", f"optim.weight_decay={wd}"]
    common += ["optim.schedule=constant", "optim.warmup_steps=0"]
    if name == "galore":
        common += ["optim.rank=4"]  # projects the tiny model's 64-wide kernels
    updates = {}
    for on in ("matrices", "all"):
        optim = load_config(MEGALODON / "tiny.yaml", [*common, f"optim.weight_decay_on={on}"]).optim
        assert optim.weight_decay_on == on
        tx, _ = optim.build(10, names)
        # One program per optimizer (two GaLore optimizers' SVDs in one program on XLA:CPU
        # hung here); init inside it, since eager init dispatches an op per leaf.
        updates[on] = jax.jit(lambda g, p, tx=tx: tx.update(g, tx.init(p), p)[0])(grads, params)
    undecayed, flat_params = _flat(updates["matrices"]), _flat(params)
    for path, d in _flat(
        jax.tree.map(lambda a, b: a - b, updates["all"], updates["matrices"])
    ).items():
        if path not in NOT_MATRICES:
            assert not np.any(d), path
            continue
        decayed = flat_params[path] + (undecayed[path] if name == "galore" else 0)
        np.testing.assert_allclose(d, -lr * wd * decayed, rtol=1e-5, atol=1e-7, err_msg=path)


def test_megalodon_presets_decay_every_parameter_and_the_default_does_not():
    for preset in sorted(MEGALODON.glob("*.yaml")):
        assert load_config(preset).optim.weight_decay_on == "all", preset.name
    assert load_config(ROOT / "configs" / "transformer" / "tiny.yaml").optim.weight_decay_on == (
        "matrices"
    )
    with pytest.raises(ConfigError, match="weight_decay_on"):
        load_config(MEGALODON / "tiny.yaml", ["optim.weight_decay_on=vectors"])
