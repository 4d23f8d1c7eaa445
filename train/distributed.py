"""Multi-process (multi-host) start-up: `jax.distributed.initialize` before JAX is used.

One process per host (GPU: per host or per GPU; TPU: per host), all running the same command.
`menagerie train` calls `initialize()` first, which reads:

    MENAGERIE_COORDINATOR=host:port  MENAGERIE_NUM_PROCESSES=N  MENAGERIE_PROCESS_ID=i

(all three, explicitly), or `MENAGERIE_DISTRIBUTED=auto` to let JAX detect the cluster (SLURM,
Open MPI, Cloud TPU, Kubernetes JobSet). Neither set: a single process, nothing is done. Each
process says what it waits for, and waits at most MENAGERIE_COORDINATOR_TIMEOUT seconds (300 by
default): a process other than 0 that cannot reach the coordinator in that time stops with one
line; process 0 (which runs the coordinator) and the start-up after the connection are bounded
by the same timeout, but when they run out JAX itself ends the process with its own message. On
CPU the collectives between processes go through gloo. After it, `jax.devices()` lists every
process's devices; the mesh spans them all, each process feeds its slice of the global batch
(`data.pipeline`), process 0 alone writes logs and the run's config, and Orbax coordinates the
checkpoint writes.

Failures never hang (`PeerWatch`, `preemption_reached`):

- A lost peer: every process writes a heartbeat counter into the coordination service's
  key-value store and watches the others'; a process whose counter has not moved for
  MENAGERIE_PEER_TIMEOUT seconds (120 by default) is lost, and every other process prints one
  line naming it and exits with status 3 (`EXIT_PEER_LOST`). An error in training first waits
  until the other processes are seen alive (`peer_failures`): a collective that failed because
  its peer is gone (gloo: "connection reset by peer") ends in that line, not a traceback.
  JAX's own heartbeat detection, set to twice that timeout, is the backstop. When process 0
  dies, its coordination service goes with it and JAX ends every other process at once with
  its own message (`client.h`: "Terminating process because the JAX distributed service
  detected fatal errors").
- A stuck run: the heartbeat also carries the process's last finished step (`progress`, which
  the trainer calls after every step and every evaluation batch). When this process has
  finished nothing for MENAGERIE_STEP_TIMEOUT seconds (1800 by default; counted from its
  first finished step, so the first compile is not timed), it prints one line naming the
  processes that are behind (or saying that all are stuck at one step, as in a collective that
  never completes) and exits 3: a process alive but stuck no longer hangs the run.
- A preemption: SIGTERM to any one process (or several) is JAX's preemption notice; the
  processes agree on the step at which all of them save and stop
  (`multihost_utils.reached_preemption_sync_point`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable

from .errors import ConfigError

ENV_COORDINATOR = "MENAGERIE_COORDINATOR"
ENV_NUM_PROCESSES = "MENAGERIE_NUM_PROCESSES"
ENV_PROCESS_ID = "MENAGERIE_PROCESS_ID"
ENV_AUTO = "MENAGERIE_DISTRIBUTED"
ENV_TIMEOUT = "MENAGERIE_COORDINATOR_TIMEOUT"
DEFAULT_TIMEOUT_S = 300
ENV_PEER_TIMEOUT = "MENAGERIE_PEER_TIMEOUT"
DEFAULT_PEER_TIMEOUT_S = 120
ENV_STEP_TIMEOUT = "MENAGERIE_STEP_TIMEOUT"
DEFAULT_STEP_TIMEOUT_S = 1800
EXIT_PEER_LOST = 3
HEARTBEATS = "menagerie/heartbeat/"

_done = [False]


def _int_env(env, name: str) -> int:
    raw = env[name]
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None


def initialize(env: dict[str, str] | None = None) -> bool:
    """Initialises `jax.distributed` from the environment; True if this is a multi-process run.

    Must run before anything touches a JAX backend. Idempotent."""
    env = os.environ if env is None else env
    explicit = [k for k in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID) if k in env]
    auto = env.get(ENV_AUTO, "").lower()
    if not explicit and auto in ("", "0", "off", "false"):
        return False
    if _done[0]:
        return True
    import jax

    if explicit and len(explicit) != 3:
        missing = sorted({ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID} - set(explicit))
        raise ConfigError(
            f"multi-process run: {', '.join(explicit)} set but {', '.join(missing)} missing; "
            "set all three (or MENAGERIE_DISTRIBUTED=auto on a cluster JAX can detect)"
        )
    if explicit:
        n, i = _int_env(env, ENV_NUM_PROCESSES), _int_env(env, ENV_PROCESS_ID)
        if n < 1 or not 0 <= i < n:
            raise ConfigError(
                f"{ENV_PROCESS_ID}={i} must be in [0, {ENV_NUM_PROCESSES}={n}); number the "
                "processes 0 .. N-1"
            )
        address = env[ENV_COORDINATOR]
        kwargs = dict(coordinator_address=address, num_processes=n, process_id=i)
    elif auto in ("1", "on", "true", "auto"):
        kwargs = {}
    else:
        raise ConfigError(f"{ENV_AUTO}={env[ENV_AUTO]!r}: use 'auto' or 'off'")
    timeout = _seconds(env, ENV_TIMEOUT, DEFAULT_TIMEOUT_S)
    peer_timeout = _seconds(env, ENV_PEER_TIMEOUT, DEFAULT_PEER_TIMEOUT_S)
    step_timeout = _seconds(env, ENV_STEP_TIMEOUT, DEFAULT_STEP_TIMEOUT_S)
    if explicit:
        print(
            f"process {i} of {n}: connecting to the coordinator at {address} "
            f"(waits up to {timeout} s, {ENV_TIMEOUT})",
            flush=True,
        )
        if i != 0:  # process 0 starts the coordinator inside initialize
            _wait_for_coordinator(address, timeout, f"process {i} of {n}")
    else:
        print(f"{ENV_AUTO}=auto: joining the cluster (waits up to {timeout} s)", flush=True)
    # CPU processes exchange data through gloo (harmless where the backend is GPU/TPU).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_enable_preemption_service", True)  # `preemption_reached` needs it
    jax.distributed.initialize(
        **kwargs,
        initialization_timeout=timeout,
        # JAX's own verdict on a silent peer comes after ours, which names it (`PeerWatch`).
        heartbeat_timeout_seconds=2 * peer_timeout,
    )
    _done[0] = True
    _watch_peers(peer_timeout, step_timeout)
    return True


def _watch_peers(timeout: int, step_timeout: int) -> None:
    import jax
    from jax._src.distributed import global_state  # its client is None after shutdown

    me, count = jax.process_index(), jax.process_count()
    watch = PeerWatch(lambda: global_state.client, me, count, timeout, step_timeout)
    watch.start()
    _watch[0] = watch


def _seconds(env, name: str, default: int) -> int:
    raw = env.get(name, str(default))
    try:
        seconds = int(raw)
    except ValueError:
        seconds = 0
    if seconds <= 0:
        raise ConfigError(f"{name}={raw!r} must be a whole number of seconds > 0")
    return seconds


def _wait_for_coordinator(address: str, timeout: int, who: str) -> None:
    """Until the coordinator's port accepts a connection; ConfigError after `timeout` s. (JAX's
    own client ends the process, without a Python error, when it cannot connect.)"""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")  # [::1]:1234
    if not host or not port.isdigit():
        raise ConfigError(f"{ENV_COORDINATOR}={address!r}: use host:port (process 0's host)")
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((host, int(port)), timeout=max(0.1, min(left, 5))):
                return
        except OSError as e:
            reason = e.strerror or str(e) or type(e).__name__
        if time.monotonic() + 0.5 >= deadline:
            raise ConfigError(
                f"{who}: no coordinator answered at {address} within {timeout} s ({reason}); "
                f"start process 0 (it runs the coordinator), check {ENV_COORDINATOR} (process "
                f"0's host:port) and the network, or raise {ENV_TIMEOUT}"
            )
        time.sleep(0.5)


def from_process_0(flag: bool) -> bool:
    """Process 0's `flag`, on every process (a no-op with one process): what process 0 alone
    decided, for example whether it holds the run folder's lock."""
    import jax

    if jax.process_count() == 1:
        return flag
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def barrier(name: str) -> None:
    """Waits for every process (a no-op with one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class PeerWatch(threading.Thread):
    """Every `interval` seconds: this process's heartbeat counter into the coordination
    service's key-value store, and every other process's counter out of it. A process whose
    counter has not moved for `timeout` seconds is lost: this thread prints one line naming it
    and ends this process (`EXIT_PEER_LOST`), whatever the main thread is doing. `os._exit`, not
    an exception: the main thread may be blocked in a collective, and a normal exit would wait
    for the lost process in `jax.distributed.shutdown`.

    The counters come from this thread, not from the training loop, so a slow step (the first
    one compiles, an eval, a checkpoint) never looks like a lost process: XLA compiles and runs
    with Python's GIL released, and this thread holds it for microseconds. Each process times
    the others with its own clock, so the hosts' clocks need not agree.

    A heartbeat is "counter/step": the step is this process's last finished one (`progress`).
    When this process has finished nothing for `step_timeout` seconds since its first finished
    step, `stuck` names the processes that are behind and this thread ends the process too."""

    def __init__(
        self, client: Callable, me: int, count: int, timeout: float, step_timeout: float = 0
    ):
        super().__init__(name="menagerie-peer-watch", daemon=True)
        self.client, self.me, self.count, self.timeout = client, me, count, timeout
        self.step_timeout = step_timeout  # 0: no step watch
        self.step: int | None = None  # this process's last finished step (None: none yet)
        self.progressed: float | None = None  # when `progress` was last called
        self.steps: dict[int, int] = {}  # the others' last finished steps, as last read
        self.interval = min(max(timeout / 10, 0.2), 5.0)
        now = time.monotonic()
        self.seen = {i: ("", now) for i in range(count) if i != me}  # counter, when it moved
        self.moves = dict.fromkeys(self.seen, 0)  # how often each counter was seen to move
        self.answered = now  # when the store last answered

    def run(self) -> None:
        beat = 0
        while (client := self.client()) is not None:  # None: JAX has shut down
            beat += 1
            self.exchange(client, beat, time.monotonic())
            now = time.monotonic()
            if line := (self.verdict(lost) if (lost := self.lost(now)) else self.stuck(now)):
                os.write(2, (line + "\n").encode())
                os._exit(EXIT_PEER_LOST)
            time.sleep(self.interval)

    def progress(self, step: int | None) -> None:
        """Marks `step` finished now (None: progress within the last step, an eval batch)."""
        self.step = self.step if step is None else step
        self.progressed = time.monotonic()

    def stuck(self, now: float) -> str | None:
        """The one line when nothing finished here for `step_timeout` s: which processes are
        behind (the lowest last finished step), or that every process stopped at one step."""
        if not self.step_timeout or self.progressed is None or self.step is None:
            return None
        if now - self.progressed <= self.step_timeout:
            return None
        steps = {**self.steps, self.me: self.step}
        low, high = min(steps.values()), max(steps.values())
        behind = sorted(i for i, s in steps.items() if s == low)
        if low == high:
            where = f"every process is stuck after step {low} (a collective or I/O that never ends)"
        else:
            who = "process" if len(behind) == 1 else "processes"
            where = f"{who} {', '.join(map(str, behind))} stuck after step {low}, others at {high}"
        return (
            f"error: nothing finished for {self.step_timeout} s ({ENV_STEP_TIMEOUT}): {where}; "
            f"process {self.me} of {self.count} stops too: start all {self.count} processes "
            "again to resume from the last checkpoint"
        )

    def wait_for_peers(self) -> None:
        """Until every other process's counter has moved twice since this call (a few intervals
        if all are alive), or until one is lost and `run` ends this process: at most `timeout`
        and three intervals. Twice: the first move seen may be the last write of a process
        that died just before this call; the second was written after that read."""
        since, start = time.monotonic(), dict(self.moves)
        while time.monotonic() < since + self.timeout + 3 * self.interval and self.is_alive():
            if self.alive_since(start):
                return
            time.sleep(self.interval / 4)

    def alive_since(self, start: dict[int, int]) -> bool:
        """Whether every other process's counter moved twice since `moves` was `start`."""
        return all(self.moves[i] >= start[i] + 2 for i in start)

    def exchange(self, client, beat: int, now: float) -> None:
        """Writes this process's counter and reads the others' (any error: the store did not
        answer; `lost` times that; a call that never returns is left to JAX's heartbeat)."""
        try:
            step = "-" if self.step is None else self.step
            client.key_value_set(f"{HEARTBEATS}{self.me}", f"{beat}/{step}", allow_overwrite=True)
            counters = dict(client.key_value_dir_get(HEARTBEATS))
        except Exception:  # noqa: BLE001 - whatever the client raises, the store did not answer
            return
        self.answered = now
        for i, (old, _) in self.seen.items():
            new = counters.get(f"{HEARTBEATS}{i}", old)
            if new != old:
                self.seen[i] = (new, now)
                self.moves[i] += 1
                _, _, step = new.partition("/")
                if step.isdigit():
                    self.steps[i] = int(step)

    def lost(self, now: float) -> list[int]:
        """The processes silent for more than `timeout` s; process 0 alone if the store (which
        process 0 runs) has not answered for that long."""
        if self.me != 0 and now - self.answered > self.timeout:
            return [0]
        return sorted(i for i, (_, moved) in self.seen.items() if now - moved > self.timeout)

    def verdict(self, lost: list[int]) -> str:
        who = f"process {lost[0]}" if len(lost) == 1 else f"processes {', '.join(map(str, lost))}"
        return (
            f"error: {who} of {self.count} stopped answering (no heartbeat for {self.timeout} s, "
            f"{ENV_PEER_TIMEOUT}); process {self.me} stops too: start all {self.count} processes "
            "again to resume from the last checkpoint"
        )


_watch: list[PeerWatch | None] = [None]


def progress(step: int | None = None) -> None:
    """Tells the peer watch (multi-process runs) that `step` finished, or (None) that work after
    the last step did (an evaluation batch): two attribute writes."""
    if (watch := _watch[0]) is not None:
        watch.progress(step)


@contextlib.contextmanager
def peer_failures():
    """Around work with collectives: an error (a collective whose peer is gone, as gloo's
    "connection reset by peer" or an Orbax save that failed on it) waits until every other
    process is seen alive (`PeerWatch.wait_for_peers`) before it goes on up; if one was lost,
    the watch ends this process with the one line that names it, and nothing else is printed."""
    try:
        yield
    except Exception:
        watch = _watch[0]
        if watch is not None and watch.is_alive():
            watch.wait_for_peers()
        raise


def preemption_reached(iteration: int) -> bool:
    """Whether every process stops after this loop `iteration` (1, 2, ... since the run started
    or resumed; the same count on every process): True at one iteration, the same on all, after
    a SIGTERM to any of them. JAX's preemption sync: its SIGTERM handler (installed by
    `jax.distributed.initialize`) tells the coordination service, which gives every process the
    next iteration of the fastest one. Without a notice, a call only reads a counter."""
    from jax.experimental import multihost_utils

    return multihost_utils.reached_preemption_sync_point(iteration)
