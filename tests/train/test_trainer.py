"""End-to-end training on the stdlib corpus: learning, exact resume, preemption, fallback,
gradient accumulation, non-finite steps."""

from __future__ import annotations

import json
import math
import re
import signal
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from menagerie.data import ByteTokenizer, iter_documents
from menagerie.train.config import load_config
from menagerie.train.metrics import read_metrics
from menagerie.train.trainer import Trainer

from .conftest import (
    TINY,
    assert_close_states,
    cli_popen,
    saved_state,
    train_losses,
)


def unigram_entropy_nats(cfg) -> float:
    """Entropy of the byte-level training split's token distribution (EOS included)."""
    tok = ByteTokenizer()
    counts = np.zeros(tok.vocab_size, np.int64)
    for _, text in iter_documents(cfg.data, "train"):
        counts += np.bincount(tok.encode(text), minlength=tok.vocab_size)
        counts[tok.eos_id] += 1
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def test_loss_falls_and_eval_beats_unigram_entropy(tmp_path):
    cfg = load_config(TINY, [f"run_dir={tmp_path / 'run'}", "train.steps=80"])
    summary = Trainer(cfg).run()
    losses = train_losses(tmp_path / "run")
    first = np.mean([losses[s] for s in (10, 20)])
    last = np.mean([losses[s] for s in (70, 80)])
    assert last < first - 0.5, (first, last)
    entropy = unigram_entropy_nats(cfg)
    assert summary.eval["loss"] < entropy, (summary.eval, entropy)
    assert 0 < summary.eval["bits_per_byte"] < entropy / math.log(2)
    assert summary.sample is not None and summary.sample.startswith(cfg.train.sample_prompt)
    # Outputs: resolved config, metrics, TensorBoard events, checkpoints.
    run = tmp_path / "run"
    assert "vocab_size: 384" in (run / "config.yaml").read_text()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "checkpoints" / "80").is_dir()


# The runs below share one train-step program: the tiny model with a constant schedule, which,
# unlike cosine, does not depend on train.steps. The session's compilation cache compiles it
# once, and a run cut short matches a shorter run step for step.
PROGRAM = ("optim.schedule=constant",)


def _args(run_dir: Path, *extra: str) -> list[str]:
    return [
        "train",
        "-c",
        str(TINY),
        f"run_dir={run_dir}",
        *PROGRAM,
        "train.steps=40",
        "log.every=1",
        "checkpoint.every=10",
        "train.sample_tokens=0",
        "train.eval_every=0",
        "train.eval_batches=0",
        *extra,
    ]


def _checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def _train_steps_logged(run_dir: Path) -> list[int]:
    """Every train row's step, in the order written (a rerun appends its steps)."""
    path = run_dir / "metrics.jsonl"
    rows = map(json.loads, path.read_text().splitlines()) if path.exists() else ()
    return [r["step"] for r in rows if r.get("kind") == "train"]


def _wait_until(proc, ready, timeout: float = 300) -> None:
    """Polls `ready()` until it is true; fails if the run ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early:\n{proc.stdout.read()}")
        if ready():
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting for training progress")


def _reached(run_dir: Path, step: int) -> bool:
    return any(s >= step for s in _train_steps_logged(run_dir))


def test_sigterm_saves_the_state_of_its_step(tmp_path):
    """SIGTERM between two periodic checkpoints: the run saves the state of the step it reached,
    prints that step, and exits 0. (A truncated newest checkpoint, resumed from the one before
    and saved again bit for bit: tests/faults/test_checkpoint_faults.py.)"""
    run = tmp_path / "run"
    proc = cli_popen(*_args(run, "train.steps=400", "checkpoint.every=20"))
    _wait_until(proc, lambda: _reached(run, 21))
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-2000:]
    [stopped] = [int(s) for s in re.findall(r"SIGTERM: saved step (\d+) to ", out)]
    # A step takes tens of ms: the signal lands long before the next periodic save (step 40).
    assert 20 < stopped < 40
    assert _checkpoint_steps(run) == [20, stopped]
    saved = saved_state(run / "checkpoints" / str(stopped))
    assert int(saved["step"]) == stopped


def _trainer(run_dir: Path, *overrides: str) -> tuple[Trainer, list[dict]]:
    """A trainer of the shared program and the first batches of its run (host arrays)."""
    trainer = Trainer(load_config(TINY, [f"run_dir={run_dir}", *PROGRAM, *overrides]))
    t = trainer.cfg.train
    it = trainer.train_data.batches(t.batch_size, seed=t.seed)
    return trainer, [next(it) for _ in range(4)]


def _train(trainer: Trainer, step, batches: list[dict]) -> list[tuple[dict, dict]]:
    """(state, metrics) on the host after each batch, trained by `step` from the initial state."""
    out, state = [], trainer.init_state()
    with trainer.context():
        for b in batches:
            state, m = step(state, jax.device_put(b, trainer.batch_sharding))
            out.append((jax.device_get(state), jax.device_get(m)))
    return out


# Measured on this code (CPU), 2 microbatches vs 1, 3 steps: losses and gradient norms equal to
# the bit, parameters 1.5e-7 apart (relative to each array's largest entry). The tolerances leave
# room for another summation order; a gradient off by a factor is off by 100%.
LOSS_RTOL, GNORM_RTOL, PARAM_RTOL = 1e-6, 1e-6, 1e-6


def _accumulated(tmp_path: Path, microbatches: int) -> tuple[int, list[dict], dict]:
    """The trainer's compiled step for `train.microbatches`, three steps from the initial state:
    (its temporary memory in bytes, each step's metrics, the final parameters)."""
    trainer, batches = _trainer(tmp_path / str(microbatches), f"train.microbatches={microbatches}")
    with trainer.context():
        step = trainer.jit_train_step().lower(trainer.abstract_state(), batches[0]).compile()
    trained = _train(trainer, step, batches[:3])
    return step.memory_analysis().temp_size_in_bytes, [m for _, m in trained], trained[-1][0]


def test_gradient_accumulation_matches_full_batch_in_less_memory(tmp_path):
    """Two microbatches of 4 make the step of one batch of 8: the same loss, gradient norm and
    parameters (up to float summation order), from a step that holds about half the activations
    (measured: 0.56x the temporary memory)."""
    memory_1, metrics_1, state_1 = _accumulated(tmp_path, 1)
    memory_2, metrics_2, state_2 = _accumulated(tmp_path, 2)
    assert memory_2 < 0.7 * memory_1, (memory_1, memory_2)
    for name, rtol in (("loss", LOSS_RTOL), ("grad_norm", GNORM_RTOL)):
        got, want = ([m[name] for m in ms] for ms in (metrics_2, metrics_1))
        print(f"{name}: max relative difference {np.max(np.abs(np.divide(got, want) - 1)):.1e}")
        np.testing.assert_allclose(got, want, rtol=rtol, err_msg=name)
    worst = assert_close_states(state_2["params"], state_1["params"], PARAM_RTOL)
    print(f"parameters: max relative difference {worst:.1e}")


def _weights(state: dict) -> dict:
    return {"params": state["params"], "opt_state": state["opt_state"]}


def test_a_non_finite_step_is_skipped_and_the_run_goes_on_as_if_it_were_not_there(tmp_path):
    """A batch whose loss is NaN (a NaN loss weight stands in for corrupt data): the trainer's step
    keeps the parameters and the optimizer state bit for bit and counts the step as skipped. The
    next batch's update, and the learning rate it logs, are exactly those of a run without the
    bad batch (the schedule counts applied updates); the count of bad steps in a row is back to
    0."""
    trainer, (b0, b1, b2, b3) = _trainer(tmp_path / "run")
    bad = dict(b2, loss_mask=b2["loss_mask"].copy())
    bad["loss_mask"][0, 0] = np.nan
    step = trainer.jit_train_step()
    (before, _), (skipped, m), (after, m_after) = _train(trainer, step, [b0, b1, bad, b3])[1:]
    [*_, (reference, m_reference)] = _train(trainer, step, [b0, b1, b3])

    assert not m["finite"] and not np.isfinite(m["loss"])
    assert (int(skipped["step"]), int(skipped["skipped"]), int(skipped["bad_steps"])) == (3, 1, 1)
    assert_close_states(_weights(skipped), _weights(before), rtol=0.0)
    assert m_after["finite"] and m_after["lr"] == m_reference["lr"]
    assert (int(after["step"]), int(after["skipped"]), int(after["bad_steps"])) == (4, 1, 0)
    assert_close_states(_weights(after), _weights(reference), rtol=0.0)


def test_non_finite_steps_in_a_row_stop_the_run(tmp_path):
    """An absurd learning rate: after the first update every step is non-finite; after
    max_bad_steps of them in a row the run stops, naming the step and the data batch."""
    from menagerie.train.errors import TrainingError

    cfg = load_config(
        TINY,
        [
            f"run_dir={tmp_path / 'run'}",
            "optim.lr=1e38",
            "optim.clip_norm=null",
            "train.max_bad_steps=3",
            "log.every=1",
            "checkpoint.every=0",
            "optim.warmup_steps=0",
            "optim.schedule=constant",
        ],
    )
    with pytest.raises(
        TrainingError, match=r"3 non-finite steps in a row, the last at step 4 \(data batch 3\)"
    ):
        Trainer(cfg).run()
    logged = read_metrics(tmp_path / "run", "train")
    assert [logged[s]["finite"] for s in (1, 2, 3, 4)] == [1.0, 0.0, 0.0, 0.0]


def test_data_workers_and_prefetch_reach_the_datasets_and_keep_the_data_order(tmp_path):
    """`data.num_workers` and `data.prefetch` configure the trainer's datasets; the batches the
    run reads do not depend on them."""

    def trainer_and_batches(name: str, *overrides: str):
        trainer = Trainer(load_config(TINY, [f"run_dir={tmp_path / name}", *overrides]))
        t = trainer.cfg.train
        it = trainer.train_data.batches(t.batch_size, seed=t.seed, start_step=2)
        return trainer, [next(it) for _ in range(3)]

    threaded, got = trainer_and_batches("threaded", "data.num_workers=2", "data.prefetch=0")
    for ds in (threaded.train_data, threaded.val_data):
        assert (ds.num_workers, ds.prefetch) == (2, 0)
    serial, want = trainer_and_batches("serial", "data.num_workers=0")
    assert (serial.train_data.num_workers, serial.train_data.prefetch) == (0, 2)
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
