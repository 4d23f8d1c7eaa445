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
