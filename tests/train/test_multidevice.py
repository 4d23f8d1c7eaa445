"""Sharded training on 8 simulated CPU devices equals training on one device.

Each run is its own process, with XLA_FLAGS set before JAX starts.
"""

from __future__ import annotations

import json
import os

import numpy as np

from .conftest import TINY, cli_env, cli_popen, cli_wait, train_losses


def _args(run_dir, *overrides: str) -> tuple[str, ...]:
    return (
        "train",
        "-c",
        str(TINY),
        f"run_dir={run_dir}",
        "train.steps=6",
        "log.every=1",
        "train.eval_every=0",
        "train.sample_tokens=0",
        "checkpoint.every=3",
        *overrides,
    )


def _env(devices: int) -> dict[str, str]:
    env = cli_env()
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _start(run_dir, devices: int, *overrides: str):
    return cli_popen(*_args(run_dir, *overrides), env=_env(devices), split_stderr=True)


def _one_and_sharded(tmp_path, *overrides: str):
    """The same run on 1 device and on a data x fsdp x tensor mesh of 8, side by side."""
    mesh = ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    return cli_wait(
        _start(tmp_path / "one", 1, *overrides),
        _start(tmp_path / "sharded", 8, *mesh, *overrides),
    )


def test_data_fsdp_tensor_mesh_matches_one_device(tmp_path):
    one, sharded = _one_and_sharded(tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert "'data': 2, 'fsdp': 2, 'tensor': 2" in sharded.stdout
    a, b = train_losses(tmp_path / "one"), train_losses(tmp_path / "sharded")
    np.testing.assert_allclose([a[s] for s in range(1, 7)], [b[s] for s in range(1, 7)], rtol=1e-4)
    # The checkpoint records the layout it was saved with.
    meta = json.loads(
        (tmp_path / "sharded" / "checkpoints" / "6" / "meta" / "metadata").read_text()
    )
    assert meta["layout"]["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2, "sequence": 1}

    # A checkpoint saved on 8 devices resumes on 1 (Orbax reshards on restore).
    [resumed] = cli_wait(_start(tmp_path / "sharded", 1, "train.steps=8"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert os.path.isdir(tmp_path / "sharded" / "checkpoints" / "8")


def test_galore_on_fsdp_and_tensor_sharded_params_matches_one_device(tmp_path):
    """GaLore with refreshes inside the run (gap 3, staggered): its projected state is sharded
    by its logical names on a data x fsdp x tensor mesh, and the losses equal one device's."""
    galore = [
        "optim.name=galore",
        "optim.rank=8",
        "optim.update_proj_gap=3",
        "optim.stagger_refresh=true",
        "optim.lr=0.01",
        "optim.scale=0.25",
    ]
    one, sharded = _one_and_sharded(tmp_path, *galore)
    assert one.returncode == 0, one.stderr[-3000:]
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    a, b = train_losses(tmp_path / "one"), train_losses(tmp_path / "sharded")
    np.testing.assert_allclose([a[s] for s in range(1, 7)], [b[s] for s in range(1, 7)], rtol=1e-4)
