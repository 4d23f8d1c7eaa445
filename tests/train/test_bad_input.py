"""Bad configs, data paths and run directories: one clear line, exit 2, nothing touched.

Each case runs the real CLI entry point (`menagerie.train.cli.main`) in this process, as the
console script does, inside a workspace folder whose every file is hashed before and after.
Two cases also run as separate processes to show the user sees no traceback.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from menagerie.train.cli import main

from .conftest import TINY, cli, snapshot

QUICK = ["train.steps=2", "train.eval_batches=0", "train.sample_tokens=0", "checkpoint.every=0"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A small finished run, trained once for the module and copied into each workspace."""
    run = tmp_path_factory.mktemp("finished") / "run"
    code = main(
        ["train", "-c", str(TINY), f"run_dir={run}", *QUICK, "checkpoint.every=1", "train.steps=3"]
    )
    assert code == 0
    return run


@pytest.fixture
def ws(tmp_path, finished_run) -> Path:
    """A workspace with things a user already has: a finished run, data files, a notes file."""
    (tmp_path / "notes.txt").write_text("precious\n")
    (tmp_path / "docs.jsonl").write_text(json.dumps({"body": "hello world"}) + "\n")
    (tmp_path / "table.csv").write_text("a,b\n1,2\n")
    (tmp_path / "not_a_run").mkdir()
    (tmp_path / "not_a_run" / "data.bin").write_bytes(b"\x00" * 10)
    shutil.copytree(finished_run, tmp_path / "run")
    return tmp_path


def _cases(ws: Path) -> dict[str, tuple[list[str], str]]:
    run = str(ws / "run")
    t = ["train", "-c", str(TINY), *QUICK]
    return {
        "unknown key": (t + ["train.setps=1"], "did you mean"),
        "wrong type": (t + ["train.batch_size=big"], "train.batch_size"),
        "heads do not divide width": (t + ["model.d_model=65"], "n_heads"),
        "missing config file": (["train", "-c", str(ws / "nope.yaml")], "does not exist"),
        "missing data path": (t + [f"data.source={ws / 'nope.jsonl'}"], "does not exist"),
        "unsupported data file": (t + [f"data.source={ws / 'table.csv'}"], ".csv"),
        "jsonl without the text field": (t + [f"data.source={ws / 'docs.jsonl'}"], "text"),
        "missing tokenizer file": (t + [f"data.tokenizer={ws / 'tok.json'}"], "tok.json"),
        "vocab smaller than tokenizer": (
            t + ["model.vocab_size=100", f"run_dir={ws / 'v'}"],
            "vocab_size",
        ),
        "run_dir is a file": (t + [f"run_dir={ws / 'notes.txt'}"], "is a file"),
        "run_dir of another model": (
            t + [f"run_dir={run}", "model.d_model=128"],
            "different model",
        ),
        "run_dir that is not a run": (t + [f"run_dir={ws / 'not_a_run'}"], "not a menagerie run"),
        "mesh larger than the machine": (t + ["mesh.data=2", f"run_dir={ws / 'm'}"], "devices"),
        "eval of a folder with no run": (["eval", f"run_dir={ws / 'not_a_run'}"], "holds no run"),
        "prepare into a non-empty folder": (
            ["prepare", "--out", str(ws / "not_a_run")],
            "not empty",
        ),
    }


CASE_NAMES = list(_cases(Path("/x")))


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_gives_one_line_and_touches_nothing(ws, capsys, name):
    argv, fragment = _cases(ws)[name]
    before = snapshot(ws)
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err, err
    assert "Traceback" not in err
    assert fragment in err, err
    after = snapshot(ws)
    assert {k: v for k, v in after.items() if k in before} == before, "existing files changed"


def test_unreadable_checkpoints_are_refused_not_overwritten(ws, capsys):
    ckpts = ws / "run" / "checkpoints"
    for f in ckpts.rglob("*"):
        if f.is_file() and f.stat().st_size > 100 and "state" in f.parts:
            f.write_bytes(b"garbage")
    before = snapshot(ws)
    code = main(["train", "-c", str(TINY), f"run_dir={ws / 'run'}", *QUICK, "train.steps=5"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "no readable checkpoint" in err, err
    assert snapshot(ws) == before


def test_cli_prints_no_traceback_in_a_real_process(tmp_path):
    proc = cli("train", "train.stesp=3")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown config key 'train.stesp'; did you mean 'steps'?"
    proc = cli("train", f"data.source={tmp_path / 'missing'}", f"run_dir={tmp_path / 'r'}")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "r").exists()
