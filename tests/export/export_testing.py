"""Helpers of the export tests: a run folder of given random parameters, and the CLI in-process."""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flax import nnx
from menagerie.train.cli import main


def saved_run(root: Path, model: dict, seq_len: int, make_model: Callable[[Any], Any]) -> Path:
    """A run folder under `root` (config.yaml, checkpoint 0 holding `make_model(model config)`'s
    parameters) made by `Trainer.save_initial` on a 12-document corpus: a trained run's files,
    without compiling a train step."""
    from menagerie.train.config import build_config
    from menagerie.train.trainer import Trainer

    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"doc{i:02d}.txt").write_text(f"def f{i}(x):\n    return x * {i}\n" * (2 + i % 3))
    raw = {
        "model": model,
        "data": {"source": str(corpus), "val_fraction": 0.25},
        "train": {"seq_len": seq_len, "batch_size": 2},
    }
    trainer = Trainer(build_config(raw, [f"run_dir={root / 'run'}"]))  # writes config.yaml
    params = make_model(trainer.cfg.model)
    trainer.save_initial(nnx.to_pure_dict(nnx.state(params, nnx.Param)))
    return root / "run"


def run_main(argv: list[str]) -> tuple[int, str, str]:
    """`menagerie ARGV` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def export_verified(run_dir: Path, fmt: str, out: Path) -> str:
    """`menagerie export RUN --format FMT --out OUT --verify` in this process: asserts it
    succeeds, says where it wrote, and finds the export within 1e-4 of the run; returns
    stdout."""
    argv = ["export", str(run_dir), "--format", fmt, "--out", str(out), "--verify"]
    rc, stdout, stderr = run_main(argv)
    assert rc == 0, stderr
    assert f"wrote {fmt} export of {run_dir} to {out}" in stdout
    verified = re.search(r"max \|logit diff\| (\S+),", stdout)
    assert verified and float(verified[1]) < 1e-4, stdout
    print(f"CLI export --verify: max |ours - torch| = {verified[1]}")
    return stdout
