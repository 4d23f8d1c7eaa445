"""Megalodon's sequence parallelism on 4 simulated devices: the sequence really is split (each
device runs its own block; the only all-gathers are of the [B,G] norm statistics and the
[B,D,N] CEMA states of the blocks), and training equals the unsplit run: losses, gradient norms
and the parameters after the last step.

The reference is the same 4 devices with the whole sequence on each (`mesh.data=4`: the path
without sequence parallelism, itself checked against one device by test_multidevice). One
process, with XLA_FLAGS set before JAX starts, runs this module as a script and writes JSON.

It runs without the session's persistent compilation cache: with jax 0.10.2, XLA:CPU
executables of these Megalodon steps (data-parallel ones too) deadlock at their collectives
when loaded from that cache (the devices wait at different collectives until XLA aborts);
compiled afresh they run. So every program here is compiled in this test, once each (the
train step is compiled ahead of time to read its all-gathers, and the run trains with that
executable), and with most of XLA's optimizations off (`JAX_DISABLE_MOST_OPTIMIZATIONS`: LLVM at
-O0, like the kernel tests' FAST_COMPILE), which halves the compile time of programs that run
four steps; the three runs compile the same way, and what is compared (the numbers and the
all-gathers the SPMD partitioner inserts) is decided before LLVM.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np

from ..cli_testing import (
    MEGALODON_TINY_MODEL,
    bare_steps,
    compiled_train_step,
    run_on_devices,
)
from .conftest import assert_close_states, saved_state

MODEL = MEGALODON_TINY_MODEL | {"cema_segment": 8}  # two CEMA segments per chunk
MESHES = {
    "whole": ["mesh.data=4"],
    "sequence4": ["mesh.data=1", "mesh.sequence=4"],
    "data2_sequence2": ["mesh.data=2", "mesh.sequence=2"],
}
BATCH, SEQ, STEPS = 4, 64, 4  # 16 tokens (one chunk, two CEMA segments) per device at sequence=4
# Measured (CPU, 2026-11-30), worst of 4 steps against "whole": loss 1.5e-7 relative, gradient
# norm 1.2e-7 (the issue asks 1e-5). Parameters after 4 AdamW steps, worst array (largest
# |difference| / largest |entry|): 4.7e-5, in the q/k bias `beta`, whose gradients are near
# zero, so Adam's division by sqrt(v) magnifies their rounding; tolerance about 4x that.
# Remeasured with FAST_COMPILE_ENV (2026-11-30, this code): loss 1.5e-7, gradient norm 8.8e-8,
# parameters 9.3e-5 (sequence4) and 7.5e-5 (data2_sequence2), again in `beta`; with XLA's
# default optimizations this code gives 9.0e-5 and 1.5e-4.
LOSS_RTOL = GNORM_RTOL = 1e-5
PARAM_RTOL = 2e-4


def _trainer(run_dir: str, mesh: list[str]):
    from menagerie.train.config import build_config
    from menagerie.train.trainer import Trainer

    overrides = [
        *bare_steps(BATCH, SEQ, STEPS),
        *mesh,
    ]
    return Trainer(build_config({"model": MODEL, "run_dir": run_dir}, overrides))


def _all_gathers(compiled) -> list[list[int]]:
    """Result shapes of every all-gather in a compiled step."""
    shapes = re.findall(r"= \w+\[([\d,]*)\]\{[^}]*\} all-gather\(", compiled.as_text())
    return [[int(d) for d in s.split(",") if d] for s in shapes]


def main(out: str, root: str) -> None:
    results = {}
    for name, mesh in MESHES.items():
        trainer = _trainer(f"{root}/{name}", mesh)
        step = compiled_train_step(trainer, BATCH)
        # The run trains with this very executable: `jit(...).lower().compile()` does not fill
        # the jitted function's own cache, so a fresh jit would compile the step again.
        trainer.jit_train_step = lambda step=step: step
        trainer.run()
        rows = [json.loads(x) for x in open(f"{root}/{name}/metrics.jsonl")]
        train = [r for r in rows if "grad_norm" in r]
        results[name] = {
            "loss": [r["loss"] for r in train],
            "grad_norm": [r["grad_norm"] for r in train],
            "all_gathers": _all_gathers(step),
        }
    Path(out).write_text(json.dumps(results))


def test_sequence_parallel_training_equals_the_whole_sequence(tmp_path):
    """Catches: a block that starts from a zero state instead of its predecessors' (losses
    differ), blocks combined out of order or from the wrong device (losses differ), a gradient
    of the replicated parameters not summed over the blocks (gradient norms differ), sequence
    parallelism silently not happening (the compiler all-gathers whole-sequence activations:
    an all-gather of another shape), and FFTs left to XLA's partitioner (it all-gathers the
    batch)."""
    out = tmp_path / "results.json"
    module = "tests.train.test_megalodon_sequence_parallel"
    run_on_devices(module, str(out), str(tmp_path), devices=4, timeout=900)
    r = json.loads(out.read_text())
    assert len(r["whole"]["loss"]) == STEPS
    # Data parallelism moves no activations (XLA alone would all-gather the batch for the FFTs).
    assert r["whole"]["all_gathers"] == []
    d, n, g = MODEL["d_model"], MODEL["cema_ndim"], MODEL["norm_num_groups"]

    def summary(shape):  # [.., G] norm statistics, [.., D, N] CEMA states, [.., B] counts
        return len(shape) == 2 or (len(shape) == 3 and shape[-1] == g) or shape[-2:] == [d, n]

    for name in ("sequence4", "data2_sequence2"):
        np.testing.assert_allclose(r[name]["loss"], r["whole"]["loss"], rtol=LOSS_RTOL)
        np.testing.assert_allclose(r[name]["grad_norm"], r["whole"]["grad_norm"], rtol=GNORM_RTOL)
        gathered = r[name]["all_gathers"]
        assert gathered and all(summary(s) for s in gathered), (name, gathered)
        final = tmp_path / name / "checkpoints" / str(STEPS)
        want = saved_state(tmp_path / "whole" / "checkpoints" / str(STEPS))["params"]
        assert_close_states(saved_state(final)["params"], want, rtol=PARAM_RTOL)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
