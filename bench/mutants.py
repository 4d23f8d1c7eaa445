"""Plausible bugs, each applied to a scratch copy of the repository: does its test catch it?

    python bench/mutants.py [NAME ...] [--no-baseline] [--timeout 1200] [--keep]

Every file in bench/mutants/ is one mutant (TOML): `name`, `claim` (the README claim it
attacks), `bug` (the mistake, in words), `file`, `old` (exact text, found exactly once), `new`,
and `tests` (pytest node ids that must fail). For each mutant the working tree (`git ls-files`
plus untracked files that are not ignored; not .venv) is copied to a scratch folder, the one
edit applied there, and only the named tests run against that copy, one pytest process on one
worker. The checkout is never written to, so it is safe while others edit it.

The venv's editable install maps `menagerie.*` to this checkout. In the copy, `_pkg/menagerie`
(a real `__init__.py` and symlinks `arch -> ../../arch`, ...) comes first on PYTHONPATH, so the
tests and the `menagerie` processes they start import the copy (checked before each run).

First the union of all named tests runs once on an unmutated copy (the baseline: a mutant
counts only if its tests pass without it). Caught: the tests fail (or time out); missed: they
pass; stale: `old` is no longer in the file (update the mutant); error: pytest could not run
the named tests. Prints a table and one JSON
line. Outside the CI time budget: it runs the slow multi-device tests once per mutant.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MUTANTS = ROOT / "bench" / "mutants"
# pyproject.toml's package-dir: the packages the editable install maps to this checkout.
PACKAGES = ("arch", "train", "data", "kernels", "export")


@dataclass(frozen=True)
class Mutant:
    name: str
    claim: str
    bug: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]

    @classmethod
    def load(cls, path: Path) -> Mutant:
        d = tomllib.loads(path.read_text())
        return cls(
            name=d.get("name", path.stem),
            claim=d["claim"],
            bug=d["bug"],
            file=d["file"],
            old=d["old"],
            new=d["new"],
            tests=tuple(d["tests"]),
        )


def load_all(names: list[str]) -> list[Mutant]:
    mutants = [Mutant.load(p) for p in sorted(MUTANTS.glob("*.toml"))]
    unknown = set(names) - {m.name for m in mutants}
    if unknown:
        sys.exit(f"no mutant named {sorted(unknown)} in {MUTANTS}")
    return [m for m in mutants if not names or m.name in names]


def scratch_copy(dest: Path) -> Path:
    """The working tree's tracked and untracked-not-ignored files under `dest`, importable as
    `menagerie` through `dest/_pkg` (see the module docstring)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        src = ROOT / rel
        if src.is_file() and not src.is_symlink():  # a tracked file deleted in the tree: gone
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    pkg = dest / "_pkg" / "menagerie"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    for name in PACKAGES:
        if (dest / name).is_dir():
            (pkg / name).symlink_to(Path("..") / ".." / name)
    return dest


def scratch_env(repo: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(repo / "_pkg"), *filter(None, [env.get("PYTHONPATH")])]
    )
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("XLA_FLAGS", None)
    return env


# Run in the copy: the tests' own helper starts a child the way the CLI tests start `menagerie`;
# both must import the copy's packages.
_PROBE = """
import subprocess, sys
import menagerie.arch
from tests.cli_testing import cli_env
child = "import menagerie.train.cli as c, menagerie.arch as a; print(c.__file__); print(a.__file__)"
print(menagerie.arch.__file__)
sys.stdout.flush()
subprocess.run([sys.executable, "-c", child], env=cli_env(), check=True)
"""


def check_imports(repo: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE],
        cwd=repo,
        env=scratch_env(repo),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    files = [Path(f).resolve() for f in out]
    if len(files) != 3 or not all(f.is_relative_to(repo.resolve()) for f in files):
        sys.exit(f"the scratch copy {repo} does not import its own menagerie: {out}")


def run_tests(repo: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, float, str]:
    """(verdict, seconds, output tail): 'passed', 'failed', 'timeout' or 'error' (pytest could
    not run them: a node id that does not exist, a usage error)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "-p", "no:cacheprovider"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [*cmd, *tests],
            cwd=repo,
            env=scratch_env(repo),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        out = e.stdout or ""
        out = out.decode(errors="replace") if isinstance(out, bytes) else out
        return "timeout", time.perf_counter() - t0, out[-2000:]
    seconds = time.perf_counter() - t0
    tail = (proc.stdout + proc.stderr)[-2000:]
    if proc.returncode == 0:
        return "passed", seconds, tail
    if proc.returncode in (1, 2):  # test failures; errors during collection (the edit broke it)
        return "failed", seconds, tail
    return "error", seconds, tail


def apply(repo: Path, m: Mutant) -> bool:
    """The edit in the copy; False (stale) unless `old` occurs exactly once."""
    path = repo / m.file
    text = path.read_text() if path.is_file() else ""
    if text.count(m.old) != 1:
        return False
    path.write_text(text.replace(m.old, m.new))
    return True


def first_error(tail: str) -> str:
    """The first failing assertion or error of a pytest output, shortened to one line."""
    lines = [" ".join(s.split()[1:]) for s in tail.splitlines() if s.startswith("E ")]
    if lines:
        return " ".join(s for s in lines[:3] if s)[:150]
    return next((s for s in tail.splitlines() if s.startswith(("FAILED", "ERROR"))), "")[:150]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help="mutants to run (file stems); default all")
    p.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per pytest run")
    p.add_argument("--keep", action="store_true", help="keep the scratch folders")
    args = p.parse_args()
    mutants = load_all(args.names)
    work = Path(tempfile.mkdtemp(prefix="menagerie-mutants-"))
    rows = []
    baseline = "skipped"
    try:
        if not args.no_baseline:
            repo = scratch_copy(work / "baseline")
            check_imports(repo)
            tests = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
            verdict, seconds, tail = run_tests(repo, tests, args.timeout * 2)
            baseline = verdict
            print(f"baseline (no mutation): {len(tests)} test ids {verdict} in {seconds:.0f} s")
            if verdict != "passed":
                print(tail, file=sys.stderr)
        for i, m in enumerate(mutants):
            repo = scratch_copy(work / f"{i:02d}-{m.name}")
            if not apply(repo, m):
                rows.append((m, "stale", 0.0, f"old text not found once in {m.file}"))
            else:
                check_imports(repo)
                verdict, seconds, tail = run_tests(repo, m.tests, args.timeout)
                result = {"failed": "caught", "timeout": "caught", "passed": "MISSED"}.get(
                    verdict, "error"
                )
                why = "timeout" if verdict == "timeout" else first_error(tail)
                rows.append((m, result, seconds, why))
            _, result, seconds, why = rows[-1]
            print(f"  {m.name}: {result} ({seconds:.0f} s) {why}", flush=True)
            if not args.keep:
                shutil.rmtree(repo, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"{'mutant':38} {'claim':22} {'result':7} {'s':>5}  tests")
    for m, result, seconds, _ in rows:
        tests = ", ".join(t.removeprefix("tests/") for t in m.tests)
        print(f"{m.name:38} {m.claim:22} {result:7} {seconds:5.0f}  {tests}")
    caught = [m.name for m, r, *_ in rows if r == "caught"]
    print(
        json.dumps(
            {
                "bench": "mutants",
                "baseline": baseline,
                "caught": len(caught),
                "total": len(rows),
                "score": round(len(caught) / max(len(rows), 1), 3),
                "missed": [m.name for m, r, *_ in rows if r == "MISSED"],
                "stale": [m.name for m, r, *_ in rows if r == "stale"],
                "errors": [m.name for m, r, *_ in rows if r == "error"],
                "seconds": round(sum(s for _, _, s, _ in rows)),
            }
        )
    )
    return 0 if len(caught) == len(rows) and baseline in ("passed", "skipped") else 1


if __name__ == "__main__":
    sys.exit(main())
