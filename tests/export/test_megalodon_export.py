"""`menagerie export --format megalodon` and `load_run`, through the real CLI on a trained run.

The claim: the files load, strictly, in an independent implementation of the official format
(`megalodon_jax.convert.load_upstream_checkpoint`, which checks every key and shape) and give
the same logits as our model restored by `load_run`; a refused export writes nothing.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch  # torch and megalodon-jax are in the test extra: never skipped
import yaml

from ..cli_testing import FAST_COMPILE_ENV, MEGALODON_TINY_MODEL, built_once, cli, snapshot
from .export_testing import official_megalodon_logits, our_logits

MODEL = MEGALODON_TINY_MODEL | {"swiglu": True}


def _train(root):
    train = {"steps": 6, "batch_size": 2, "seq_len": 40, "eval_every": 0, "sample_tokens": 0}
    cfg = {"model": MODEL, "train": train, "checkpoint": {"every": 3}}
    root.mkdir()
    (root / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = cli("train", "-c", str(root / "c.yaml"), f"run_dir={root / 'run'}", env=FAST_COMPILE_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny Megalodon trained for 6 steps (checkpoints at 3 and 6) once per test session,
    compiled with most of XLA's optimizations off (FAST_COMPILE_ENV): the export and the
    logits compared are of whatever weights it saved."""
    return built_once(tmp_path_factory, "megalodon-export-run", _train) / "run"


def test_export_loads_in_megalodon_jax_with_the_same_logits(run, tmp_path):
    """Catches: a transposed or misnamed weight, a dropped parameter, the wrong checkpoint
    step (step 3 instead of the newest, 6), a config field left out of config.json."""
    from menagerie.export import load_run

    out = tmp_path / "official"
    proc = cli("export", str(run), "--format", "megalodon", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "consolidate_config.json").read_text()) == {
        "model_parallel_size": 1,
        "dtype": "fp32",
    }
    loaded = load_run(run)
    assert loaded.step == 6
    text = "def main(argv):\n    return sum(len(a) for a in argv)\n" * 3
    tokens = np.asarray([loaded.tokenizer.encode(text)[:72]])  # 4.5 chunks of 16
    ours = our_logits(loaded.model, tokens)
    np.testing.assert_allclose(official_megalodon_logits(out)(tokens), ours, atol=1e-4, rtol=0)
    older = load_run(run, step=3)
    assert older.step == 3
    assert not np.allclose(our_logits(older.model, tokens), ours, atol=1e-4)


def test_bfloat16_export_keeps_the_sensitive_parameters_in_float32(run, tmp_path):
    """Catches: CEMA / norm parameters rounded to bf16 (the official code keeps them float32)."""
    out = tmp_path / "bf16"
    args = ("--format", "megalodon", "--out", str(out), "--dtype", "bfloat16")
    proc = cli("export", str(run), *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(out / "consolidated.pth", weights_only=True)
    assert state["layers.0.mega.wz.weight"].dtype == torch.bfloat16
    assert state["embed.weight"].dtype == torch.bfloat16
    for name in ("cema.alpha", "cema.gamma", "timenorm.weight", "gamma", "rmsnorm.weight"):
        assert state[f"layers.1.mega.{name}"].dtype == torch.float32, name
    assert state["layers.0.mega.timenorm.prior_count"].dtype == torch.int64


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("out_not_empty", "exists and is not an empty folder"),
        ("missing_step", "no checkpoint of step 5; saved steps: 3, 6"),
        ("not_megalodon", "holds a transformer model"),
    ],
)
def test_refused_exports_say_why_in_one_line_and_write_nothing(run, tmp_path, case, fragment):
    """Catches: an export into a folder that already holds files (overwriting them), a silent
    fallback to another step, a Megalodon export of another family."""
    run_dir, out, extra = run, tmp_path / "out", []
    if case == "out_not_empty":
        out.mkdir()
        (out / "mine.txt").write_text("keep me\n")
    elif case == "missing_step":
        extra = ["--step", "5"]
    else:
        run_dir = tmp_path / "transformer_run"
        run_dir.mkdir()
        (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": {"family": "transformer"}}))
    before = snapshot(tmp_path)
    proc = cli("export", str(run_dir), "--format", "megalodon", "--out", str(out), *extra)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and fragment in err[0], proc.stderr[-2000:]
    assert snapshot(tmp_path) == before
