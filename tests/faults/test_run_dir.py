"""Run-folder faults through the real CLI: one run at a time per folder (a lock that names its
holder, a stale one taken over), OS errors on the folder (one line naming the file and the fix),
`--start-over` of the folder one stands in, and a resume that reads other data."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import yaml

from ..cli_testing import ROOT, cli_env, cli_popen, cli_wait
from .faults_testing import (
    NO_DAC,
    Workspace,
    assert_one_error_line,
    run_cli,
    snapshot,
    train_args,
    trained_run,  # noqa: F401 - a fixture
    wait_for_step,
)


def test_second_trainer_on_a_held_run_dir_is_refused_naming_the_holder(tmp_path, trained_run):  # noqa: F811
    """While one trainer holds the folder, another exits 2 naming it (host, pid); eval still
    reads the folder; the holder still stops on SIGTERM with exit 0 and releases the lock."""
    ws = Workspace(tmp_path, trained_run)
    run = ws.root / "run"
    # No checkpoint is written while the others run (checkpoint.every=1000), so eval reads
    # a checkpoint that stays.
    holder = cli_popen(*train_args(run, "train.steps=100000", "checkpoint.every=1000"))
    started = [holder]
    try:
        wait_for_step(run, 4, holder)
        # The finished run's own command: a second trainer that got in all the same would find
        # nothing left to train and end at once (exit 0, nothing compiled), not run on.
        started.append(cli_popen(*train_args(run), split_stderr=True))
        started.append(cli_popen("eval", f"run_dir={run}", split_stderr=True))
        second, reader = cli_wait(*started[1:], timeout=120)
        line = assert_one_error_line(second, f"pid {holder.pid}")
        assert socket.gethostname() in line and "another run" in line, line
        assert reader.returncode == 0 and "step 3: eval loss" in reader.stdout, reader.stderr
        holder.send_signal(signal.SIGTERM)
        out, _ = holder.communicate(timeout=120)
    finally:
        for proc in started:  # none outlives a failed check
            proc.kill()
    assert holder.returncode == 0, out[-2000:]
    assert "SIGTERM: saved step" in out
    assert not (run / ".lock").exists()


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, trained_run):  # noqa: F811
    ws = Workspace(tmp_path, trained_run)
    run = ws.root / "run"
    dead = subprocess.Popen(["true"])
    dead.wait()
    holder = {"host": socket.gethostname(), "pid": dead.pid, "started": "earlier", "command": "x"}
    (run / ".lock").write_text(json.dumps(holder))
    done = run_cli(train_args(run))  # resumes at its last step: nothing to train, it stops
    assert done.returncode == 0, done.stderr[-3000:]
    warnings = [line for line in done.stdout.splitlines() if f"pid {dead.pid}" in line]
    assert len(warnings) == 1 and "taking it over" in warnings[0], done.stdout[-3000:]
    assert "resumed from" in done.stdout
    assert not (run / ".lock").exists()


def test_read_only_run_dir_gives_one_line(tmp_path, trained_run):  # noqa: F811
    ws = Workspace(tmp_path, trained_run)
    run = ws.root / "run"
    subprocess.run(["chmod", "-R", "a-w", str(run)], check=True)
    try:
        line = ws.fails(train_args(run, "train.steps=4"), "Permission denied", prefix=NO_DAC)
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(run)], check=True)
    assert str(run) in line and "writable" in line, line


def test_run_dir_name_too_long_gives_one_line(tmp_path):
    ws = Workspace(tmp_path)
    ws.fails(train_args(ws.root / ("x" * 300)), "too long")


@pytest.mark.parametrize("run_dir, cwd", [(".", ""), ("..", "sub")])
def test_start_over_of_the_folder_one_stands_in_is_refused(tmp_path, run_dir, cwd):
    """`run_dir=.` (or a folder above the current one) with --start-over would move the
    current folder aside: refused, nothing moved."""
    ws = Workspace(tmp_path)
    (ws.root / "sub").mkdir()
    ws.fails(
        [*train_args(run_dir), "--start-over"], "current folder", cwd=ws.root / cwd, allow_new=()
    )


def test_run_dir_name_that_is_not_utf8_gives_one_line(tmp_path):
    ws = Workspace(tmp_path)
    before = snapshot(ws.root)
    name = os.fsencode(ws.root) + b"/run\xff"
    args = [*train_args("x")[:-1], b"run_dir=" + name]
    proc = subprocess.run(
        [sys.executable, "-m", "menagerie.train.cli", *args],
        capture_output=True,
        env=cli_env(),
        cwd=ROOT,
        timeout=300,
    )
    proc.stdout, proc.stderr = (s.decode("utf-8", "replace") for s in (proc.stdout, proc.stderr))
    line = assert_one_error_line(proc, "UTF-8")
    assert "\\xff" in line, line
    assert snapshot(ws.root) == before


def test_resume_with_other_data_warns_and_keeps_the_old_config(tmp_path, trained_run):  # noqa: F811
    ws = Workspace(tmp_path, trained_run)
    run = ws.root / "run"
    docs = ws.root / "docs.jsonl"
    words = "the quick brown fox jumps over the lazy dog".split()
    docs.write_text(
        "".join(
            json.dumps({"text": " ".join(words[(i + j) % 9] for j in range(200))}) + "\n"
            for i in range(200)
        )
    )
    old_config = (run / "config.yaml").read_text()
    done = run_cli(train_args(run, "train.steps=4", f"data.source={docs}"))
    assert done.returncode == 0, done.stderr[-3000:]
    warnings = [line for line in done.stdout.splitlines() if "differ" in line]
    assert len(warnings) == 1, done.stdout[-3000:]
    assert f"data.source: 'stdlib' -> '{docs}'" in warnings[0], warnings[0]
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["source"] == str(docs)
    kept = [p for p in run.glob("config.*.yaml")]
    assert len(kept) == 1 and kept[0].read_text() == old_config, kept
