"""End-to-end training on the stdlib corpus: learning, exact resume, preemption, fallback."""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from menagerie.data import ByteTokenizer, iter_documents
from menagerie.train.config import load_config
from menagerie.train.trainer import Trainer

from .conftest import TINY, cli, cli_popen, cli_wait, train_losses


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


def _args(run_dir: Path, *extra: str) -> list[str]:
    return [
        "train",
        "-c",
        str(TINY),
        f"run_dir={run_dir}",
        "train.steps=40",
        "log.every=1",
        "checkpoint.every=10",
        "train.sample_tokens=0",
        "train.eval_every=0",
        *extra,
    ]


def _wait_for_step(run_dir: Path, step: int, proc, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early:\n{proc.stdout.read()}")
        if metrics.exists() and any(
            json.loads(line).get("step", 0) >= step for line in metrics.read_text().splitlines()
        ):
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting for training progress")


def test_kill_9_then_rerun_resumes_bitwise(tmp_path):
    full = cli_popen(*_args(tmp_path / "full"), split_stderr=True)  # runs alongside
    killed = tmp_path / "killed"
    proc = cli_popen(*_args(killed))
    _wait_for_step(killed, 25, proc)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    [full] = cli_wait(full)
    assert full.returncode == 0, full.stderr[-2000:]
    steps = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and max(steps) < 40

    again = cli(*_args(killed))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from" in again.stdout
    a, b = train_losses(tmp_path / "full"), train_losses(killed)
    assert sorted(a) == sorted(b) == list(range(1, 41))
    assert [a[s] for s in range(1, 41)] == [b[s] for s in range(1, 41)]  # bitwise


def test_sigterm_saves_and_exits_0_and_truncated_checkpoint_falls_back(tmp_path):
    run = tmp_path / "run"
    proc = cli_popen(*_args(run, "train.steps=400"))
    _wait_for_step(run, 13, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-2000:]
    assert "SIGTERM: saved step" in out
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    stopped = steps[-1]
    assert stopped >= 13 and 10 in steps

    # Truncate the biggest file of the newest checkpoint's state: it becomes unreadable.
    files = sorted(
        (run / "checkpoints" / str(stopped) / "state").rglob("*"),
        key=lambda p: p.stat().st_size if p.is_file() else -1,
    )
    victim = files[-1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])

    resumed = cli(*_args(run, "train.steps=" + str(stopped + 5)))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    text = resumed.stdout + resumed.stderr
    assert f"checkpoint at step {stopped} is unreadable" in text
    assert f"resumed from {run / 'checkpoints' / str(steps[-2])}" in text.replace("\n", "")


@pytest.mark.parametrize("microbatches", [2])
def test_gradient_accumulation_matches_full_batch(tmp_path, microbatches):
    """Same data, same init: accumulating over microbatches gives the same step (fp tolerance)."""
    common = [
        "train.steps=3",
        "train.eval_batches=0",
        "train.sample_tokens=0",
        "log.every=1",
        "checkpoint.every=0",
    ]
    a = Trainer(load_config(TINY, [f"run_dir={tmp_path / 'a'}", *common])).run()
    b = Trainer(
        load_config(
            TINY, [f"run_dir={tmp_path / 'b'}", *common, f"train.microbatches={microbatches}"]
        )
    ).run()
    la, lb = train_losses(a.run_dir), train_losses(b.run_dir)
    np.testing.assert_allclose([la[s] for s in (1, 2, 3)], [lb[s] for s in (1, 2, 3)], rtol=2e-5)


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path):
    """An absurd learning rate blows the weights up to inf after one update; every later step
    is non-finite, is skipped, and after max_bad_steps the run stops naming step and batch."""
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
        TrainingError,
        match=r"3 non-finite steps in a row, the last at step \d+ "
        r"\(data batch \d+\)",
    ):
        Trainer(cfg).run()


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
