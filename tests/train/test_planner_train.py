"""The planner head end to end through the CLI (configs/planner/tiny.yaml, byte-level stdlib
corpus; with its plan writer): it learns, logs the head's own losses, writes its closing sample,
`menagerie eval` gives the run's final eval loss, and a rerun resumes from an earlier checkpoint
into the first run's final state, bit for bit (the planner's parameters and their optimizer state
included)."""

from __future__ import annotations

import shutil

from menagerie.train.metrics import read_metrics

from .conftest import ROOT, assert_close_states, cli, saved_state, train_losses

PLANNER = ROOT / "configs" / "planner" / "tiny.yaml"


def test_tiny_planner_learns_checkpoints_and_resumes_bitwise(tmp_path):
    run = tmp_path / "run"
    args = ["train", "-c", str(PLANNER), f"run_dir={run}", "train.steps=40", "train.eval_every=40",
            "checkpoint.every=20", "train.sample_tokens=8"]  # fmt: skip
    first = cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    losses = train_losses(run)
    assert losses[40] < losses[10] - 0.5, losses
    logged = read_metrics(run, "train")[40]
    for name in ("lookahead_loss", "lookahead_accuracy", "latent_loss", "writer_loss"):
        assert f"model/head/{name}" in logged, sorted(logged)
    assert logged["model/head/lookahead_loss"] > 0.0, logged
    assert "sample:" in first.stdout, first.stdout[-2000:]
    final_eval = read_metrics(run, "eval")[40]["loss"]
    evaluated = cli("eval", f"run_dir={run}")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert f"step 40: eval loss {final_eval:.4f}" in evaluated.stdout, evaluated.stdout
    # The eval reports the head's own metrics too: its plan's accuracy, each block decoded at once.
    assert "plan block accuracy" in evaluated.stdout, evaluated.stdout
    assert "written block accuracy" in evaluated.stdout, evaluated.stdout
    assert 0.0 < read_metrics(run, "eval")[40]["model/head/lookahead_accuracy"] < 1.0
    # With the step-40 checkpoint moved out, the same command resumes from step 20 and must end
    # in the first run's state exactly.
    shutil.move(run / "checkpoints" / "40", tmp_path / "40")
    again = cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_close_states(saved_state(run / "checkpoints" / "40"), saved_state(tmp_path / "40"), 0)
