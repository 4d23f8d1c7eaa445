"""`menagerie convert-lte` (train/convert.py): a dense run becomes an LTE run whose FFNs are
permuted into k-means expert blocks; with every gate on it is the dense model; `menagerie train`
then runs both stages from it; bad input is one line and writes nothing."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx
from menagerie import arch
from menagerie.export.run import load_run
from menagerie.train.config import read_yaml

from ..cli_testing import cli_env
from ..export.export_testing import our_logits, run_main, saved_run
from ..faults.faults_testing import assert_one_error_line, run_cli
from ..random_params import random_module
from .conftest import cli

DENSE = {"d_model": 32, "n_layers": 2, "mixer": {"n_heads": 4}, "ffn": {"hidden_dim": 128}}


def _dense_run(root, model=DENSE):
    return saved_run(
        root, model, 32, lambda c: random_module(lambda: arch.build(c, rngs=nnx.Rngs(0)), 3)
    )


def _logits(run, model=None):
    tokens = np.asarray(run.tokenizer.encode("def f(x):\n    return x * 2\n"))[None]
    return our_logits(model or run.model, tokens)


def _every_gate_on(run):
    """The run's model with model.ffn.all_experts set (same parameters)."""
    cfg = run.cfg.model
    on = cfg.model_copy(update={"ffn": cfg.ffn.model_copy(update={"all_experts": True})})
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: arch.build(on, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, nnx.state(run.model))


@pytest.mark.parametrize("scan", [True, False])
def test_converted_run_with_every_gate_on_is_the_dense_model(tmp_path, scan):
    """Bugs caught: gate, up and down permuted differently (or one of them not at all), a
    permutation per layer applied to the wrong layer, the dense weights replaced by the fresh
    init, the routers missing; overrides after `--step` refused."""
    dense_dir = _dense_run(tmp_path, DENSE | {"scan_layers": scan})
    out = tmp_path / "lte"
    # Overrides may follow options (argparse alone stops the list at the first option).
    argv = ["convert-lte", str(dense_dir), "--step", "0", "model.ffn.expert_size=16"]
    rc, stdout, stderr = run_main([*argv, "--out", str(out)])
    assert rc == 0, stderr
    assert f"converted into {out}" in stdout
    saved = read_yaml(out / "config.yaml")["model"]["ffn"]
    assert saved["kind"] == "lte" and saved["inner"]["hidden_dim"] == 128
    dense = load_run(dense_dir)
    on = load_run(out)
    np.testing.assert_allclose(
        _logits(on, _every_gate_on(on)), _logits(dense), rtol=1e-5, atol=1e-5
    )
    assert np.abs(_logits(on) - _logits(dense)).max() > 1e-3  # routed, it is another model
    # The FFN really was regrouped (not the identity) and the routers are fresh and finite.
    ffn = on.params["blocks"]["ffn"] if scan else on.params["blocks"][0]["ffn"]
    dense_ffn = dense.params["blocks"]["ffn"] if scan else dense.params["blocks"][0]["ffn"]
    gate, dense_gate = ffn["inner"]["gate"]["kernel"], dense_ffn["gate"]["kernel"]
    assert not np.array_equal(gate, dense_gate)
    np.testing.assert_array_equal(np.sort(gate, axis=-1), np.sort(dense_gate, axis=-1))
    assert ffn["router"]["kernel"].shape[-1] == 8 and np.isfinite(ffn["router"]["kernel"]).all()


def test_converted_run_trains_through_both_stages(tmp_path):
    """Bug caught: a converted run that `menagerie train` cannot continue (a checkpoint shaped
    unlike the LTE model, a config that does not round-trip)."""
    dense_dir = _dense_run(tmp_path)
    out = tmp_path / "lte"
    overrides = ["model.ffn.hard_from_step=3", "train.steps=6", "train.sample_tokens=0"]
    rc, _, stderr = run_main(["convert-lte", str(dense_dir), *overrides, "--out", str(out)])
    assert rc == 0, stderr
    done = cli("train", "-c", str(out / "config.yaml"), "log.every=1", "train.eval_every=0")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout and "(step 0)" in done.stdout


@pytest.mark.parametrize(
    "model, overrides, message",
    [
        ({"family": "mosaics", "d_model": 32, "n_layers": 1}, [], "has no neurons to group"),
        (DENSE, ["model.ffn.expert_size=48"], "does not divide"),
        (DENSE, ["model.ffn.inner.hidden_dim=64"], "not replace the dense FFN"),
    ],
)
def test_bad_conversions_are_one_line_and_write_nothing(tmp_path, model, overrides, message):
    """Bug caught: a traceback, or a half-written run folder left behind, for a run that
    cannot be converted."""
    dense_dir = _dense_run(tmp_path, model)
    out = tmp_path / "lte"
    rc, _, stderr = run_main(["convert-lte", str(dense_dir), *overrides, "--out", str(out)])
    assert rc == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not out.exists()


def test_conversion_refuses_a_folder_in_use(tmp_path):
    """Bugs caught: --out pointing at another run overwrites it; unknown options swallowed by
    the override list."""
    dense_dir = _dense_run(tmp_path)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    rc, _, stderr = run_main(["convert-lte", str(dense_dir), "--out", str(tmp_path / "busy")])
    assert rc == 2 and "not an empty folder" in stderr
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    with pytest.raises(SystemExit):  # a stray option is still refused, not read as an override
        run_main(["convert-lte", str(dense_dir), "--bogus", "--out", str(tmp_path / "x")])


def test_a_disk_full_mid_conversion_removes_what_it_wrote_and_nothing_else(tmp_path):
    """Bugs caught: a half-written run left in --out after an OS error (a later `train -c`
    would start from it), or the user's own empty --out folder deleted with it."""
    dense_dir = _dense_run(tmp_path)
    out = tmp_path / "lte"
    out.mkdir()
    # The config (a few kB) fits under the file-size limit, the checkpoint's embedding does not
    # (nor would the compilation cache's entries: that process does without it).
    env = {k: v for k, v in cli_env().items() if k != "JAX_COMPILATION_CACHE_DIR"}
    limit = ["prlimit", "--fsize=20000"]
    done = run_cli(["convert-lte", dense_dir, "--out", out], prefix=limit, env=env)
    assert_one_error_line(done, str(out))
    assert list(out.iterdir()) == []
