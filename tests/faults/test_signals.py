"""How a run starts and stops, through the real CLI: Ctrl-C (SIGINT) saves and exits 130 like
SIGTERM saves and exits 0, a second Ctrl-C aborts at once; a process that cannot reach its
coordinator says what it waits for and gives up after MENAGERIE_COORDINATOR_TIMEOUT."""

from __future__ import annotations

import signal
import socket
import time

from ..cli_testing import cli_env, cli_popen, cli_wait
from .faults_testing import assert_one_error_line, run_cli, train_args, wait_for_step

LONG = ("train.steps=100000", "checkpoint.every=1000")  # no checkpoint but the one asked for


def _steps(run) -> list[int]:
    folder = run / "checkpoints"
    return (
        sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []
    )


def test_first_sigint_saves_at_the_step_boundary_and_exits_130(tmp_path):
    run = tmp_path / "run"
    proc = cli_popen(*train_args(run, *LONG), split_stderr=True)
    wait_for_step(run, 2, proc)
    proc.send_signal(signal.SIGINT)
    [done] = cli_wait(proc, timeout=120)
    assert done.returncode == 130, (done.stdout[-2000:], done.stderr[-3000:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted: saved step "), done.stderr[-3000:]
    step = int(lines[0].removeprefix("interrupted: saved step ").split()[0])
    assert _steps(run) == [step] and step >= 2
    assert not (run / ".lock").exists()


def test_second_sigint_aborts_at_once(tmp_path):
    run = tmp_path / "run"
    proc = cli_popen(*train_args(run, *LONG), split_stderr=True)
    wait_for_step(run, 2, proc)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    [done] = cli_wait(proc, timeout=120)
    assert done.returncode == 130, (done.stdout[-2000:], done.stderr[-3000:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted"), done.stderr[-3000:]
    assert "Traceback" not in done.stdout + done.stderr
    assert not (run / ".lock").exists()


def test_unreachable_coordinator_says_what_it_waits_for_then_gives_up(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = cli_env()
    env.update(
        MENAGERIE_COORDINATOR=f"127.0.0.1:{port}",
        MENAGERIE_NUM_PROCESSES="2",
        MENAGERIE_PROCESS_ID="1",  # not 0: it does not start the coordinator itself
        MENAGERIE_COORDINATOR_TIMEOUT="5",
    )
    t0 = time.monotonic()
    done = run_cli(train_args(tmp_path / "run"), env=env, timeout=90)
    line = assert_one_error_line(done, f"127.0.0.1:{port}")
    assert time.monotonic() - t0 < 60
    assert "MENAGERIE_COORDINATOR_TIMEOUT" in line, line
    waiting = [x for x in done.stdout.splitlines() if f"127.0.0.1:{port}" in x]
    assert len(waiting) == 1 and "process 1 of 2" in waiting[0], done.stdout
    assert not (tmp_path / "run").exists()
