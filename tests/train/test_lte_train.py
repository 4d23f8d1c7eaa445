"""LTE from step 0 through the CLI (configs/lte/tiny.yaml): stage 1 trains the routers with the
LTE losses, stage 2 from `hard_from_step` routes hard with the routers frozen, the logs carry
the density and the active FLOPs, and a run killed by SIGKILL before the switch resumes across
it into the uninterrupted run's parameters, bit for bit. (`menagerie eval` routing as training
does at the checkpoint's step is tests/arch/test_lte.py's.)"""

from __future__ import annotations

import shutil

from menagerie.train.config import load_config
from menagerie.train.metrics import read_metrics

from .conftest import ROOT, assert_close_states, cli_popen, cli_wait, saved_state
from .test_megalodon_train import _checkpoint_steps, _wait_until

TINY = ROOT / "configs" / "lte" / "tiny.yaml"
SWITCH = load_config(TINY).model.ffn.hard_from_step


def _args(run_dir):
    return [
        "train",
        "-c",
        str(TINY),
        f"run_dir={run_dir}",
        "log.every=1",
        "checkpoint.every=10",
        "checkpoint.keep_last=10",
        "train.sample_tokens=0",
    ]


def _routers(state):
    ffn = state["params"]["blocks"]["ffn"]
    return {"router": ffn["router"], "router_bias": ffn["router_bias"]}


def test_lte_stage_switch_survives_kill_9_and_freezes_the_routers(tmp_path):
    # The uninterrupted run and, beside it, the same run killed with SIGKILL once a checkpoint
    # before the switch exists; the checkpoints it wrote from the switch on are removed, so its
    # rerun starts in stage 1 and crosses the switch.
    full, killed = tmp_path / "full", tmp_path / "killed"
    full_proc = cli_popen(*_args(full), split_stderr=True)
    proc = cli_popen(*_args(killed))
    _wait_until(proc, lambda: (killed / "checkpoints" / "10").is_dir())
    proc.kill()
    proc.wait()
    for step in _checkpoint_steps(killed):
        if step >= SWITCH:
            shutil.rmtree(killed / "checkpoints" / str(step))
    resumed_from = _checkpoint_steps(killed)[-1]
    assert resumed_from < SWITCH
    done, again = cli_wait(full_proc, cli_popen(*_args(killed), split_stderr=True))
    assert done.returncode == 0, done.stderr[-3000:]
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"(step {resumed_from})" in again.stdout
    ckpts = full / "checkpoints"
    assert_close_states(saved_state(killed / "checkpoints" / "60"), saved_state(ckpts / "60"), 0)

    rows = read_metrics(full, "train")
    steps = sorted(rows)
    assert all(rows[s]["model/ffn/aux_loss"] > 0 for s in steps if s <= SWITCH)
    assert all(rows[s]["model/ffn/aux_loss"] == 0 for s in steps if s > SWITCH)
    last = rows[steps[-1]]
    assert 0 < last["model/ffn/density"] < 1 and "model/ffn/density/layer1" in last
    dense = load_config(TINY).model.with_vocab(384).flops_per_token(64)
    assert last["active_flops_per_token"] < dense
    # Frozen from the switch: the routers of every later checkpoint are the switch's.
    at_switch = _routers(saved_state(ckpts / str(SWITCH)))
    assert_close_states(_routers(saved_state(ckpts / "60")), at_switch, 0)
    before = _routers(saved_state(ckpts / str(SWITCH - 10)))
    assert float(abs(before["router_bias"] - at_switch["router_bias"]).max()) > 0
