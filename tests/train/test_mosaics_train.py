"""Memory Mosaics end to end through the CLI (configs/mosaics/tiny.yaml, byte-level stdlib
corpus): it learns below the unigram entropy, writes its closing sample by incremental
decoding, checkpoints, `menagerie eval` gives the run's final eval loss, and a rerun resumes
from an earlier checkpoint into the first run's final state, bit for bit."""

from __future__ import annotations

import shutil

from menagerie.train.config import load_config
from menagerie.train.metrics import read_metrics

from .conftest import ROOT, assert_close_states, cli, saved_state, train_losses
from .test_megalodon_train import unigram_entropy_nats

TINY = ROOT / "configs" / "mosaics" / "tiny.yaml"


def test_tiny_mosaics_learns_checkpoints_and_resumes_bitwise(tmp_path):
    run = tmp_path / "run"
    args = ["train", "-c", str(TINY), f"run_dir={run}", "train.sample_tokens=8"]
    first = cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    losses = train_losses(run)
    assert losses[60] < losses[10] - 1.0, losses
    final_eval = read_metrics(run, "eval")[60]["loss"]
    assert final_eval < unigram_entropy_nats(load_config(TINY, [f"run_dir={run}"])), final_eval
    assert (run / "checkpoints" / "40").is_dir() and (run / "checkpoints" / "60").is_dir()
    assert "sample:" in first.stdout, first.stdout[-2000:]
    evaluated = cli("eval", f"run_dir={run}")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert f"step 60: eval loss {final_eval:.4f}" in evaluated.stdout, evaluated.stdout
    # With the step-60 checkpoint moved out, the same command resumes from step 40 (the same
    # program: nothing compiles again) and must end in the first run's state exactly.
    shutil.move(run / "checkpoints" / "60", tmp_path / "60")
    again = cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_close_states(saved_state(run / "checkpoints" / "60"), saved_state(tmp_path / "60"), 0)
