"""The fault-injection harness: run the real CLI in a fresh process against a workspace, then
check what a user sees (exit code, exactly one `error:` line, no traceback, at the level of the
process's stderr file descriptor) and that every file and folder that existed before is unchanged
and nothing new appeared outside the places the case allows.

    ws = Workspace(tmp_path)                 # a finished run, data files, notes
    result = ws.fails(["train", ...], "fragment of the one line")

Permission faults work as root: `as_user_without_dac()` runs the child without
CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH / CAP_FOWNER (setpriv), so file modes bind it.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

from ..cli_testing import ROOT, cli_env

NO_DAC = [
    "setpriv",
    "--inh-caps=-dac_override,-dac_read_search,-fowner",
    "--bounding-set=-dac_override,-dac_read_search,-fowner",
]


def snapshot(root: Path) -> dict[str, str]:
    """Every file (content hash), folder and symlink under root, new ones included."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link:" + str(p.readlink())
        elif p.is_file():
            out[rel] = hashlib.sha1(p.read_bytes()).hexdigest()
        elif p.is_dir():
            out[rel + "/"] = "dir"
    return out


def run_cli(args, *, cwd: Path = ROOT, env: dict | None = None, prefix=(), timeout=300):
    """`menagerie ARGS` in a fresh process (optionally behind a command prefix such as
    NO_DAC); stdout and stderr captured separately, as bytes decoded leniently."""
    proc = subprocess.run(
        [*prefix, sys.executable, "-m", "menagerie.train.cli", *map(str, args)],
        capture_output=True,
        timeout=timeout,
        env=env or cli_env(),
        cwd=cwd,
    )
    return subprocess.CompletedProcess(
        proc.args,
        proc.returncode,
        proc.stdout.decode("utf-8", "replace"),
        proc.stderr.decode("utf-8", "replace"),
    )


def assert_one_error_line(proc, fragment: str, code: int = 2) -> str:
    """Exit `code`, stderr is exactly one line `error: ...` containing `fragment`."""
    err = proc.stderr.strip()
    assert proc.returncode == code, (proc.returncode, proc.stdout[-2000:], err[-3000:])
    assert "Traceback" not in err and "Traceback" not in proc.stdout, err[-3000:]
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    assert fragment in lines[0], lines[0]
    return lines[0]


class Workspace:
    """A folder with things a user already has; `fails` runs a bad command against it."""

    def __init__(self, root: Path, finished_run: Path | None = None):
        self.root = Path(root)
        (self.root / "notes.txt").write_text("precious\n")
        if finished_run is not None:
            shutil.copytree(finished_run, self.root / "run")

    def fails(self, args, fragment: str, *, code: int = 2, allow_new=(), **kw):
        """Run, check the one line, and check that nothing that existed changed and nothing
        appeared except under `allow_new` (relative paths)."""
        before = snapshot(self.root)
        proc = run_cli(args, **kw)
        line = assert_one_error_line(proc, fragment, code)
        after = snapshot(self.root)
        changed = [k for k in before if after.get(k) != before[k]]
        assert not changed, f"changed or removed: {changed[:5]}"
        new = [k for k in after if k not in before and not k.startswith(tuple(allow_new))]
        assert not new, f"appeared: {new[:5]}"
        return line


# ---- train/ faults: one small finished run per session, training arguments, waiting on a run

import json  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402

from ..cli_testing import TINY, built_once  # noqa: E402

# A constant learning rate without warmup: the train step is then one program whatever
# train.steps is (a cosine decay, or a warmup cut to a shorter run, depends on it), so the
# session's compilation cache compiles it once for all the runs of these tests.
ONE_PROGRAM = ["optim.schedule=constant", "optim.warmup_steps=0"]
QUICK_TRAIN = [
    "-c",
    str(TINY),
    "train.steps=3",
    "train.eval_batches=0",
    "train.sample_tokens=0",
    "checkpoint.every=1",
    "log.every=1",
    *ONE_PROGRAM,
]


def train_args(run_dir, *extra: str) -> list[str]:
    """`train` of the tiny model into run_dir: 3 steps, a checkpoint and a log row at each, and
    ONE_PROGRAM's learning rate (any train.steps given in `extra` trains the same program)."""
    return ["train", *QUICK_TRAIN, f"run_dir={run_dir}", *extra]


def _train(folder: Path) -> None:
    done = run_cli(train_args(folder / "run"))
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A finished 3-step run (checkpoints 2 and 3), trained once per test session (every
    worker and module gets the same folder): copy it (for example with
    `Workspace(tmp_path, trained_run)`) before changing anything in it."""
    return built_once(tmp_path_factory, "trained-faults-run", _train) / "run"


def wait_for_step(run_dir: Path, step: int, proc, timeout: float = 300) -> None:
    """Until `<run_dir>/metrics.jsonl` has a train row at `step` or later (proc: a Popen that
    must still be running)."""
    metrics = Path(run_dir) / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early (exit {proc.returncode})")
        if metrics.exists() and _last_step(metrics.read_text()) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for step {step} in {metrics}")


def _last_step(text: str) -> int:
    """The highest step of the complete rows in a metrics.jsonl text (a row may be half written)."""
    steps = [0]
    for line in text.splitlines():
        try:
            steps.append(int(json.loads(line).get("step", 0)))
        except ValueError:
            pass
    return max(steps)
