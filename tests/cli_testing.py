"""Helpers for tests that run the real `menagerie` CLI: fresh processes, run folders, snapshots,
saved checkpoints."""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from menagerie.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "transformer" / "tiny.yaml"
# A Megalodon small enough to compile in seconds: chunks of 16, two heads, N=4 (0.04M params).
MEGALODON_TINY_MODEL = {
    "family": "megalodon",
    "d_model": 32,
    "n_layers": 2,
    "num_heads": 2,
    "z_dim": 16,
    "value_dim": 32,
    "ffn_hidden_dim": 48,
    "cema_ndim": 4,
    "chunk_size": 16,
    "norm_num_groups": 4,
}


# For a process whose XLA programs only make something to test (a checkpoint to export) or run a
# few steps whose numbers are compared only with runs compiled the same way: XLA:CPU compiles
# Megalodon's programs slowly, mostly in LLVM's optimizer (the kernel tests' FAST_COMPILE, for a
# whole process). Not for numbers checked against a tolerance measured with the defaults: code
# from LLVM -O0 rounds differently (a 1-vs-8-device loss difference went from 9e-8 to 3e-7).
FAST_COMPILE_ENV = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}


def bare_steps(batch: int, seq_len: int, steps: int) -> list[str]:
    """Overrides for a run of `steps` train steps and nothing else (no eval, sample, checkpoint),
    logging every step."""
    return [
        f"train.batch_size={batch}",
        f"train.seq_len={seq_len}",
        f"train.steps={steps}",
        "train.eval_every=0",
        "train.eval_batches=0",
        "train.sample_tokens=0",
        "log.every=1",
        "checkpoint.every=0",
    ]


def run_on_devices(module: str, *args: str, devices: int, timeout: float = 600) -> None:
    """`python -m module args` with `devices` simulated CPU devices, compiled afresh (no
    persistent compilation cache: XLA:CPU executables with collectives deadlock when loaded
    from it, with jax 0.10.2) and with FAST_COMPILE_ENV; asserts it exits 0 (showing the end
    of its stderr, without traceback decorations)."""
    env = cli_env()
    env["XLA_FLAGS"] = (
        f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    )
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    env.update(FAST_COMPILE_ENV)
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )
    frames = [x for x in proc.stderr.splitlines() if not x.startswith("    @")]
    assert proc.returncode == 0, "\n".join(frames)[-4000:]


def compiled_train_step(trainer, batch_size: int):
    """The trainer's train step, lowered and compiled for its state and batch shardings."""
    import jax

    local = next(trainer.train_data.batches(batch_size, seed=0))
    batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=trainer.batch_sharding)
        for k, v in local.items()
    }
    with trainer.context():
        return trainer.jit_train_step().lower(trainer.abstract_state(), batch).compile()


def compiled_collectives(text: str) -> dict[str, list[list[int]]]:
    """Result shapes of the all-gathers, all-to-alls and collective-permutes in a compiled
    program's text (async ones counted once, at their start)."""
    out = {}
    for op in ("all-gather", "all-to-all", "collective-permute"):
        found = re.findall(rf"= \w+\[([\d,]*)\]\{{[^}}]*\}} {op}(?:-start)?\(", text)
        found += re.findall(rf"= \(\w+\[([\d,]*)\][^=]*\) {op}-start\(", text)
        out[op] = [[int(d) for d in s.split(",") if d] for s in found]
    return out


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def cli(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `menagerie ...` in a fresh process (`env`: variables to add to `cli_env()`); returns
    the completed process."""
    return subprocess.run(
        [sys.executable, "-m", "menagerie.train.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**cli_env(), **(env or {})},
        cwd=ROOT,
    )


def cli_popen(*args: str, env: dict[str, str] | None = None, split_stderr: bool = False):
    """Start `menagerie ...`; stderr goes into stdout unless `split_stderr`."""
    return subprocess.Popen(
        [sys.executable, "-m", "menagerie.train.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE if split_stderr else subprocess.STDOUT,
        text=True,
        env=env or cli_env(),
        cwd=ROOT,
    )


def cli_wait(*procs: subprocess.Popen, timeout: float = 600):
    """Waits for runs started together with `cli_popen(..., split_stderr=True)` (independent runs
    overlap their imports and compiles on the CPU); one CompletedProcess per run, in order."""
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def train_losses(run_dir: Path) -> dict[int, float]:
    """Last logged training loss per step (a resumed run rewrites steps after its checkpoint)."""
    return {step: row["loss"] for step, row in read_metrics(run_dir, "train").items()}


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root with a hash of its bytes: to show that nothing was touched."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha1(p.read_bytes()).hexdigest()
        elif p.is_dir():
            out[str(p.relative_to(root)) + "/"] = "dir"
    return out


def saved_state(step_dir: Path) -> dict:
    """The state saved in one checkpoint folder (`<run_dir>/checkpoints/<step>`), as numpy
    arrays, whatever mesh or process count it was saved from."""
    import jax
    import orbax.checkpoint as ocp

    ckptr = ocp.PyTreeCheckpointer()
    tree = ckptr.metadata(Path(step_dir) / "state").item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return ckptr.restore(Path(step_dir) / "state", restore_args=args)


def assert_close_states(got: dict, want: dict, rtol: float) -> float:
    """Every array of two saved states within `rtol` of the largest |entry| of `want`'s array
    (0: bitwise); returns the largest such relative difference."""
    import jax

    worst = 0.0
    flat_want = dict(jax.tree_util.tree_leaves_with_path(want))
    flat_got = jax.tree_util.tree_leaves_with_path(got)
    assert len(flat_got) == len(flat_want)
    for path, x in flat_got:
        y = flat_want[path]
        assert x.shape == y.shape and x.dtype == y.dtype, path
        scale = max(float(np.max(np.abs(y), initial=0.0)), 1e-30)
        diff = float(np.max(np.abs(x.astype(np.float64) - y), initial=0.0)) / scale
        worst = max(worst, diff)
        assert diff <= rtol, f"{jax.tree_util.keystr(path)}: relative difference {diff:.1e}"
    return worst


def session_root(tmp_path_factory) -> Path:
    """The test session's temporary folder, shared by the pytest-xdist workers (each worker's
    own `getbasetemp()` is a folder inside it)."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """The folder `name` of this test session, made by `build(folder)` in the first worker that
    asks; a worker asking meanwhile waits for it (a file lock), later ones find it made. A
    failed build leaves nothing, so the next asker builds again (and fails the same way). The
    folder is shared: copy it before changing anything in it."""
    root = session_root(tmp_path_factory)
    folder, done = root / name, root / f"{name}.built"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            try:
                build(folder)
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            done.touch()
    return folder
