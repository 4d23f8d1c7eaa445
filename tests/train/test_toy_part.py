"""The worked example of the README's tour: a part added in one file (toy_part.py) is selectable
from YAML, counted, sharded by its own axis, projected by GaLore by role, and trains."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P
from menagerie import arch
from menagerie.train import mesh as mesh_lib
from menagerie.train.config import load_config
from menagerie.train.optim import decay_mask, matrix_dims

from .conftest import TINY, cli, train_losses

HERE = Path(__file__).resolve().parent
TOY = ["imports=[toy_part]", "model.ffn.kind=toy_relu2", "model.ffn.hidden_dim=96"]


def _toy_config(monkeypatch, *extra):
    monkeypatch.syspath_prepend(str(HERE))
    return load_config(TINY, [*TOY, *extra])


def test_toy_part_is_selected_counted_and_named(monkeypatch):
    cfg = _toy_config(monkeypatch)
    model_cfg = cfg.model.with_vocab(257)
    assert type(model_cfg.ffn).__name__ == "ToyReLU2Config"
    abstract = nnx.eval_shape(lambda: arch.build(model_cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(abstract, nnx.Param)
    assert sum(x.size for x in jax.tree.leaves(state)) == model_cfg.num_params()
    names = mesh_lib.logical_names(state)
    assert names["blocks"]["ffn"]["up"]["kernel"] == ("layers", "embed", "toy_hidden")
    # Sharded by its own declared axis: hidden width over "tensor", embed over "fsdp".
    mesh = jax.sharding.AbstractMesh((1, 2, 2, 1), mesh_lib.MESH_AXES)
    spec = mesh_lib.logical_to_spec(("layers", "embed", "toy_hidden"), (2, 64, 96), mesh)
    assert spec == P(None, "fsdp", "tensor")
    # Roles: its kernels are decayed matrices that GaLore projects; its bias is neither.
    decay, dims = decay_mask(names), matrix_dims(names)
    assert decay["blocks"]["ffn"]["down"]["kernel"] and not decay["blocks"]["ffn"]["bias"]
    assert dims["blocks"]["ffn"]["up"]["kernel"] is not None
    assert dims["blocks"]["ffn"]["bias"] is None
    # FLOPs: the toy FFN replaces SwiGLU's 3 D F with 2 D F.
    base = load_config(TINY).model.with_vocab(257)
    ffn_delta = base.ffn.flops_per_token(base, 64) - model_cfg.ffn.flops_per_token(model_cfg, 64)
    assert base.flops_per_token(64) - model_cfg.flops_per_token(64) == base.n_layers * ffn_delta


def test_toy_part_trains_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    run = tmp_path / "toy"
    steps = ["train.steps=40", "log.every=10", "train.sample_tokens=0", "train.eval_every=0"]
    done = cli("train", "-c", str(TINY), f"run_dir={run}", *TOY, *steps)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = train_losses(run)
    assert losses[40] < losses[10] - 0.3, losses
    rows = (run / "metrics.jsonl").read_text()
    assert '"model/ffn/active"' in rows and '"model/ffn/aux_loss"' in rows
    assert np.isfinite(losses[40])
