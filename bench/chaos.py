"""Chaos run: `menagerie train` killed with SIGKILL at random moments and rerun each time until
it completes must end bit for bit where an uninterrupted run of the same command ends.

    python bench/chaos.py [--kills 20] [--seed 0] [--steps 100]

Moments. A seeded RNG deals the kind of each kill ("step", "save", "eval": each kind once in
every round of three, in a random order) and a target step in the next stretch of the run (the
steps after the newest checkpoint, split evenly over the kills left), then a random delay:

- step: the target step's train row appears in metrics.jsonl, then 0-100 ms pass (a step of
  the tiny model takes ~50 ms on CPU): killed inside a step or between two;
- save: the target (checkpoint) step's train row has appeared and so has the temporary
  folder of its async save under `checkpoints/`, then 0-200 ms pass (such a save takes ~300
  ms): killed while Orbax writes in the background and training goes on;
- eval: the target eval step's train row appears (the eval runs right after it is written),
  then 0-20 ms pass: killed while evaluating.

What a kill actually hit is read back from the run folder afterwards (a save's temporary folder
left behind, an eval row missing) and shown as `landed`. The final save and the final eval (at
`--steps`) are only targeted by the last kill, so that every kill finds a run to kill.

Checks (`check`): every rerun printed "resumed from ... (step N)" with N at or after the newest
checkpoint on disk when the attempt before it was killed (and never before the previous resume),
so a silent restart from scratch cannot pass: the run is deterministic, so a restart from
scratch would also end bitwise equal. Then the newest checkpoints of both runs hold the same
step and the same state (parameters, optimizer state, counters), every array bitwise equal
(np.array_equal), and metrics.jsonl holds the same train loss for every step and the same
evals.

The uninterrupted reference run starts first and runs alongside. Both runs share a JAX
compilation cache (a temporary one unless JAX_COMPILATION_CACHE_DIR is set), so a restart costs
its start-up and no compiles. Prints a table and one JSON line; exits 1 if a
check fails. tests/faults/test_chaos.py runs the same driver with 3 kills.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "transformer" / "tiny.yaml"
KINDS = ("step", "save", "eval")
MAX_DELAY_S = {"step": 0.1, "save": 0.2, "eval": 0.02}
POLL_S = 0.003
RESUMED = re.compile(r"resumed from (\S+) \(step (\d+)\)")


class ChaosError(RuntimeError):
    """An attempt did something other than run until it was killed (or, the last, complete)."""


@dataclass(frozen=True)
class Settings:
    """The one command that every attempt and the reference run: `menagerie train -c config`
    with these settings and async checkpointing."""

    steps: int = 30
    checkpoint_every: int = 5
    eval_every: int = 10
    eval_batches: int = 2
    # TensorBoard's writer imports torch (~3 s of every restart on CPU); events are no state.
    tensorboard: bool = False
    config: Path = TINY
    overrides: tuple[str, ...] = ()  # more `key.sub=value`, e.g. another optimizer

    def command(self, run_dir: Path) -> list[str]:
        return [
            *(sys.executable, "-m", "menagerie.train.cli", "train", "-c", str(self.config)),
            f"run_dir={run_dir}",
            f"train.steps={self.steps}",
            "log.every=1",
            f"checkpoint.every={self.checkpoint_every}",
            "checkpoint.async_save=true",
            f"train.eval_every={self.eval_every}",
            f"train.eval_batches={self.eval_batches}",
            "train.sample_tokens=0",
            f"log.tensorboard={str(self.tensorboard).lower()}",
            *self.overrides,
        ]


@dataclass
class Kill:
    """One SIGKILL: what it waited for, and what the run folder showed after it."""

    number: int
    moment: str  # "step", "save" or "eval"
    target: int  # the step whose train row / checkpoint save / eval the kill waited for
    delay_s: float
    landed: str = ""
    step_at_kill: int = 0  # newest train row the killed attempt wrote (its start if none)
    newest_checkpoint: int = 0  # newest committed checkpoint on disk after the kill
    resumed: int | None = None  # the step the next attempt resumed from (None: it did not say)
    attempt_s: float = 0.0  # from the killed attempt's start to the kill


@dataclass
class Chaos:
    """A finished chaos run and its uninterrupted reference."""

    settings: Settings
    chaos_dir: Path
    reference_dir: Path
    kills: list[Kill]
    logs: list[Path]
    wall_s: float
    problems: list[str] = field(default_factory=list)


# ---- the run folder, read while a run writes it ------------------------------------------


def _rows(run_dir: Path, offset: int = 0) -> list[dict]:
    """metrics.jsonl rows from byte `offset` on; a last line still being written is left out."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    with open(path, "rb") as f:
        f.seek(offset)
        text = f.read().decode()
    return [json.loads(line) for line in text.split("\n")[:-1] if line.strip()]


def _metrics_size(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return path.stat().st_size if path.exists() else 0


def _checkpoint_names(run_dir: Path) -> list[str]:
    folder = run_dir / "checkpoints"
    return os.listdir(folder) if folder.is_dir() else []


def _committed(run_dir: Path) -> list[int]:
    """Steps of committed checkpoints (Orbax renames `<step>.orbax-checkpoint-tmp` to `<step>`)."""
    return sorted(int(n) for n in _checkpoint_names(run_dir) if n.isdigit())


# ---- moments --------------------------------------------------------------------------------


def _deal(rng: random.Random, kills: int) -> list[str]:
    """The kind of every kill: each kind once in every round of three, in a random order."""
    kinds: list[str] = []
    while len(kinds) < kills:
        kinds += rng.sample(KINDS, len(KINDS))
    return kinds[:kills]


def _plan(
    rng: random.Random, number: int, kind: str, start: int, kills_left: int, s: Settings
) -> Kill:
    """Kill `number`'s target step and delay, for an attempt resuming at step `start`: a
    target of its kind in the next stretch (the steps left split evenly over the kills left)."""
    last = s.steps if kills_left == 1 else s.steps - 1  # the run's end only for the last kill
    hi = min(last, start + max(1, round((s.steps - start) / kills_left)))
    every = {"step": 1, "save": s.checkpoint_every, "eval": s.eval_every}[kind]
    ahead = [t for t in range(start + 1, last + 1) if every and t % every == 0]
    if not ahead:  # nothing of this kind left before the end: kill inside a step
        kind, ahead = "step", list(range(start + 1, s.steps))
    target = rng.choice([t for t in ahead if t <= hi] or ahead[:1])
    return Kill(number, kind, target, round(rng.uniform(0, MAX_DELAY_S[kind]), 4))


def _reached(kill: Kill, run_dir: Path, offset: int) -> bool:
    """The attempt has written the target step's train row; for a save, the target's checkpoint
    folder exists too (the temporary one while Orbax writes; the step's own if the poll missed
    that). A temporary folder left by the attempt before is gone by then: the checkpoint
    manager removes such folders when it starts."""
    steps = [r["step"] for r in _rows(run_dir, offset) if r["kind"] == "train"]
    if max(steps, default=0) < kill.target:
        return False
    names = _checkpoint_names(run_dir)
    return kill.moment != "save" or any(n.split(".")[0] == str(kill.target) for n in names)


def _observe(kill: Kill, run_dir: Path, offset: int, start: int, s: Settings) -> None:
    """Fills in what the killed attempt left: its newest step, checkpoint, unfinished work."""
    rows = _rows(run_dir, offset)
    kill.step_at_kill = max((r["step"] for r in rows if r["kind"] == "train"), default=start)
    kill.newest_checkpoint = max(_committed(run_dir), default=0)
    in_flight = sorted(n.split(".")[0] for n in _checkpoint_names(run_dir) if not n.isdigit())
    evals = {r["step"] for r in rows if r["kind"] == "eval"}
    last = kill.step_at_kill
    eval_due = last > start and (last == s.steps or (s.eval_every and last % s.eval_every == 0))
    landed = [f"save {','.join(in_flight)} in flight"] if in_flight else []
    if eval_due and last not in evals:
        landed.append(f"eval {last} unfinished")
    kill.landed = "; ".join(landed) or f"after step {last}"


# ---- attempts -------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _launch(s: Settings, run_dir: Path, log: Path) -> subprocess.Popen:
    """Starts the command in a fresh process; its stdout and stderr go to `log`."""
    with open(log, "w") as out:
        return subprocess.Popen(
            s.command(run_dir), stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT
        )


def _tail(log: Path, n: int = 3000) -> str:
    return log.read_text(errors="replace")[-n:]


def _kill_at(kill: Kill, proc: subprocess.Popen, run_dir: Path, offset: int, log, timeout):
    """Waits for the kill's moment, sleeps its delay and SIGKILLs the attempt (which writes
    metrics.jsonl from byte `offset` on)."""
    deadline = time.monotonic() + timeout
    while not _reached(kill, run_dir, offset):
        if proc.poll() is not None:
            raise ChaosError(
                f"attempt ended (exit {proc.returncode}) before kill #{kill.number} "
                f"({kill.moment} {kill.target}):\n{_tail(log)}"
            )
        if time.monotonic() > deadline:
            raise ChaosError(f"no {kill.moment} {kill.target} within {timeout:.0f} s")
        time.sleep(POLL_S)
    time.sleep(kill.delay_s)
    proc.send_signal(signal.SIGKILL)
    if proc.wait() != -signal.SIGKILL:
        raise ChaosError(f"attempt exited {proc.returncode} before SIGKILL:\n{_tail(log)}")


def _wait_ok(proc: subprocess.Popen, log: Path, timeout: float) -> None:
    if proc.wait(timeout=timeout) != 0:
        raise ChaosError(f"{log.name}: exit {proc.returncode}:\n{_tail(log)}")


def _resumed_from(log: Path) -> int | None:
    match = RESUMED.search(log.read_text(errors="replace").replace("\n", ""))
    return int(match.group(2)) if match else None


def run_chaos(
    workdir: Path, kills: int, seed: int, settings: Settings = Settings(), timeout: float = 600
) -> Chaos:
    """The reference run and, alongside, the chaos run: `kills` attempts SIGKILLed at moments
    drawn from `random.Random(seed)`, then one that completes. Checks are left to `check`."""
    t0, workdir, rng = time.perf_counter(), Path(workdir), random.Random(seed)
    chaos_dir, reference_dir = workdir / "chaos", workdir / "reference"
    reference = _launch(settings, reference_dir, workdir / "reference.log")
    kinds = _deal(rng, kills)
    done: list[Kill] = []
    logs: list[Path] = []
    proc = reference
    try:
        for number, kind in enumerate(kinds, 1):
            start = done[-1].newest_checkpoint if done else 0
            kill = _plan(rng, number, kind, start, kills - number + 1, settings)
            logs.append(workdir / f"attempt-{number - 1}.log")
            offset, started = _metrics_size(chaos_dir), time.perf_counter()
            proc = _launch(settings, chaos_dir, logs[-1])
            _kill_at(kill, proc, chaos_dir, offset, logs[-1], timeout)
            kill.attempt_s = round(time.perf_counter() - started, 1)
            _observe(kill, chaos_dir, offset, start, settings)
            done.append(kill)
        logs.append(workdir / f"attempt-{kills}.log")
        proc = _launch(settings, chaos_dir, logs[-1])
        _wait_ok(proc, logs[-1], timeout)
        _wait_ok(reference, workdir / "reference.log", timeout)
    finally:
        for p in (proc, reference):
            if p.poll() is None:
                p.kill()
                p.wait()
    for kill, log in zip(done, logs[1:], strict=True):
        kill.resumed = _resumed_from(log)
    return Chaos(settings, chaos_dir, reference_dir, done, logs, time.perf_counter() - t0)


# ---- checks ---------------------------------------------------------------------------------


def resume_problems(kills: list[Kill]) -> list[str]:
    """Each rerun resumed, at or after the newest checkpoint left by the kill before it and
    never before the previous resume."""
    problems, previous = [], 0
    for k in kills:
        if k.resumed is None and k.newest_checkpoint:
            problems.append(
                f"after kill #{k.number} the rerun did not resume (checkpoint "
                f"{k.newest_checkpoint} was on disk): restarted from scratch"
            )
        elif k.resumed is not None and k.resumed < max(k.newest_checkpoint, previous):
            problems.append(
                f"after kill #{k.number} the rerun resumed from step {k.resumed}, before "
                f"checkpoint {k.newest_checkpoint} (previous resume: {previous})"
            )
        previous = max(previous, k.resumed or 0)
    return problems


def _final_state(run_dir: Path) -> tuple[int, dict]:
    """(step, state as a flat {path: np.ndarray}) of the newest checkpoint."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    step = _committed(run_dir)[-1]
    state = ocp.StandardCheckpointer().restore(run_dir / "checkpoints" / str(step) / "state")
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    return step, {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat}


def state_problems(chaos_dir: Path, reference_dir: Path) -> list[str]:
    """Same newest step, same tree, every array bitwise equal (dtype and shape included)."""
    import numpy as np

    (step_a, a), (step_b, b) = _final_state(chaos_dir), _final_state(reference_dir)
    if step_a != step_b:
        return [f"newest checkpoint: step {step_a} after the kills, {step_b} without"]
    if sorted(a) != sorted(b):
        return [f"state trees differ: {sorted(set(a) ^ set(b))[:5]}"]
    differ = [k for k in a if a[k].dtype != b[k].dtype or not np.array_equal(a[k], b[k])]
    if not differ:
        return []
    params = [k for k in differ if k.startswith("['params']")]
    return [
        f"{len(differ)} of {len(a)} state arrays differ ({len(params)} of them parameters), "
        f"e.g. {(params or differ)[:3]}"
    ]


def metrics_problems(chaos_dir: Path, reference_dir: Path, steps: int) -> list[str]:
    """A train row for every step and the same eval steps; the last row of each step holds the
    same train loss, eval loss and bits per byte (floats, through the same JSON round trip)."""
    from menagerie.train.metrics import read_metrics

    problems = []
    for kind, keys in (("train", ("loss",)), ("eval", ("loss", "bits_per_byte"))):
        a, b = read_metrics(chaos_dir, kind), read_metrics(reference_dir, kind)
        if sorted(a) != sorted(b) or (kind == "train" and sorted(a) != list(range(1, steps + 1))):
            problems.append(
                f"{kind} rows at steps {sorted(a)} after the kills, {sorted(b)} without"
            )
        differ = [s for s in sorted(set(a) & set(b)) if any(a[s][k] != b[s][k] for k in keys)]
        if differ:
            problems.append(f"{kind} {'/'.join(keys)} differ at steps {differ[:10]}")
    return problems


def check(result: Chaos) -> list[str]:
    """Everything that differs from an uninterrupted run; empty when the chaos run passes."""
    result.problems = [
        *resume_problems(result.kills),
        *state_problems(result.chaos_dir, result.reference_dir),
        *metrics_problems(result.chaos_dir, result.reference_dir, result.settings.steps),
    ]
    return result.problems


# ---- the benchmark --------------------------------------------------------------------------


def table(result: Chaos) -> str:
    lines = [
        f"{'kill':>4}  {'moment':<6}  {'target':>6}  {'delay':>6}  {'at kill':>7}  "
        f"{'ckpt':>4}  {'resumed':>7}  {'alive':>6}  landed"
    ]
    for k in result.kills:
        lines.append(
            f"{k.number:>4}  {k.moment:<6}  {k.target:>6}  {k.delay_s * 1e3:>4.0f}ms  "
            f"{k.step_at_kill:>7}  {k.newest_checkpoint:>4}  {str(k.resumed):>7}  "
            f"{k.attempt_s:>5.1f}s  {k.landed}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--checkpoint-every", type=int, default=5)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="one more override"
    )
    parser.add_argument("--workdir", type=Path, help="keep the runs here (default: a temp dir)")
    args = parser.parse_args()
    settings = Settings(
        args.steps, args.checkpoint_every, args.eval_every, overrides=tuple(args.set)
    )
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(tmp) / "jax-cache"))
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        result = run_chaos(workdir, args.kills, args.seed, settings)
        problems = check(result)
    print(table(result))
    print(
        f"{len(result.kills)} kills, {len(result.logs)} attempts, {result.wall_s:.0f} s; "
        + ("bitwise equal to the uninterrupted run" if not problems else "; ".join(problems))
    )
    summary = {
        "bench": "chaos",
        "seed": args.seed,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
        "kills": [asdict(k) for k in result.kills],
        "attempts": len(result.logs),
        "wall_s": round(result.wall_s, 1),
        "ok": not problems,
        "problems": problems,
    }
    print(json.dumps(summary))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
