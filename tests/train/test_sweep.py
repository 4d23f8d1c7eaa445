"""Scaling-law sweeps (`train/sweep.py`, `sweep_fit.py`, `sweep_report.py`): the fits on
synthetic losses of a known law, and the CI sweep (configs/sweeps/ci_tiny.yaml, 3 tiny sizes x 2
budgets) through the real CLI: run, report, kill and rerun, emitted scripts, refused files."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from menagerie.train.sweep_fit import fit_approach2, fit_approach3, law

from ..cli_testing import ROOT, built_once, cli, cli_env, snapshot

SWEEP = ROOT / "configs" / "sweeps" / "ci_tiny.yaml"
# Hoffmann et al.'s fit (as quoted by Open-Athena's specs/project.md): the law the synthetic
# losses come from.
CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
BOOTSTRAP = "20"


def _plan(out: Path) -> list[dict]:
    return json.loads((out / "plan.json").read_text())["runs"]


def _build_sweep(out: Path) -> None:
    for args in (
        ("sweep", "run", str(SWEEP), "--out", str(out), "--jobs", "2"),
        ("sweep", "report", str(out), "--bootstrap", BOOTSTRAP),
    ):
        done = cli(*args)
        assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> Path:
    """The CI sweep run (two runs at a time) and reported once per test session (shared: copy
    before changing)."""
    return built_once(tmp_path_factory, "sweep-ci", _build_sweep)


def test_approach3_recovers_a_known_law():
    """Approach 3 on a 6 x 6 grid of N and D with losses from Chinchilla's law times 0.5%
    log-normal noise: alpha and beta within 0.02, E within 3%, A and B within 10% (the least
    determined), and every true value inside its 95% bootstrap interval. Catches a wrong
    analytic gradient (e.g. the sign of d/d alpha), a loss on raw instead of log residuals, or
    an optimizer stopped early (Besiroglu et al.)."""
    rng = np.random.default_rng(1)
    n = np.repeat(np.geomspace(1e6, 1e9, 6), 6)
    d = np.tile(np.geomspace(1e8, 1e11, 6), 6)
    loss = law(CHINCHILLA, n, d) * np.exp(rng.normal(0.0, 0.005, n.size))
    fit = fit_approach3(n, d, loss, bootstrap=20)
    p, ci = fit["params"], fit["intervals"]
    assert abs(p["alpha"] - CHINCHILLA["alpha"]) < 0.02
    assert abs(p["beta"] - CHINCHILLA["beta"]) < 0.02
    assert abs(p["E"] / CHINCHILLA["E"] - 1) < 0.03
    assert abs(p["A"] / CHINCHILLA["A"] - 1) < 0.10
    assert abs(p["B"] / CHINCHILLA["B"] - 1) < 0.10
    for k, true in CHINCHILLA.items():
        assert ci[k][0] <= true <= ci[k][1], (k, ci[k], true)


def test_approach2_recovers_the_optimal_exponents():
    """Approach 2 on isoFLOP profiles of the same law (C = 6 N D, 7 sizes per budget spread
    x4 either side of the true optimum, 0.2% noise): N* ~ C^a and D* ~ C^b with a and b within
    0.01 of beta/(alpha+beta) and alpha/(alpha+beta). Catches a wrong parabola vertex (e.g.
    -c1/c2 for -c1/(2 c2)) or a power law fitted in linear space."""
    rng = np.random.default_rng(2)
    alpha, beta = CHINCHILLA["alpha"], CHINCHILLA["beta"]
    g = (alpha * CHINCHILLA["A"] / (beta * CHINCHILLA["B"])) ** (1 / (alpha + beta))
    budget, n = [], []
    for c in np.geomspace(1e18, 1e21, 4):
        for f in np.geomspace(1 / 4, 4, 7):
            budget.append(c)
            n.append(f * g * (c / 6) ** (beta / (alpha + beta)))
    budget, n = np.array(budget), np.array(n)
    d = budget / (6 * n)
    loss = law(CHINCHILLA, n, d) * np.exp(rng.normal(0.0, 0.002, n.size))
    fit = fit_approach2(budget, n, d, loss)
    assert abs(fit["n_opt"]["exponent"] - beta / (alpha + beta)) < 0.01
    assert abs(fit["d_opt"]["exponent"] - alpha / (alpha + beta)) < 0.01
    assert all(b["n_parabola"]["inside"] for b in fit["budgets"])


def test_sweep_runs_end_to_end_and_reports(swept):
    """The CI sweep through `menagerie sweep run` and `sweep report`: six ordinary run folders
    whose configs train the derived steps (each run's C within half a step of its budget), the
    learning rate of the size rule, a final eval each; runs.csv with those six rows and counts;
    fits.json with both approaches for the arm; three PNGs. Catches the size rule's learning
    rate not applied, tokens (so D and C) counted without the batch size, or steps that do not
    spend the budget."""
    sweep = yaml.safe_load(SWEEP.read_text())
    plan = _plan(swept)
    assert len(plan) == 6
    with open(swept / "report" / "runs.csv") as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    assert set(rows) == {r["name"] for r in plan}
    tokens_per_step = sweep["overrides"]["train.batch_size"] * sweep["overrides"]["train.seq_len"]
    lr = sweep["isoflop"]["lr"]
    for run in plan:
        folder = swept / "runs" / run["name"]
        assert {"config.yaml", "metrics.jsonl", "checkpoints"} <= {p.name for p in folder.iterdir()}
        cfg = yaml.safe_load((folder / "config.yaml").read_text())
        row = rows[run["name"]]
        assert cfg["train"]["steps"] == run["steps"] == int(row["steps"])
        assert int(row["tokens"]) == run["steps"] * tokens_per_step
        step_flops = run["flops_per_token"] * tokens_per_step
        assert abs(float(row["flops"]) - run["budget"]) <= step_flops / 2
        assert float(row["flops"]) == pytest.approx(run["flops_per_token"] * int(row["tokens"]))
        assert int(row["n_params"]) == run["n_params"] < int(row["n_params_total"])
        assert cfg["optim"]["lr"] == pytest.approx(
            lr["coef"] * run["n_params"] ** lr["exponent"], rel=1e-3
        )
        final = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in final if r["kind"] == "eval"]
        assert evals[-1]["step"] == run["steps"]
        assert float(row["loss"]) == evals[-1]["loss"]
    fits = json.loads((swept / "report" / "fits.json").read_text())
    arm = fits["arms"]["transformer"]
    assert set(arm["approach3"]["params"]) >= {"E", "A", "B", "alpha", "beta"}
    assert set(arm["approach3"]["intervals"]) >= {"alpha", "beta"}
    assert len(arm["approach2"]["budgets"]) + len(arm["approach2"]["skipped"]) == 2
    for name in ("loss_vs_flops", "isoflop", "frontier"):
        png = (swept / "report" / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_killed_sweep_redoes_no_finished_run(swept, tmp_path):
    """The sweep killed (SIGKILL to its process group: the sweep and its trainer) while its one
    unfinished run trains, after the five others finished, then rerun: the five are skipped
    (their folders byte for byte unchanged), the killed run resumes from its checkpoint, and
    the report's runs.csv and fits.json equal those of the uninterrupted sweep. Catches a sweep
    that retrains finished runs or counts a killed run as finished (no final eval)."""
    out = tmp_path / "sweep"
    shutil.copytree(swept, out)
    shutil.rmtree(out / "report")
    longest = max(_plan(out), key=lambda r: r["steps"])["name"]
    shutil.rmtree(out / "runs" / longest)
    finished = {p.name: snapshot(p) for p in (out / "runs").iterdir()}
    args = [sys.executable, "-m", "menagerie.train.cli", "sweep", "run", str(SWEEP)]
    proc = subprocess.Popen(
        [*args, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=cli_env(),
        cwd=ROOT,
        start_new_session=True,
    )
    checkpoints = out / "runs" / longest / "checkpoints"
    deadline = time.monotonic() + 300
    while not (checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "no checkpoint of the unfinished run in 300 s"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    metrics = (out / "runs" / longest / "metrics.jsonl").read_text()
    assert '"kind": "eval"' not in metrics, "the run finished before the kill: make it longer"

    rerun = cli("sweep", "run", str(SWEEP), "--out", str(out))
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "6 runs, 5 finished, 1 to run" in rerun.stdout
    assert "resumed from" in (out / "logs" / f"{longest}.log").read_text()
    for name, before in finished.items():
        assert snapshot(out / "runs" / name) == before, name
    done = cli("sweep", "report", str(out), "--bootstrap", BOOTSTRAP)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("runs.csv", "fits.json"):
        assert (out / "report" / name).read_text() == (swept / "report" / name).read_text()


def test_emitted_slurm_and_commands_name_one_task_per_run(tmp_path):
    """`--emit slurm` (2 nodes) writes an sbatch script that `bash -n` accepts, with an array
    of exactly one task per run, each task training its own run folder through srun with
    MENAGERIE_DISTRIBUTED=auto; `--emit commands` prints one train command per run. Nothing is
    trained. Catches an off-by-one array range, a run missing from the case list, or a
    multi-node script without the distributed start-up."""
    out = tmp_path / "sweep"
    done = cli("sweep", "run", str(SWEEP), "--out", str(out), "--emit", "slurm", "--nodes", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    script = out / "sweep.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    plan = _plan(out)
    assert f"#SBATCH --array=0-{len(plan) - 1}\n" in text
    assert "#SBATCH --nodes=2" in text and "export MENAGERIE_DISTRIBUTED=auto" in text
    for i, run in enumerate(plan):
        (task,) = [x for x in text.splitlines() if f"run_dir={run['overrides']['run_dir']} " in x]
        assert task.strip().startswith("srun ") and " train " in task
        assert f"  {i})  # {run['name']}\n" in text
    assert not (out / "runs").exists()

    commands = cli("sweep", "run", str(SWEEP), "--out", str(out), "--emit", "commands")
    lines = commands.stdout.splitlines()
    assert len(lines) == len(plan) and all("menagerie.train.cli train" in x for x in lines)


BAD_SWEEPS = {
    "unknown field": (
        "arms:\n  transformer:\n    config: configs/transformer/tiny.yaml\n"
        "    sizez: [{model.d_model: 32}]\nisoflop: {budgets: [1.0e+9]}\n",
        "arms.transformer.sizez: unknown field; known here: config, overrides, sizes",
    ),
    "empty grid": (
        "arms: {transformer: {config: configs/transformer/tiny.yaml}}\n"
        "grid: {axes: {optim.lr: []}}\n",
        "grid.axes.optim.lr has no values; give each field a list of values",
    ),
    "budget too small": (
        "arms:\n  transformer:\n    config: configs/transformer/tiny.yaml\n"
        "    sizes: [{model.d_model: 32, model.n_layers: 1}, {model.d_model: 64}]\n"
        "overrides: {train.batch_size: 4, train.seq_len: 64}\n"
        "isoflop: {budgets: [1.0e+6, 1.0e+10]}\n",
        "isoflop budget C=1e+06 is too small for every size of arm 'transformer': the "
        "smallest takes 6.45e+07 FLOPs per step, so 10 steps (isoflop.min_steps) need "
        "C >= 6.45e+08; raise the budget or add a smaller size",
    ),
}


@pytest.mark.parametrize("case", list(BAD_SWEEPS))
def test_bad_sweep_file_is_one_clear_line(case, tmp_path):
    """A sweep file with an unknown field, an empty grid or a budget too small for the smallest
    model: exit 2, one `error:` line on stderr saying what is wrong and the fix, nothing
    written. Catches a pydantic traceback or multi-line dump instead of the line, an empty
    grid planned as zero runs, and a budget that silently trains 0 steps."""
    text, want = BAD_SWEEPS[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    done = cli("sweep", "run", str(path), "--out", str(tmp_path / "out"), "--emit", "commands")
    assert done.returncode == 2, done.stdout + done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith("error: ") and want in line, line
    assert not (tmp_path / "out").exists()
