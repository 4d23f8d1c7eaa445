"""Context parallelism of the baseline transformer on 4 simulated devices: with `mesh.sequence=4`
the real Trainer's run equals one device's (losses, gradient norms, the parameters after the
last step), and the sequence really is split (the compiled train step passes key/value blocks
with collective-permutes and gathers no whole sequence).

The reference is the same config on one device of the same process (the trainer's mesh built
from the first device only). One process, with XLA_FLAGS set before JAX starts, runs this
module as a script and writes JSON. As in tests/train/test_megalodon_sequence_parallel.py, it
runs without the persistent compilation cache (XLA:CPU executables with collectives loaded from
it can deadlock) and with most of XLA's optimizations off (FAST_COMPILE_ENV); the sharded train
step is compiled once, ahead of time, its collectives read, and the run trains with it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from ..cli_testing import (
    bare_steps,
    compiled_collectives,
    compiled_train_step,
    run_on_devices,
)
from .conftest import TINY, assert_close_states, saved_state

BATCH, SEQ, STEPS = 4, 32, 4  # 8 tokens per device at sequence=4: zigzag chunks of 4
MESHES = {"one": ["mesh.data=1"], "sequence4": ["mesh.data=1", "mesh.sequence=4"]}
# Measured (CPU, 2026-12-01, this code), worst of 4 steps against one device: loss 2.6e-7
# relative, gradient norm 9.2e-8 (the issue asks 1e-5); parameters after 4 AdamW steps (largest
# |difference| / largest |entry|, worst array) 5.8e-7, tolerance about 9x that.
LOSS_RTOL = GNORM_RTOL = 1e-5
PARAM_RTOL = 5e-6


def _write_documents(path: Path) -> None:
    """Documents of 4 to 20 bytes, so every 32-token row packs several (segment ids change
    inside rows and inside devices' blocks)."""
    rng = np.random.default_rng(0)
    words = ["ring", "attention", "zigzag", "chunk", "key", "value", "query", "mask"]
    with open(path, "w") as f:
        for _ in range(400):
            text = " ".join(rng.choice(words, size=rng.integers(1, 4)))[:20]
            f.write(json.dumps({"text": text}) + "\n")


def _trainer(root: str, name: str, mesh: list[str]):
    from menagerie.train.config import load_config
    from menagerie.train.trainer import Trainer

    overrides = [
        f"run_dir={root}/{name}",
        f"data.source={root}/documents.jsonl",
        f"data.cache_dir={root}/cache",
        *bare_steps(BATCH, SEQ, STEPS),
        *mesh,
    ]
    return Trainer(load_config(TINY, overrides))


def _on_one_device(make):
    """`make()` with the trainer's mesh built from the first device only."""
    import jax
    from menagerie.train import mesh as mesh_lib

    every_device = mesh_lib.make_mesh
    mesh_lib.make_mesh = lambda cfg, devices=None: every_device(cfg, jax.devices()[:1])
    try:
        return make()
    finally:
        mesh_lib.make_mesh = every_device


def main(out: str, root: str) -> None:
    _write_documents(Path(root) / "documents.jsonl")
    results = {}
    for name, mesh in MESHES.items():
        if name == "one":
            trainer = _on_one_device(lambda name=name, mesh=mesh: _trainer(root, name, mesh))
        else:
            trainer = _trainer(root, name, mesh)
        step = compiled_train_step(trainer, BATCH)
        # The run trains with this very executable (a fresh jit would compile the step again).
        trainer.jit_train_step = lambda step=step: step
        trainer.run()
        rows = [json.loads(x) for x in open(f"{root}/{name}/metrics.jsonl")]
        train = [r for r in rows if "grad_norm" in r]
        first = next(trainer.train_data.batches(BATCH, seed=0))
        results[name] = {
            "devices": trainer.mesh.size,
            "documents_per_row": [len(set(row)) for row in first["segment_ids"].tolist()],
            "loss": [r["loss"] for r in train],
            "grad_norm": [r["grad_norm"] for r in train],
            "collectives": compiled_collectives(step.as_text()),
        }
    Path(out).write_text(json.dumps(results))


def test_sequence_sharded_training_equals_one_device(tmp_path):
    """Catches: ring attention that differs from single-device attention in the model (wrong
    block order, masks or segment ids: losses differ), a backward that loses the gradient of
    keys/values held elsewhere (gradient norms, parameters differ), and the sequence split only
    on paper (the compiler gathers whole-sequence keys/values: an all-gather of T positions,
    and no collective-permutes)."""
    out = tmp_path / "results.json"
    run_on_devices("tests.train.test_context_parallel", str(out), str(tmp_path), devices=4)
    r = json.loads(out.read_text())
    one, split = r["one"], r["sequence4"]
    assert one["devices"] == 1 and split["devices"] == 4
    assert len(one["loss"]) == STEPS
    assert min(one["documents_per_row"]) >= 3, one["documents_per_row"]  # packed rows
    np.testing.assert_allclose(split["loss"], one["loss"], rtol=LOSS_RTOL)
    np.testing.assert_allclose(split["grad_norm"], one["grad_norm"], rtol=GNORM_RTOL)
    final = tmp_path / "sequence4" / "checkpoints" / str(STEPS)
    want = saved_state(tmp_path / "one" / "checkpoints" / str(STEPS))["params"]
    assert_close_states(saved_state(final)["params"], want, rtol=PARAM_RTOL)
    collectives = split["collectives"]
    # No array with the whole sequence's positions is gathered: no all-gather or all-to-all
    # (the step has none at all); key/value blocks go round the ring instead.
    assert collectives["all-gather"] == collectives["all-to-all"] == [], collectives
    assert len(collectives["collective-permute"]) >= 4 * 3, collectives


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
