"""Megalodon end to end through the CLI (configs/megalodon/tiny.yaml, byte-level stdlib corpus):
it learns, evaluates below the unigram entropy, logs its FLOPs and MFU, checkpoints, and a run
killed by SIGKILL resumes from its newest checkpoint into the uninterrupted run's state, bit for
bit."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
from menagerie.data import ByteTokenizer, iter_documents
from menagerie.train.config import load_config
from menagerie.train.metrics import read_metrics

from .conftest import (
    ROOT,
    assert_close_states,
    cli_popen,
    cli_wait,
    saved_state,
    train_losses,
)

MEGA_TINY = ROOT / "configs" / "megalodon" / "tiny.yaml"
STEPS = 80


def _args(run_dir: Path) -> list[str]:
    """Both runs of the test: one program (same config but the folder), so the session's
    compilation cache compiles it once. Evaluation at the last step only."""
    return [
        "train",
        "-c",
        str(MEGA_TINY),
        f"run_dir={run_dir}",
        f"train.steps={STEPS}",
        f"train.eval_every={STEPS}",
        "log.every=1",
        "checkpoint.every=20",
        "train.sample_tokens=0",
    ]


def unigram_entropy_nats(cfg) -> float:
    """Entropy of the byte-level training split's token distribution (EOS included)."""
    tok = ByteTokenizer()
    counts = np.zeros(tok.vocab_size, np.int64)
    for _, text in iter_documents(cfg.data, "train"):
        counts += np.bincount(tok.encode(text), minlength=tok.vocab_size)
        counts[tok.eos_id] += 1
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


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
            out, err = proc.communicate()
            raise AssertionError(f"run ended early:\n{out}\n{err or ''}"[-5000:])
        if ready():
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting for training progress")


def test_megalodon_learns_checkpoints_and_resumes_after_kill_9_bitwise(tmp_path):
    cfg = load_config(MEGA_TINY)
    model = cfg.model.with_vocab(ByteTokenizer().vocab_size)
    assert cfg.model.family == "megalodon" and cfg.optim.weight_decay_on == "all"
    # Several attention chunks and CEMA segments per sequence (state carried across them).
    assert cfg.train.seq_len >= 4 * model.chunk_size and model.segment == model.chunk_size

    # The uninterrupted run, and once it has compiled (into the session's compilation cache),
    # the same run beside it, killed by SIGKILL (no handler runs) past two checkpoints.
    full, killed = tmp_path / "full", tmp_path / "killed"
    full_proc = cli_popen(*_args(full), split_stderr=True)
    entropy = unigram_entropy_nats(cfg)  # meanwhile
    _wait_until(full_proc, lambda: bool(_train_steps_logged(full)))
    proc = cli_popen(*_args(killed))
    _wait_until(
        proc,
        lambda: (
            max(_train_steps_logged(killed), default=0) >= 45
            and len(_checkpoint_steps(killed)) >= 2
        ),
    )
    proc.kill()
    proc.wait()
    newest = _checkpoint_steps(killed)[-1]
    assert 20 <= newest < STEPS
    logged = len(_train_steps_logged(killed))
    assert not read_metrics(killed, "eval")
    # Its rerun, beside the end of the uninterrupted one.
    done, again = cli_wait(full_proc, cli_popen(*_args(killed), split_stderr=True))
    assert done.returncode == 0, done.stderr[-3000:]
    assert again.returncode == 0, again.stderr[-3000:]

    # The banner gives the family's parameter count and FLOPs per token; each row an MFU (but
    # the first: it compiles).
    flops = model.flops_per_token(cfg.train.seq_len)
    banner = (
        f"model megalodon: {model.num_params() / 1e6:.2f}M params, {flops / 1e6:.1f} MFLOP/token"
    )
    assert banner in done.stdout, done.stdout[:2000]
    rows = read_metrics(full, "train")
    assert sorted(rows) == list(range(1, STEPS + 1))
    assert all(0 < rows[s]["mfu"] < math.inf for s in range(2, STEPS + 1))
    # It learns: the loss falls clearly, and the held-out loss beats the unigram entropy.
    losses = train_losses(full)
    first = np.mean([losses[s] for s in range(6, 16)])
    last = np.mean([losses[s] for s in range(STEPS - 9, STEPS + 1)])
    assert last < first - 0.5, (first, last)
    evals = read_metrics(full, "eval")
    assert list(evals) == [STEPS]
    assert evals[STEPS]["loss"] < entropy, (evals, entropy)
    assert 0 < evals[STEPS]["bits_per_byte"] < entropy / math.log(2), (evals, entropy)
    assert _checkpoint_steps(full) == [STEPS - 20, STEPS]  # keep_last 2
    assert "vocab_size: 384" in (full / "config.yaml").read_text()

    # The rerun of the killed run resumed from its newest checkpoint.
    resumed_line = f"resumed from {killed / 'checkpoints' / str(newest)} (step {newest})"
    assert resumed_line in again.stdout.replace("\n", ""), again.stdout[-3000:]
    # Only the steps after the checkpoint ran, and every step's loss is the uninterrupted run's.
    assert _train_steps_logged(killed)[logged:] == list(range(newest + 1, STEPS + 1))
    resumed = train_losses(killed)
    assert [resumed[s] for s in range(1, STEPS + 1)] == [losses[s] for s in range(1, STEPS + 1)]
    assert read_metrics(killed, "eval")[STEPS]["loss"] == evals[STEPS]["loss"]
    final = saved_state(killed / "checkpoints" / str(STEPS))
    assert int(final["step"]) == STEPS
    assert_close_states(final, saved_state(full / "checkpoints" / str(STEPS)), rtol=0.0)
