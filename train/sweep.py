"""Scaling-law sweeps: many ordinary runs from one sweep file, run here or on a cluster.

    menagerie sweep run configs/sweeps/ci_tiny.yaml [--out DIR] [--jobs N]
    menagerie sweep run configs/sweeps/ci_tiny.yaml --emit slurm [--nodes N]  # DIR/sweep.sbatch
    menagerie sweep run configs/sweeps/ci_tiny.yaml --emit commands           # one line per run
    menagerie sweep report DIR                                   # see `train.sweep_report`

A sweep file (`SweepFile`, strict: unknown fields are refused) names one or more arms
(architectures), each a base config (a YAML preset and dotted overrides), and either

- `grid`: the product (or zip) of values of any dotted config fields, or
- `isoflop`: compute budgets C and, per arm, model sizes as override sets. Each run's steps are
  C / (flops_per_token(seq_len) x batch_size x seq_len), from the model's own FLOP count; the
  learning rate may follow lr = coef x N^exponent (N: non-embedding parameters). Counts that
  are derived are never written: a sweep that sets them too is refused.

Each run is an ordinary run folder `DIR/runs/<name>` (config.yaml, metrics.jsonl,
checkpoints) trained by `python -m menagerie.train.cli train ...` in a subprocess, its output in
`DIR/logs/<name>.log`. Rerunning the sweep skips finished runs (final step reached and final eval
recorded) and resumes the others from their newest checkpoint (the trainer's own resume).
`DIR/plan.json` records the runs for `sweep report`. Paths (the base configs, data.source,
DIR) are relative to the current folder, as for `menagerie train`; emitted scripts `cd` there.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import types
import typing
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, model_validator

from .errors import ConfigError, TrainingError

# Unknown fields are refused; values are coerced (PyYAML reads 1e9 as text, pydantic as 1e9).
_STRICT = ConfigDict(extra="forbid", use_attribute_docstrings=True)
PLAN_FILE = "plan.json"
EMITTERS = ("slurm", "commands")


class Arm(BaseModel):
    """One architecture of the sweep: a base config and, for an isoFLOP ladder, its sizes."""

    model_config = _STRICT

    config: str | None = None
    """YAML preset of the arm's runs (relative to the current folder); None: the defaults."""
    overrides: dict[str, Any] = {}
    """Dotted config fields set on every run of this arm, e.g. {model.family: megalodon}."""
    sizes: list[dict[str, Any]] = []
    """isoFLOP ladder only: the model sizes, each a set of dotted overrides such as
    {model.d_model: 64, model.n_layers: 2}."""


class Grid(BaseModel):
    """Runs over the values of dotted config fields."""

    model_config = _STRICT

    mode: Literal["product", "zip"] = "product"
    """product: every combination; zip: the i-th value of every field together."""
    axes: dict[str, list[Any]]
    """Dotted field -> its values, e.g. {optim.lr: [1e-3, 3e-3], train.seed: [0, 1]}."""

    @model_validator(mode="after")
    def _check(self) -> Grid:
        empty = [k for k, v in self.axes.items() if not v]
        if not self.axes or empty:
            what = f"grid.axes.{empty[0]} has no values" if empty else "grid.axes is empty"
            raise ValueError(f"{what}; give each field a list of values, e.g. optim.lr: [1e-3]")
        lengths = {k: len(v) for k, v in self.axes.items()}
        if self.mode == "zip" and len(set(lengths.values())) > 1:
            raise ValueError(
                f"grid.mode zip needs lists of one length, got {lengths}; make them equal "
                "or use mode: product"
            )
        return self

    def points(self) -> list[dict[str, Any]]:
        keys, values = list(self.axes), list(self.axes.values())
        combos = zip(*values, strict=True) if self.mode == "zip" else itertools.product(*values)
        return [dict(zip(keys, combo, strict=True)) for combo in combos]


class LrRule(BaseModel):
    """optim.lr = coef x N^exponent, N the model's non-embedding parameters."""

    model_config = _STRICT

    coef: float
    exponent: float


class IsoFLOP(BaseModel):
    """A ladder of compute budgets crossed with each arm's `sizes`."""

    model_config = _STRICT

    budgets: list[float]
    """Training FLOPs C per run (forward + backward, the model's `flops_per_token`)."""
    min_steps: int = 10
    """A (budget, size) pair that would train fewer steps is left out; a budget left with no
    run is an error."""
    lr: LrRule | None = None
    """Learning rate as a rule of the size; None: the arm's config's optim.lr."""
    warmup_fraction: float | None = None
    """optim.warmup_steps = round(this x steps), per run; None: the config's warmup_steps."""

    @model_validator(mode="after")
    def _check(self) -> IsoFLOP:
        if not self.budgets or any(not (c > 0 and math.isfinite(c)) for c in self.budgets):
            raise ValueError("isoflop.budgets must be a non-empty list of FLOPs > 0, e.g. [1e12]")
        if self.min_steps < 1:
            raise ValueError(f"isoflop.min_steps={self.min_steps} must be >= 1")
        if self.warmup_fraction is not None and not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"isoflop.warmup_fraction={self.warmup_fraction} must be in [0, 1)")
        return self


class SweepFile(BaseModel):
    """A sweep: arms, what every run shares, and a grid or an isoFLOP ladder."""

    model_config = _STRICT

    arms: dict[str, Arm]
    """Architecture label -> its base config; the label names its runs and colours its plots."""
    overrides: dict[str, Any] = {}
    """Dotted config fields set on every run of every arm (an arm's own overrides win)."""
    grid: Grid | None = None
    isoflop: IsoFLOP | None = None
    out_dir: str | None = None
    """Folder of the sweep; None: sweeps/<name of the sweep file>. `--out` overrides it."""

    @model_validator(mode="after")
    def _check(self) -> SweepFile:
        if not self.arms:
            raise ValueError("arms is empty; name at least one, e.g. arms: {transformer: {}}")
        if (self.grid is None) == (self.isoflop is None):
            raise ValueError("give exactly one of grid: or isoflop:")
        for label, arm in self.arms.items():
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", label):
                raise ValueError(f"arm label {label!r}: use letters, digits, '.', '_' or '-'")
            if self.isoflop is not None and not arm.sizes:
                raise ValueError(f"arms.{label}.sizes is empty; an isoflop ladder needs sizes")
            if self.grid is not None and arm.sizes:
                raise ValueError(f"arms.{label}.sizes is only read by isoflop:; use grid.axes")
        return self


def read_sweep(path: str | Path) -> SweepFile:
    """The sweep file at `path`; ConfigError (one line) if it is missing or malformed."""
    from .config import read_yaml

    if not Path(path).is_file():
        raise ConfigError(
            f"sweep file '{path}' does not exist; pass a sweep YAML such as "
            "configs/sweeps/ci_tiny.yaml"
        )
    raw = read_yaml(path)
    try:
        return SweepFile.model_validate(raw)
    except pydantic.ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            fields = _fields_at(first["loc"][:-1])
            msg = f"unknown field; known here: {', '.join(fields)}"
        where = f"{loc}: " if loc and not msg.startswith(loc) else ""
        raise ConfigError(f"sweep file '{path}': {where}{msg}") from None


def _fields_at(loc: tuple) -> list[str]:
    """Field names of the section at `loc` of a SweepFile (for the unknown-field message)."""
    t: Any = SweepFile
    for part in loc:
        t = _unwrap(t)
        if isinstance(t, type) and issubclass(t, BaseModel):
            t = t.model_fields[part].annotation if part in t.model_fields else None
        elif typing.get_origin(t) in (dict, list):
            t = typing.get_args(t)[-1]
    t = _unwrap(t)
    return sorted(t.model_fields) if isinstance(t, type) and issubclass(t, BaseModel) else []


def _unwrap(t: Any) -> Any:
    """X from X | None."""
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(t) if a is not type(None)]
        return rest[0] if len(rest) == 1 else t
    return t


# ----------------------------------------------------------------------------- planning


class Run(BaseModel):
    """One planned run: its name, arm, overrides and the counts derived from its config."""

    name: str
    arm: str
    overrides: dict[str, Any]
    budget: float | None
    steps: int
    n_params: int
    n_params_total: int
    flops_per_token: float
    tokens: int

    @property
    def flops(self) -> float:
        return self.flops_per_token * self.tokens


def plan(sweep: SweepFile, out_dir: Path) -> tuple[list[Run], list[str]]:
    """The runs of `sweep` in `out_dir` (each config checked by building it) and notes on
    (budget, size) pairs left out for training fewer than `isoflop.min_steps` steps."""
    runs, notes = [], []
    for label, arm in sweep.arms.items():
        if sweep.grid is not None:
            for point in sweep.grid.points():
                overrides = {**sweep.overrides, **arm.overrides, **point}
                runs.append(_run(label, arm, overrides, _name(label, point), None, out_dir))
        else:
            runs += _ladder(sweep, label, arm, out_dir, notes)
    names = [r.name for r in runs]
    if len(set(names)) < len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ConfigError(
            f"two runs of the sweep are both named '{dup}'; make the grid values or sizes differ"
        )
    return runs, notes


def _ladder(sweep: SweepFile, label: str, arm: Arm, out_dir: Path, notes: list[str]):
    iso, runs = sweep.isoflop, []
    derived = {"train.steps"} | ({"optim.lr"} if iso.lr else set())
    derived |= {"optim.warmup_steps"} if iso.warmup_fraction is not None else set()
    for where, mapping in [
        ("overrides", sweep.overrides),
        (f"arms.{label}.overrides", arm.overrides),
    ]:
        written = sorted(derived & set(mapping))
        if written:
            raise ConfigError(
                f"{where} sets {written[0]}, which the isoflop ladder derives from the budget "
                "(and lr rule); remove it"
            )
    for i, size in enumerate(arm.sizes):
        written = sorted(derived & set(size))
        if written:
            raise ConfigError(f"arms.{label}.sizes[{i}] sets {written[0]}, which is derived")
    sized = [
        (size, _counts(arm, {**sweep.overrides, **arm.overrides, **size})) for size in arm.sizes
    ]
    for c in sorted(iso.budgets):
        kept = []
        for size, (cfg, n, _, fpt) in sized:
            steps = round(c / (fpt * cfg.train.batch_size * cfg.train.seq_len))
            if steps < iso.min_steps:
                notes.append(f"{label} C={c:.3g}: size {_label(size)} left out ({steps} steps)")
                continue
            derived_values: dict[str, Any] = {"train.steps": steps}
            if iso.lr is not None:
                derived_values["optim.lr"] = float(f"{iso.lr.coef * n**iso.lr.exponent:.4g}")
            if iso.warmup_fraction is not None:
                derived_values["optim.warmup_steps"] = round(iso.warmup_fraction * steps)
            overrides = {**sweep.overrides, **arm.overrides, **size, **derived_values}
            name = _name(label, {"C": c, **size})
            kept.append(_run(label, arm, overrides, name, c, out_dir))
        if not kept:
            smallest = min(
                fpt * cfg.train.batch_size * cfg.train.seq_len for _, (cfg, *_, fpt) in sized
            )
            raise ConfigError(
                f"isoflop budget C={c:.3g} is too small for every size of arm '{label}': the "
                f"smallest takes {smallest:.3g} FLOPs per step, so {iso.min_steps} steps "
                f"(isoflop.min_steps) need C >= {smallest * iso.min_steps:.3g}; raise the budget "
                "or add a smaller size"
            )
        runs += kept
    return runs


def _run(label: str, arm: Arm, overrides: dict, name: str, budget, out_dir: Path) -> Run:
    overrides = {**overrides, "run_dir": str(out_dir / "runs" / name)}
    cfg, n, n_total, fpt = _counts(arm, overrides, name)
    if cfg.train.eval_batches == 0:
        raise ConfigError(
            f"run '{name}' has train.eval_batches=0: the report needs a final eval loss; "
            "set train.eval_batches >= 1 in the sweep's overrides"
        )
    return Run(
        name=name,
        arm=label,
        overrides=overrides,
        budget=budget,
        steps=cfg.train.steps,
        n_params=n,
        n_params_total=n_total,
        flops_per_token=fpt,
        tokens=cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len,
    )


def _counts(arm: Arm, overrides: dict, name: str | None = None):
    """(config, non-embedding N, total N, FLOPs per token) of an arm with `overrides`."""
    from .config import build_config, read_yaml
    from .plan import tokenizer_vocab

    raw = read_yaml(arm.config) if arm.config else {}
    try:
        cfg = build_config(raw, [f"{k}={override_text(v)}" for k, v in overrides.items()])
        model = cfg.model.with_vocab(tokenizer_vocab(cfg.data))
    except (ConfigError, ValueError) as e:
        raise ConfigError(f"run '{name or _label(overrides)}': {e}") from None
    n, n_total = model.num_params(include_embeddings=False), model.num_params()
    return cfg, n, n_total, model.flops_per_token(cfg.train.seq_len)


def override_text(value: Any) -> str:
    """A value as the text of a dotted override (`train.config` parses it back)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str | int | float):
        return str(value)
    return yaml.safe_dump(value, default_flow_style=True).strip()


def _label(values: dict[str, Any]) -> str:
    parts = []
    for key, v in values.items():
        leaf = key.rsplit(".", 1)[-1]
        text = f"{v:.3g}".replace("+", "") if isinstance(v, float) else override_text(v)
        parts.append(f"{leaf}{text}" if key != "C" else f"C{text}")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts)) or "base"


def _name(arm: str, values: dict[str, Any]) -> str:
    return f"{arm}-{_label(values)}"


def write_plan(out_dir: Path, sweep_path: Path, runs: list[Run]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = {"sweep_file": str(sweep_path), "runs": [r.model_dump() for r in runs]}
    tmp = out_dir / f"{PLAN_FILE}.tmp"
    tmp.write_text(json.dumps(plan, indent=1))
    os.replace(tmp, out_dir / PLAN_FILE)


def read_plan(out_dir: Path) -> list[Run]:
    path = Path(out_dir) / PLAN_FILE
    if not path.is_file():
        raise ConfigError(
            f"'{out_dir}' holds no {PLAN_FILE}: not a sweep folder; pass the folder "
            "`menagerie sweep run` wrote (its --out, or sweeps/<sweep file name>)"
        )
    return [Run(**r) for r in json.loads(path.read_text())["runs"]]


# ----------------------------------------------------------------------------- running


def train_command(run: Run, arms: dict[str, Arm]) -> list[str]:
    """The `menagerie train` command of one run (the arm's preset, then every override)."""
    config = arms[run.arm].config
    head = [sys.executable, "-m", "menagerie.train.cli", "train"]
    head += ["-c", config] if config else []
    return head + [f"{k}={override_text(v)}" for k, v in run.overrides.items()]


def is_finished(run: Run) -> bool:
    """Whether the run reached its final step and recorded its final eval."""
    path = Path(run.overrides["run_dir"]) / "metrics.jsonl"
    if not path.is_file():
        return False
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        if row.get("kind") == "eval" and row.get("step") == run.steps:
            return True
    return False


def run_sweep(
    runs: list[Run], arms: dict[str, Arm], out_dir: Path, jobs: int = 1, say=print
) -> None:
    """Trains the unfinished runs, `jobs` at a time, each in its own process; TrainingError
    naming the failed runs and their logs at the end if any failed. On SIGTERM or SIGINT
    nothing new starts and the running trainers save and stop: SIGTERM is passed on to them,
    a terminal's Ctrl-C reaches them itself (they share the sweep's process group; a second
    SIGINT would make them abort without saving)."""
    todo = [r for r in runs if not is_finished(r)]
    say(f"sweep {out_dir}: {len(runs)} runs, {len(runs) - len(todo)} finished, {len(todo)} to run")
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    failed: list[str] = []
    stop: list[int] = []

    def forward(signum, frame):
        stop.append(signum)
        if signum == signal.SIGTERM:
            for proc, _ in running.values():
                proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        queue = list(todo)
        while queue or running:
            while queue and len(running) < jobs and not stop:
                run = queue.pop(0)
                with open(logs / f"{run.name}.log", "a") as log:
                    proc = subprocess.Popen(
                        train_command(run, arms), stdout=log, stderr=subprocess.STDOUT
                    )
                running[run.name] = (proc, time.monotonic())
                say(f"[{runs.index(run) + 1}/{len(runs)}] {run.name}: started")
            if stop and not running:
                break
            time.sleep(0.1)
            for run in [r for r in todo if r.name in running]:
                proc, t0 = running[run.name]
                if proc.poll() is None:
                    continue
                del running[run.name]
                took = f"{time.monotonic() - t0:.0f} s"
                if proc.returncode == 0 and is_finished(run):
                    say(f"{run.name}: done in {took}")
                elif not stop:
                    failed.append(run.name)
                    say(f"{run.name}: failed (exit {proc.returncode}) after {took}")
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if stop:
        raise KeyboardInterrupt(f"sweep stopped; rerun the same command to resume ({out_dir})")
    if failed:
        raise TrainingError(
            f"{len(failed)} of {len(runs)} runs failed ({', '.join(failed[:3])}"
            f"{', ...' if len(failed) > 3 else ''}): see {logs}/<run>.log; fix the cause and "
            "rerun the sweep (finished runs are skipped)"
        )


# ----------------------------------------------------------------------------- emitting


def emit_commands(runs: list[Run], arms: dict[str, Arm]) -> str:
    """One shell line per run, from the current folder."""
    cd = f"cd {shlex.quote(os.getcwd())} && "
    return "".join(cd + shlex.join(train_command(r, arms)) + "\n" for r in runs)


def emit_slurm(runs: list[Run], arms: dict[str, Arm], out_dir: Path, nodes: int = 1) -> str:
    """An sbatch job-array script: array task i trains run i (a rerun resumes it). Multi-node
    runs start one process per node with `srun` and MENAGERIE_DISTRIBUTED=auto (JAX reads the
    SLURM environment; `train.distributed`). Partition, time and GPUs: sbatch's own options on
    its command line (they override the script's #SBATCH lines)."""
    logs = (out_dir / "logs").resolve()
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name=sweep-{out_dir.resolve().name}",
        f"#SBATCH --array=0-{len(runs) - 1}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --output={logs}/slurm-%A_%a.log",
        f"# {len(runs)} runs; submit with: sbatch {out_dir / 'sweep.sbatch'}",
        "set -euo pipefail",
        f"cd {shlex.quote(os.getcwd())}",
    ]
    launch = "srun "
    if nodes > 1:
        lines.append("export MENAGERIE_DISTRIBUTED=auto")
    lines.append('case "$SLURM_ARRAY_TASK_ID" in')
    for i, run in enumerate(runs):
        lines.append(f"  {i})  # {run.name}")
        lines.append(f"    {launch}{shlex.join(train_command(run, arms))} ;;")
    lines += ['  *) echo "no run for array task $SLURM_ARRAY_TASK_ID" >&2; exit 1 ;;', "esac"]
    return "\n".join(lines) + "\n"


def resolve_out_dir(sweep: SweepFile, sweep_path: Path, out: str | None) -> Path:
    return Path(out or sweep.out_dir or Path("sweeps") / sweep_path.stem)


def cmd_run(args) -> int:
    """`menagerie sweep run`."""
    path = Path(args.sweep_file)
    sweep = read_sweep(path)
    if args.jobs < 1 or args.nodes < 1:
        raise ConfigError(f"--jobs {args.jobs} / --nodes {args.nodes}: both must be >= 1")
    out_dir = resolve_out_dir(sweep, path, args.out)
    runs, notes = plan(sweep, out_dir)
    for note in notes:
        print(f"note: {note}")
    write_plan(out_dir, path, runs)
    if args.emit == "commands":
        text = emit_commands(runs, sweep.arms)
        (out_dir / "commands.txt").write_text(text)
        print(text, end="")
    elif args.emit == "slurm":
        script = out_dir / "sweep.sbatch"
        script.write_text(emit_slurm(runs, sweep.arms, out_dir, nodes=args.nodes))
        print(f"wrote {script} ({len(runs)} array tasks); submit with: sbatch {script}")
    else:
        run_sweep(runs, sweep.arms, out_dir, jobs=args.jobs)
        print(f"sweep done: {len(runs)} runs in {out_dir}; menagerie sweep report {out_dir}")
    return 0
