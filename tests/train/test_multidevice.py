"""Sharded training on 8 simulated CPU devices: the state and the batch really are sharded by
their logical names, the run equals one device's (losses and gradient norms), and a checkpoint
saved on 8 devices resumes on 1 where it left off.

Each run is its own process, with XLA_FLAGS set before JAX starts. The runs are `menagerie
train` started through this module (`python -m tests.train.test_multidevice SPECS.json ARGS`),
which records the shardings of the arrays the train step actually receives and returns.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from .conftest import ROOT, TINY, assert_close_states, cli_env, cli_wait, saved_state

MESH = ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
# Measured on this code (CPU, 2026-11-30), 8 devices vs 1, worst of 6 steps: relative difference
# in loss 9e-8 (AdamW) / 1.0e-7 (GaLore), in gradient norm 1.4e-7 / 1.5e-7; final state (largest
# |difference| / largest |entry|, worst array) 7.9e-7. The tolerances are about 5x those.
LOSS_RTOL, GNORM_RTOL, PARAM_RTOL = 5e-7, 7.5e-7, 4e-6


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
        "checkpoint.every=2",
        "checkpoint.keep_last=3",
        *overrides,
    )


def _start(run_dir, devices: int, *overrides: str) -> subprocess.Popen:
    """`menagerie train` on `devices` simulated devices, recording into <run_dir>.specs.json."""
    env = cli_env()
    devices_flag = f"--xla_force_host_platform_device_count={devices}"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {devices_flag}"  # after the session's
    record = Path(f"{run_dir}.specs.json")
    return subprocess.Popen(
        [sys.executable, "-m", "tests.train.test_multidevice", str(record)]
        + list(_args(run_dir, *overrides)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )


def _one_and_sharded(tmp_path, *overrides: str):
    """The same run on 1 device and on a data x fsdp x tensor mesh of 8, side by side."""
    one, sharded = cli_wait(
        _start(tmp_path / "one", 1, *overrides),
        _start(tmp_path / "sharded", 8, *MESH, *overrides),
    )
    assert one.returncode == 0, one.stderr[-3000:]
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    return sharded, _recorded(tmp_path / "sharded")


def _recorded(run_dir) -> dict:
    return json.loads(Path(f"{run_dir}.specs.json").read_text())


def _assert_same_run(one_dir, sharded_dir) -> None:
    """Losses and gradient norms of every step equal (within float reduction order)."""
    a, b = _metrics(one_dir), _metrics(sharded_dir)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for name, rtol in (("loss", LOSS_RTOL), ("grad_norm", GNORM_RTOL)):
        x = np.array([a[s][name] for s in range(1, 7)])
        y = np.array([b[s][name] for s in range(1, 7)])
        print(f"{name}: max relative difference 1 vs 8 devices {np.max(np.abs(y / x - 1)):.1e}")
        np.testing.assert_allclose(y, x, rtol=rtol, err_msg=name)


def _metrics(run_dir) -> dict[int, dict]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r.get("kind") == "train"}


def _train_steps_logged(run_dir) -> list[int]:
    """Every train row's step, in the order written (a resumed run appends its steps)."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if r.get("kind") == "train"]


def test_data_fsdp_tensor_mesh_matches_one_device_and_resumes_on_one(tmp_path):
    sharded, rec = _one_and_sharded(tmp_path)
    assert "'data': 2, 'fsdp': 2, 'tensor': 2" in sharded.stdout
    state, batch = rec["state_out"], rec["batch"]
    # What the train step got and returned, not what was asked for: parameters by their logical
    # names (layers, embed -> fsdp, heads / mlp -> tensor), vocab over tensor.
    assert state["params/blocks/mixer/q/kernel"] == [None, "fsdp", "tensor", None]
    assert state["params/blocks/mixer/o/kernel"] == [None, "tensor", None, "fsdp"]
    assert state["params/blocks/ffn/down/kernel"] == [None, "tensor", "fsdp"]
    assert state["params/embed/table"] == ["tensor", "fsdp"]
    assert state["params/final_norm/scale"] == [None]
    # AdamW's moments shard like their parameters; the batch splits over data x fsdp.
    params = {k[len("params/") :]: v for k, v in state.items() if k.startswith("params/")}
    for moment in ("mu", "nu"):
        for path, spec in params.items():
            assert state[f"opt_state/0/{moment}/{path}"] == spec, (moment, path)
    assert batch and all(spec == [["data", "fsdp"], None] for spec in batch.values()), batch
    assert rec["state_in"] == state  # and the step keeps the layout it was given
    _assert_same_run(tmp_path / "one", tmp_path / "sharded")
    # The checkpoint records the layout it was saved with.
    meta = json.loads((tmp_path / "sharded/checkpoints/6/meta/metadata").read_text())
    assert meta["layout"]["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2, "sequence": 1}

    # The 8-device run stops after its step-4 checkpoint (the step-6 one moved out of the run);
    # rerun on 1 device, it resumes from step 4 (Orbax reshards on restore), not from step 2 or
    # from scratch, runs steps 5 and 6 only, and ends where the uninterrupted runs ended.
    shutil.move(tmp_path / "sharded/checkpoints/6", tmp_path / "sharded-6")
    [resumed] = cli_wait(_start(tmp_path / "sharded", 1))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {tmp_path / 'sharded/checkpoints/4'} (step 4)" in resumed.stdout
    assert _recorded(tmp_path / "sharded")["steps"] == [4, 5]
    assert _train_steps_logged(tmp_path / "sharded") == [1, 2, 3, 4, 5, 6, 5, 6]
    final = saved_state(tmp_path / "sharded/checkpoints/6")
    assert int(final["step"]) == 6
    for name, want in (
        ("8 devices", saved_state(tmp_path / "sharded-6")),
        ("1 device", saved_state(tmp_path / "one/checkpoints/6")),
    ):
        worst = assert_close_states(final, want, PARAM_RTOL)
        print(f"final state, resumed on 1 vs uninterrupted on {name}: {worst:.1e}")


def test_galore_state_is_sharded_by_its_logical_names_and_matches_one_device(tmp_path):
    """GaLore with refreshes inside the run (gap 3, staggered): its projected state is sharded
    by its logical names on a data x fsdp x tensor mesh, and the run equals one device's."""
    galore = [
        "optim.name=galore",
        "optim.rank=8",
        "optim.update_proj_gap=3",
        "optim.stagger_refresh=true",
        "optim.lr=0.01",
        "optim.scale=0.25",
    ]
    _, rec = _one_and_sharded(tmp_path, *galore)
    state = rec["state_out"]
    lowrank = "opt_state/0"
    # An MLP kernel [L, embed, mlp] (tall: right side): moments [L, r, mlp] shard on their
    # full-size mlp axis (tensor), the projector [L, embed, r] on embed (fsdp).
    for moment in ("mu", "nu"):
        assert state[f"{lowrank}/{moment}/blocks/ffn/up/kernel"] == [None, None, "tensor"]
        assert state[f"{lowrank}/{moment}/blocks/ffn/down/kernel"] == [None, "tensor", None]
        assert state[f"{lowrank}/{moment}/blocks/mixer/q/kernel"] == [None, "fsdp", None]
    assert state[f"{lowrank}/projector/blocks/ffn/up/kernel"] == [None, "fsdp", None]
    assert state[f"{lowrank}/projector/blocks/mixer/q/kernel"] == [None, "tensor", None]
    # Full-rank leaves keep dense moments, sharded like their parameter.
    assert state[f"{lowrank}/mu/embed/table"] == state["params/embed/table"] == ["tensor", "fsdp"]
    assert rec["state_in"] == state
    _assert_same_run(tmp_path / "one", tmp_path / "sharded")


def _record_and_train(record: str, argv: list[str]) -> int:
    """`menagerie <argv>` in this process; writes to `record` the PartitionSpecs (one entry per
    dimension) of the state the first train step received (`state_in`) and returned
    (`state_out`) and of its batch, and the state's step before each train step (`steps`)."""
    import jax
    from menagerie.train import cli, trainer

    def specs(tree) -> dict:
        out = {}
        for path, x in jax.tree_util.tree_leaves_with_path(tree):
            spec = [list(e) if isinstance(e, tuple) else e for e in x.sharding.spec]
            out[jax.tree_util.keystr(path, simple=True, separator="/")] = spec + [None] * (
                x.ndim - len(spec)
            )
        return out

    seen: dict = {"steps": []}
    jit_train_step = trainer.Trainer.jit_train_step

    def recording(self):
        train_step = jit_train_step(self)

        def step(state, batch):
            seen["steps"].append(int(jax.device_get(state["step"])))
            if "state_in" not in seen:
                seen.update(state_in=specs(state), batch=specs(batch))
            new_state, metrics = train_step(state, batch)
            seen.setdefault("state_out", specs(new_state))
            return new_state, metrics

        return step

    trainer.Trainer.jit_train_step = recording
    rc = cli.main(argv)
    Path(record).write_text(json.dumps(seen))
    return rc


if __name__ == "__main__":
    sys.exit(_record_and_train(sys.argv[1], sys.argv[2:]))
