"""A multi-process run never hangs on a lost peer, and stops as one on a SIGTERM to any of its
processes: two real processes (jax.distributed, gloo on localhost) through the real CLI, FSDP
over their two devices so that each process holds and saves its own half of the state. Every
wait has its own timeout, the backstop if the run would hang.

Checkpoints across process counts and meshes: tests/train/test_multiprocess.py."""

from __future__ import annotations

import re
import signal
import socket
import time

from menagerie.train.distributed import EXIT_PEER_LOST, HEARTBEATS, PeerWatch

from ..cli_testing import assert_close_states, cli_env, cli_popen, cli_wait, saved_state
from .faults_testing import assert_one_error_line, train_args, wait_for_step

# Every run trains one program (faults_testing.ONE_PROGRAM: train.steps does not change it), so
# the second two-process run loads it from the session's compilation cache.
FSDP = ("mesh.data=1", "mesh.fsdp=2")
PEER_TIMEOUT = 5  # seconds (MENAGERIE_PEER_TIMEOUT); the default is 120
SAVED = r"preemption notice \(SIGTERM or Ctrl-C to one of the 2 processes\): saved step (\d+) "


def _two_processes(run, *overrides: str):
    """The two processes of one run, started; stdout and stderr apart."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **cli_env(),
        "MENAGERIE_COORDINATOR": f"127.0.0.1:{port}",
        "MENAGERIE_NUM_PROCESSES": "2",
        "MENAGERIE_PEER_TIMEOUT": str(PEER_TIMEOUT),
    }
    args = train_args(run, "train.steps=100000", *FSDP, *overrides)
    return [
        cli_popen(*args, env={**env, "MENAGERIE_PROCESS_ID": str(i)}, split_stderr=True)
        for i in range(2)
    ]


def _one_process(run, *overrides: str):
    """One process with two simulated devices, on the same mesh as the two processes."""
    env = cli_env()
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"
    return cli_popen(*train_args(run, *FSDP, *overrides), env=env, split_stderr=True)


def test_sigterm_to_one_process_stops_both_at_one_step_and_a_killed_one_is_named(tmp_path):
    """SIGTERM to process 1 alone: both processes save the same step N (each its half of the
    state) and exit 0. Both resume from it and train on; process 1 is killed (SIGKILL) after
    they saved step N + 2: process 0 exits within the peer timeout with one line naming it.
    One process trained from scratch to N + 2 saved the same states, bit for bit, at N and at
    N + 2: the SIGTERM checkpoint is the state of step N, and training from it goes on exactly.

    Caught when broken (each seen to fail it, bench/mutants/peers-*): each process deciding
    alone to stop (process 1 saves while process 0 trains on: they wait on each other until
    the test's timeout); no peer watch (the survivor does not end in the line naming process
    1); a failed collective that does not wait for the watch's verdict (a traceback first)."""
    run, reference = tmp_path / "run", tmp_path / "reference"
    n = _sigterm_to_process_1(run)
    assert _steps(run) == [n]
    pair = _two_processes(run, "checkpoint.every=1", "checkpoint.keep_last=100")
    alone = _one_process(reference, f"train.steps={n + 2}", f"checkpoint.every={n}")
    try:
        survivor, took = _kill_process_1_after(run, n + 2, pair)
        [trained] = cli_wait(alone, timeout=300)
    finally:
        for proc in (*pair, alone):
            proc.kill()
    assert f"resumed from {run / 'checkpoints' / str(n)} (step {n})" in survivor.stdout
    line = assert_one_error_line(survivor, "process 1 of 2 stopped answering", EXIT_PEER_LOST)
    assert f"no heartbeat for {PEER_TIMEOUT} s, MENAGERIE_PEER_TIMEOUT" in line, line
    # The last beat came up to one interval (0.5 s) before the kill; the slack: a loaded machine.
    assert PEER_TIMEOUT - 1 < took < PEER_TIMEOUT + 30, took
    assert trained.returncode == 0, trained.stderr[-3000:]
    for step in (n, n + 2):
        saved = saved_state(run / "checkpoints" / str(step))
        assert int(saved["step"]) == step
        assert_close_states(saved, saved_state(reference / "checkpoints" / str(step)), rtol=0.0)


def _sigterm_to_process_1(run) -> int:
    """Trains two processes, sends SIGTERM to process 1 after step 3; the step both saved."""
    pair = _two_processes(run, "checkpoint.every=1000")
    try:
        wait_for_step(run, 3, pair[0])
        pair[1].send_signal(signal.SIGTERM)
        done = cli_wait(*pair, timeout=120)
    finally:
        for proc in pair:
            proc.kill()
    said = []
    for proc in done:
        assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
        said += [int(step) for step in re.findall(SAVED, proc.stdout)]
    assert len(said) == 2 and said[0] == said[1] > 3, said
    return said[0]


def _kill_process_1_after(run, step: int, pair) -> tuple:
    """SIGKILL to process 1 once `step` is saved; process 0's end and the seconds it took."""
    deadline = time.monotonic() + 300
    while not (run / "checkpoints" / str(step)).is_dir():
        assert pair[0].poll() is None and time.monotonic() < deadline, "no checkpoint"
        time.sleep(0.05)
    pair[1].kill()
    killed = time.monotonic()
    [survivor] = cli_wait(pair[0], timeout=120)
    return survivor, time.monotonic() - killed


def _steps(run) -> list[int]:
    return sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())


class _Store:
    """A coordination service's key-value store as `PeerWatch` uses it; `down` = unreachable."""

    def __init__(self):
        self.values, self.down = {}, False

    def key_value_set(self, key, value, allow_overwrite=False):
        if self.down:
            raise RuntimeError("UNAVAILABLE")
        self.values[key] = value

    def key_value_dir_get(self, prefix):
        if self.down:
            raise RuntimeError("UNAVAILABLE")
        return [(k, v) for k, v in self.values.items() if k.startswith(prefix)]


def test_peer_watch_names_the_silent_processes_and_never_a_beating_one():
    """Silence is timed from when a process's counter last moved (its watch thread beats
    whatever its training does, a long compile included); a process whose counter moves is
    never lost. Caught when broken (seen): a counter compared with the first one ever read."""
    store = _Store()
    watch = PeerWatch(lambda: store, me=1, count=4, timeout=10)
    t0 = watch.answered
    for t in range(0, 30, 2):  # process 0 beats throughout, 2 until t=4, 3 never
        store.values[f"{HEARTBEATS}0"] = str(t)
        if t <= 4:
            store.values[f"{HEARTBEATS}2"] = str(t)
        watch.exchange(store, t, t0 + t)
        assert watch.lost(t0 + t) == ([2, 3] if t > 14 else [3] if t > 10 else []), t
    assert watch.verdict([2, 3]).startswith("error: processes 2, 3 of 4 stopped answering")
    store.down = True  # the coordination service (process 0's) is gone
    for t in range(30, 45, 2):
        watch.exchange(store, t, t0 + t)
    assert watch.lost(t0 + 44) == [0]


def test_a_dead_process_last_beat_read_late_is_not_taken_for_life():
    """After an error, `wait_for_peers` asks each counter to move twice: process 2 wrote its
    last beat and died just before the wait began, and the watch reads that beat only after,
    once; a live process 0 moves on. Catches (seen failing in CI as a race): a wait that ends
    on one move, so the error's traceback prints before the watch's line naming process 2."""
    store = _Store()
    watch = PeerWatch(lambda: store, me=1, count=3, timeout=10)
    store.values.update({f"{HEARTBEATS}0": "1", f"{HEARTBEATS}2": "1"})
    watch.exchange(store, 1, watch.answered)
    store.values[f"{HEARTBEATS}2"] = "2"  # its last beat, then it dies
    start = dict(watch.moves)  # the error: the wait starts here
    for beat in range(2, 6):
        store.values[f"{HEARTBEATS}0"] = str(beat)
        watch.exchange(store, beat, watch.answered + beat)
    assert not watch.alive_since(start)
    store.values[f"{HEARTBEATS}2"] = "3"  # had it lived
    watch.exchange(store, 6, watch.answered + 6)
    store.values[f"{HEARTBEATS}2"] = "4"
    watch.exchange(store, 7, watch.answered + 7)
    assert watch.alive_since(start)


def test_a_process_alive_but_stuck_is_named_after_the_step_timeout():
    """Heartbeats carry the last finished step. Process 1 keeps beating but finishes nothing
    after step 5 while process 0 reached 6: once nothing finished for MENAGERIE_STEP_TIMEOUT
    (counted from the first finished step: the first compile is not timed) its watch names
    process 1 as behind; when both stop at one step, the line says every process is stuck.
    Catches: the step not carried by the heartbeat (every process then looks stuck at one
    step), the first compile timed, a stall reported before the timeout."""
    store = _Store()
    zero, one = (
        PeerWatch(lambda: store, me=i, count=2, timeout=60, step_timeout=30) for i in (0, 1)
    )
    t0 = zero.answered
    for watch in (zero, one):
        watch.exchange(store, 1, t0)
        assert watch.stuck(t0 + 1000) is None  # no step finished yet: compiling
    zero.progress(5), one.progress(5)
    zero.progress(6)
    for beat in (2, 3):
        for watch in (zero, one):
            watch.exchange(store, beat, t0 + beat)
    assert one.stuck(one.progressed + 29) is None
    line = one.stuck(one.progressed + 31)
    assert line == (
        "error: nothing finished for 30 s (MENAGERIE_STEP_TIMEOUT): process 1 stuck after step "
        "5, others at 6; process 1 of 2 stops too: start all 2 processes again to resume from "
        "the last checkpoint"
    )
    assert "process 1 stuck after step 5, others at 6" in zero.stuck(zero.progressed + 31)
    one.progress(6)
    for watch in (zero, one):
        watch.exchange(store, 4, t0 + 4)
    assert "every process is stuck after step 6" in one.stuck(one.progressed + 31)
