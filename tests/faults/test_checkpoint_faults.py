"""Checkpoint faults through the real CLI: an unreadable newest checkpoint (moved aside, the
step saved again), a non-finite update (never committed, never saved), a disk that fills during
a save (the run stops with one line, the earlier checkpoints stay resumable), eval of a run
with no readable checkpoint (read-only, no advice it cannot take), and Orbax's leftovers of a
failed restore kept off stderr."""

from __future__ import annotations

import gc
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from menagerie.train.checkpoint import Checkpointer
from menagerie.train.errors import TrainingError
from menagerie.train.metrics import read_metrics

from ..cli_testing import assert_close_states, saved_state
from .faults_testing import (
    Workspace,
    assert_one_error_line,
    run_cli,
    train_args,
    trained_run,  # noqa: F401 - a fixture
)


def _garble(step_dir: Path) -> None:
    """Truncates the biggest file of a checkpoint's state to half: unreadable."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
    victim = max(files, key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])


def _steps(run: Path) -> list[int]:
    return sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())


def _params_finite(step_dir: Path) -> bool:
    state = ocp.StandardCheckpointer().restore((step_dir / "state").absolute())
    return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))


def test_unreadable_newest_checkpoint_is_moved_aside_and_its_step_saved_again(
    tmp_path,
    trained_run,  # noqa: F811
):
    ws = Workspace(tmp_path, trained_run)
    run = ws.root / "run"
    _garble(run / "checkpoints" / "3")

    again = run_cli(train_args(run))  # the same command: resumes from 2, retrains 3
    assert again.returncode == 0, again.stderr[-3000:]
    moved = list((run / "checkpoints").glob("3.unreadable-*"))
    assert len(moved) == 1, again.stdout[-3000:]
    notes = [line for line in again.stdout.splitlines() if moved[0].name in line]
    assert len(notes) == 1 and "moved" in notes[0], again.stdout[-3000:]
    assert _steps(run) == [2, 3]
    # Step 3 trained again from step 2's checkpoint ends where the first run did, bit for bit.
    assert_close_states(
        saved_state(run / "checkpoints" / "3"), saved_state(trained_run / "checkpoints" / "3"), 0
    )

    rerun = run_cli(train_args(run))  # nothing left to train: resumes from the new 3, stops
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "is unreadable" not in rerun.stdout
    assert f"resumed from {run / 'checkpoints' / '3'} (step 3)" in rerun.stdout


def test_non_finite_update_is_never_committed_nor_saved(tmp_path):
    """lr 3e38 with weight decay 100: the first update overflows the decayed matrices to inf
    while loss and gradient are finite. Every update is skipped, every checkpoint holds the
    (finite) initial parameters, and the error line names the newest one."""
    run = tmp_path / "run"
    done = run_cli(
        train_args(
            run,
            "train.steps=20",
            "optim.lr=3e38",
            "optim.weight_decay=100",
            "optim.clip_norm=null",
            "optim.warmup_steps=0",
            "optim.schedule=constant",
            "train.max_bad_steps=3",
        )
    )
    line = assert_one_error_line(done, "3 non-finite steps in a row")
    rows = read_metrics(run)
    assert sorted(rows) == [1, 2, 3] and all(r["finite"] == 0 for r in rows.values()), rows
    assert rows[3]["skipped"] == 3
    steps = _steps(run)
    assert steps and all(_params_finite(run / "checkpoints" / str(s)) for s in steps)
    assert f"{run / 'checkpoints' / str(steps[-1])}" in line, line


def test_checkpoint_save_refuses_non_finite_state(tmp_path):
    ckpt = Checkpointer(tmp_path, every=1, keep_last=2, keep_every=None, async_save=False)
    try:
        bad = {"params": {"w": jnp.array([1.0, jnp.inf])}, "step": jnp.array(1)}
        with pytest.raises(TrainingError, match="not finite"):
            ckpt.save(1, bad, {})
    finally:
        ckpt.close()
    assert not (tmp_path / "checkpoints" / "1").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs: room for one checkpoint of the tiny model (1.7 MB), not two."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        yield disk, ["prlimit", "--fsize=1000000"]  # no mount allowed: every save fails
        return
    try:
        yield disk, []
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_disk_full_during_a_save_stops_the_run_with_one_line(small_disk):
    disk, prefix = small_disk
    run = disk / "run"
    done = run_cli(train_args(run, "train.steps=30"), prefix=prefix)
    line = assert_one_error_line(done, str(run / "checkpoints"))
    assert "space" in line or "too large" in line, line
    assert max(read_metrics(run)) < 30  # stopped
    assert not (run / ".lock").exists()
    if not prefix:  # the earlier checkpoint is intact: it restores
        assert _steps(run) == [1] and _params_finite(run / "checkpoints" / "1")


def test_eval_without_a_readable_checkpoint_gives_advice_eval_can_take(tmp_path, trained_run):  # noqa: F811
    ws = Workspace(tmp_path, trained_run)
    run = ws.root / "run"
    for step in (2, 3):
        _garble(run / "checkpoints" / str(step))
    line = ws.fails(["eval", f"run_dir={run}"], "no readable checkpoint")
    assert "--start-over" not in line, line


def _collected_while_suspended(message: str) -> None:
    """A coroutine that raises Exception(message) when it is closed, as Orbax's array reads do
    after a failed restore: collecting it while suspended makes an unraisable exception."""

    @types.coroutine
    def pending():
        yield

    async def read():
        try:
            await pending()
        finally:
            raise Exception(message)  # noqa: B012 - what the reads do

    coro = read()
    coro.send(None)
    del coro
    gc.collect()


def test_failed_restore_leftovers_are_dropped_but_other_unraisables_are_not(tmp_path, monkeypatch):
    """The CI failure of 2026-11-30: eval printed Orbax's coroutine traceback after its one
    line. Checkpointer drops unraisable errors from TensorStore reads and keeps the rest."""
    monkeypatch.delenv("MENAGERIE_ORBAX_LOGS", raising=False)
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(str(u.exc_value)))
    Checkpointer(tmp_path, every=1, keep_last=1, keep_every=None).close()
    _collected_while_suspended("error while reading array index. See full TensorStore details")
    assert seen == []
    _collected_while_suspended("a bug of ours")
    assert seen == ["a bug of ours"]
