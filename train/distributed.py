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
CPU
the collectives between processes go through gloo. After it, `jax.devices()` lists every
process's devices; the mesh spans them all, each process feeds its slice of the global batch
(`data.pipeline`), process 0 alone writes logs and the run's config, and Orbax coordinates the
checkpoint writes.
"""

from __future__ import annotations

import os
import socket
import time

from .errors import ConfigError

ENV_COORDINATOR = "MENAGERIE_COORDINATOR"
ENV_NUM_PROCESSES = "MENAGERIE_NUM_PROCESSES"
ENV_PROCESS_ID = "MENAGERIE_PROCESS_ID"
ENV_AUTO = "MENAGERIE_DISTRIBUTED"
ENV_TIMEOUT = "MENAGERIE_COORDINATOR_TIMEOUT"
DEFAULT_TIMEOUT_S = 300

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
    timeout = _timeout(env)
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
    jax.distributed.initialize(**kwargs, initialization_timeout=timeout)
    _done[0] = True
    return True


def _timeout(env) -> int:
    raw = env.get(ENV_TIMEOUT, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = int(raw)
    except ValueError:
        seconds = 0
    if seconds <= 0:
        raise ConfigError(f"{ENV_TIMEOUT}={raw!r} must be a whole number of seconds > 0")
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
