"""`menagerie plan`, through the real CLI: its parameter and optimizer-state bytes equal those of
the really initialised state on the same mesh and XLA's compiled arguments exactly, its total is
within 20% of XLA's compiled memory analysis of the real train step, on one device and on 8
simulated ones; `--devices N` (an abstract mesh) plans what N simulated devices measure; a
dimension an axis does not divide is named; a mesh that does not fit the devices is one line.

The real state of a multi-device mesh is measured in a subprocess with XLA_FLAGS set before JAX
starts (`python -m tests.train.test_plan OVERRIDES...` prints its per-device bytes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from .conftest import ROOT, TINY, cli, cli_env

# Tiny on every path the planner reads: a remat policy that saves less than all, gradient
# accumulation, GaLore's projected state, fsdp + data sharding of parameters and batch.
ONE = ("model.remat=full", "train.microbatches=2")
EIGHT = ("mesh.data=4", "mesh.fsdp=2", "model.remat=full", "optim.name=galore", "optim.rank=8")
# After the session's own flags (tests/conftest.py), not instead of them.
EIGHT_DEVICES = {
    "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
}
TOLERANCE = 0.2
ESTIMATES = ("params", "opt_state", "gradients", "activations", "backward", "gathered", "inputs")


def _plan(*args: str, env: dict | None = None) -> dict:
    out = cli("plan", "-c", str(TINY), "--json", *args, env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _real_bytes(*overrides: str, env: dict | None = None) -> dict:
    """Per-device bytes of the really initialised params and optimizer state on the config's
    mesh (device 0's shards), from a fresh process."""
    out = subprocess.run(
        [sys.executable, "-m", "tests.train.test_plan", *overrides],
        capture_output=True,
        text=True,
        timeout=300,
        env={**cli_env(), **(env or {})},
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _check_against_xla(plan: dict, real: dict) -> None:
    assert plan["params"] == real["params"]
    assert plan["opt_state"] == real["opt_state"]
    c = plan["compiled"]
    assert c["arguments"] == plan["params"] + plan["opt_state"] + plan["inputs"]
    assert abs(c["total"] / plan["total"] - 1) <= TOLERANCE, (plan, c)


def test_one_device_matches_real_state_and_xla():
    """Catches: activations traced under another remat policy than the config's (remat none
    traced for a remat full config: more than 20% off XLA's total), activations traced on the
    whole batch instead of one microbatch (likewise), and optimizer state counted as two copies
    of the parameters (Adam's step count, 8 bytes, is missed)."""
    _check_against_xla(_plan(*ONE), _real_bytes(*ONE))


def test_eight_devices_match_real_state_and_xla():
    """Catches: per-device bytes taken from global shapes (shardings ignored: twice the real
    shards under fsdp=2), activations not divided over the data-parallel devices (more than 20%
    over XLA's total), and an abstract mesh whose sizes go to the wrong axes (`--devices 8`
    then plans another optimizer-state layout than 8 simulated devices measure)."""
    plan = _plan(*EIGHT, env=EIGHT_DEVICES)
    assert plan["devices"] == 8 and plan["mesh"]["fsdp"] == 2
    _check_against_xla(plan, _real_bytes(*EIGHT, env=EIGHT_DEVICES))
    abstract = _plan(*EIGHT, "--devices", "8")
    assert abstract["compiled"] is None and abstract["platform"] == "abstract"
    for key in (
        "params",
        "opt_state",
        "gradients",
        "activations",
        "backward",
        "gathered",
        "inputs",
    ):
        assert abstract[key] == plan[key], key


def test_replicated_dimension_is_named():
    """Catches: a dimension an axis does not divide (2 kv heads over tensor=4) replicated
    silently: the plan must say which and why, and still shard the rest."""
    out = cli("plan", "-c", str(TINY), "--devices", "8", "mesh.data=2", "mesh.tensor=4")
    assert out.returncode == 0, out.stderr
    warnings = [line for line in out.stdout.splitlines() if line.startswith("warning:")]
    assert any("blocks/mixer/k/kernel: 'kv_heads' (2)" in w and "tensor (4)" in w for w in warnings)
    q_row = next(line for line in out.stdout.splitlines() if line.startswith("blocks/mixer/q/"))
    assert "-,-,tensor,-" in q_row


def test_mesh_that_does_not_fit_is_one_line():
    """Catches: a mesh whose sizes do not multiply to the device count ending in a traceback
    (or planned anyway) instead of one line naming the sizes and the fix."""
    out = cli("plan", "-c", str(TINY), "--devices", "8", "mesh.data=3", "mesh.fsdp=2")
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "multiply to 6 but there are 8 devices" in out.stderr


def test_filled_sequence_axis_that_does_not_fit_the_length_is_one_line():
    """mesh.sequence=-1 fills to 8 devices only on the mesh: the trainer's layout checks it.
    Catches: the sequence check made only on the sizes the config states (-1 passes it)."""
    overrides = ["mesh.data=1", "mesh.sequence=-1", "train.seq_len=72"]
    out = cli("plan", "-c", str(TINY), "--devices", "8", *overrides)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "does not divide train.seq_len=72 into 2 x 8 zigzag chunks" in out.stderr


def _main(overrides: list[str]) -> None:
    import jax
    from menagerie.train import mesh as mesh_lib
    from menagerie.train.config import load_config
    from menagerie.train.plan import tokenizer_vocab
    from menagerie.train.trainer import Trainer

    cfg = load_config(TINY, overrides)
    trainer = Trainer.layout_only(cfg, mesh_lib.make_mesh(cfg.mesh), tokenizer_vocab(cfg.data))
    state = trainer.init_state()
    device = jax.devices()[0]

    def on_device(tree) -> int:
        shards = [s for x in jax.tree.leaves(tree) for s in x.addressable_shards]
        return sum(s.data.nbytes for s in shards if s.device == device)

    print(json.dumps({k: on_device(state[k]) for k in ("params", "opt_state")}))


if __name__ == "__main__":
    _main(sys.argv[1:])


def test_a_hybrid_mesh_shows_its_dcn_split():
    """Catches: a plan that hides which part of an axis crosses the slower network (the
    `mesh.dcn_*` factor), or that plans dcn x inner as the inner size alone."""
    out = cli("plan", "-c", str(TINY), "--devices", "8", "mesh.dcn_data=2", "mesh.fsdp=2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("mesh data=4 (2 dcn x 2) fsdp=2 tensor=1 sequence=1 on 8 ")
