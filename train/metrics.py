"""Metrics: peak FLOP/s (table or measured), MFU, and the JSONL / TensorBoard / console sinks.

MFU = model FLOPs per second / peak FLOP/s of the devices in use, with model FLOPs from the
config's analytic `flops_per_token` (training: forward + backward, causal attention halved).
On GPU/TPU the peak comes from a table of dense bf16 peaks; on CPU it is a float32 matmul, the
fastest of a few sizes, measured by the first run on the machine and recorded in the cache folder
(`cached_matmul_peak`; the benches measure it in their own process).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from .errors import ClosedOnExit, run_folder_io

# Dense bf16 peak FLOP/s per device (vendor spec sheets, no sparsity).
PEAK_FLOPS: dict[str, float] = {
    "h100": 989e12,
    "h200": 989e12,
    "gh200": 989e12,
    "b200": 2250e12,
    "a100": 312e12,
    "l4": 121e12,
    "a10g": 70e12,
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,
    "tpu v6e": 918e12,
}


def measure_matmul_peak(dtype=jnp.float32, sizes=(1024, 2048), repeats: int = 5) -> float:
    """Best FLOP/s of a square matmul on the default device (all its cores), in this process."""
    best = 0.0
    for n in sizes:
        a = jnp.ones((n, n), dtype)
        f = jax.jit(lambda x: x @ x)
        f(a).block_until_ready()
        for _ in range(repeats):
            t0 = time.perf_counter()
            f(a).block_until_ready()
            best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


@functools.cache
def device_peak_flops(
    device: jax.Device | None = None, cache_dir: Path | None = None
) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number came from). A device the table lacks gets
    `measure_matmul_peak`, kept in `cache_dir` when given (`cached_matmul_peak`)."""
    device = device or jax.devices()[0]
    kind = device.device_kind.lower()
    if device.platform != "cpu":
        for name, peak in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
            if name in kind:
                return peak, f"table ({device.device_kind}, bf16 dense)"
    if cache_dir is None:
        return measure_matmul_peak(), "measured float32 matmul"
    return cached_matmul_peak(Path(cache_dir) / PEAK_CACHE, device)


# Measured peaks by machine, in the cache folder of prepared data: a CPU run's banner measured
# it at every start (1.5 s of CPU). Delete the file to measure again.
PEAK_CACHE = "matmul_peak.json"


def _machine_key(device: jax.Device) -> str:
    """What the measured peak depends on: host, device kind, usable cores, device count, JAX
    version and XLA flags."""
    affinity = getattr(os, "sched_getaffinity", None)
    cores = len(affinity(0)) if affinity else os.cpu_count()
    parts = [socket.gethostname(), device.device_kind, f"{cores} cores"]
    parts += [f"{jax.local_device_count()} devices", f"jax {jax.__version__}"]
    return " | ".join([*parts, os.environ.get("XLA_FLAGS", "").strip()])


def cached_matmul_peak(path: Path, device: jax.Device) -> tuple[float, str]:
    """The peak recorded in `path` for this machine, else measured now and recorded there. The
    file only saves time: an unreadable one is measured over, an unwritable one is left be."""
    key = _machine_key(device)
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    known = known if isinstance(known, dict) else {}
    peak = known.get(key)
    if isinstance(peak, float) and math.isfinite(peak) and peak > 0:
        return peak, f"measured float32 matmul, recorded in {path}"
    peak = measure_matmul_peak()
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({**known, key: peak}, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return peak, "measured float32 matmul"


class MetricsWriter(ClosedOnExit):
    """Appends metrics to `<run_dir>/metrics.jsonl` and TensorBoard (process 0 only). An OS
    error on them (a full disk) is one CheckpointError line (`errors.run_folder_io`)."""

    def __init__(self, run_dir: Path, *, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = self._tb = None
        with run_folder_io("write metrics", self.path):
            self._file = open(self.path, "a") if self.enabled else None  # noqa: SIM115
            if self.enabled and tensorboard:
                self._tb = _summary_writer()(str(Path(run_dir) / "tensorboard"))

    def write(self, step: int, metrics: dict[str, Any], kind: str = "train") -> None:
        if not self.enabled:
            return
        row = {"kind": kind, "step": int(step), "time": time.time()}
        for k, v in metrics.items():
            row[k] = v if isinstance(v, str) else _to_float(v)
        with run_folder_io("write metrics", self.path):
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
            if self._tb is not None:
                for k, v in row.items():
                    if (
                        k not in ("kind", "step", "time")
                        and isinstance(v, float)
                        and math.isfinite(v)
                    ):
                        self._tb.add_scalar(f"{kind}/{k}", v, int(step))

    def close(self) -> None:
        with run_folder_io("write metrics", self.path):
            if self._file is not None:
                self._file.close()
            if self._tb is not None:
                self._tb.close()


def _summary_writer():
    """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch (3 s)
    whenever it is installed, only to accept torch tensors, and we log Python floats."""
    import sys

    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX handles
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def _to_float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def read_metrics(run_dir: Path, kind: str = "train") -> dict[int, dict]:
    """Last record per step of one kind (a resumed run rewrites the steps after its checkpoint)."""
    out: dict[int, dict] = {}
    path = Path(run_dir) / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row.get("kind") == kind:
                out[row["step"]] = row
    return out
