"""Multi-process (multi-host) start-up: `jax.distributed.initialize` before JAX is used.

One process per host (GPU: per host or per GPU; TPU: per host), all running the same command.
`menagerie train` calls `initialize()` first, which reads:

    MENAGERIE_COORDINATOR=host:port  MENAGERIE_NUM_PROCESSES=N  MENAGERIE_PROCESS_ID=i

(all three, explicitly), or `MENAGERIE_DISTRIBUTED=auto` to let JAX detect the cluster (SLURM,
Open MPI, Cloud TPU, Kubernetes JobSet). Neither set: a single process, nothing is done. On CPU
the collectives between processes go through gloo. After it, `jax.devices()` lists every
process's devices; the mesh spans them all, each process feeds its slice of the global batch
(`data.pipeline`), process 0 alone writes logs and the run's config, and Orbax coordinates the
checkpoint writes.
"""

from __future__ import annotations

import os

from .errors import ConfigError

ENV_COORDINATOR = "MENAGERIE_COORDINATOR"
ENV_NUM_PROCESSES = "MENAGERIE_NUM_PROCESSES"
ENV_PROCESS_ID = "MENAGERIE_PROCESS_ID"
ENV_AUTO = "MENAGERIE_DISTRIBUTED"

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
        kwargs = dict(coordinator_address=env[ENV_COORDINATOR], num_processes=n, process_id=i)
    elif auto in ("1", "on", "true", "auto"):
        kwargs = {}
    else:
        raise ConfigError(f"{ENV_AUTO}={env[ENV_AUTO]!r}: use 'auto' or 'off'")
    # CPU processes exchange data through gloo (harmless where the backend is GPU/TPU).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    _done[0] = True
    return True


def barrier(name: str) -> None:
    """Waits for every process (a no-op with one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
