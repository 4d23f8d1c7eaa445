"""Bad configs, command lines and run folders through the real CLI: exit 2, one `error:` line on
the process's stderr, no traceback, and nothing that existed changed, nothing new written (the
default run folder `runs/default` lands inside the workspace, so it is watched too)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ..cli_testing import TINY
from .faults_testing import ONE_PROGRAM, Workspace, run_cli, trained_run  # noqa: F401

QUICK = [
    "train.steps=2",
    "train.eval_batches=0",
    "train.sample_tokens=0",
    "checkpoint.every=0",
    *ONE_PROGRAM,  # the finished run trains the program of faults_testing's runs
]


@pytest.fixture
def ws(tmp_path, trained_run) -> Workspace:  # noqa: F811
    """A workspace with things a user already has: a finished run, data files, a notes file."""
    w = Workspace(tmp_path, trained_run)
    (tmp_path / "docs.jsonl").write_text(json.dumps({"body": "hello world"}) + "\n")
    (tmp_path / "table.csv").write_text("a,b\n1,2\n")
    (tmp_path / "not_a_run").mkdir()
    (tmp_path / "not_a_run" / "data.bin").write_bytes(b"\x00" * 10)
    (tmp_path / "latin1.yaml").write_bytes(b"train:\n  sample_prompt: caf\xe9\n")
    return w


def _cases(root: Path) -> dict[str, tuple[list[str], str]]:
    run = str(root / "run")
    t = ["train", "-c", str(TINY), *QUICK]
    galore = t + ["optim.name=galore"]
    return {
        # the 15 cases of the first bad-input suite
        "unknown key": (t + ["train.setps=1"], "did you mean"),
        "wrong type": (t + ["train.batch_size=big"], "train.batch_size"),
        "heads do not divide width": (t + ["model.d_model=65"], "n_heads"),
        "missing config file": (["train", "-c", str(root / "nope.yaml")], "does not exist"),
        "missing data path": (t + [f"data.source={root / 'nope.jsonl'}"], "does not exist"),
        "unsupported data file": (t + [f"data.source={root / 'table.csv'}"], ".csv"),
        "jsonl without the text field": (t + [f"data.source={root / 'docs.jsonl'}"], "text"),
        "missing tokenizer file": (t + [f"data.tokenizer={root / 'tok.json'}"], "tok.json"),
        "vocab smaller than tokenizer": (t + ["model.vocab_size=100"], "vocab_size"),
        "run_dir is a file": (t + [f"run_dir={root / 'notes.txt'}"], "is a file"),
        "run_dir of another model": (t + [f"run_dir={run}", "model.d_model=128"], "different"),
        "run_dir that is not a run": (t + [f"run_dir={root / 'not_a_run'}"], "not a menagerie"),
        "mesh larger than the machine": (t + ["mesh.data=2"], "devices"),
        "eval of a folder with no run": (["eval", f"run_dir={root / 'not_a_run'}"], "holds no run"),
        "prepare into a non-empty folder": (
            ["prepare", "--out", str(root / "not_a_run")],
            "not empty",
        ),
        # config parsing
        "yes for an integer": (t + ["train.steps=yes"], "train.steps: Input should be a valid"),
        "nan learning rate": (t + ["optim.lr=.nan"], "optim.lr"),
        "infinite init std": (t + ["model.init_std=.inf"], "model.init_std"),
        "negative weight decay": (t + ["optim.weight_decay=-0.1"], "optim.weight_decay"),
        "negative temperature": (t + ["train.sample_temperature=-1"], "sample_temperature"),
        "config path is a folder": (["train", "-c", str(root / "not_a_run")], "is a folder"),
        "config file not UTF-8": (["train", "-c", str(root / "latin1.yaml")], "not UTF-8"),
        "old flat model key": (t + ["model.n_heads=4"], "model.n_heads -> model.mixer.n_heads"),
        "unknown part kind": (t + ["model.ffn.kind=swiglo"], "did you mean 'swiglu'"),
        "option of another optimizer": (t + ["optim.rank=4"], "unknown config key 'optim.rank'"),
        "invalid regex": (galore + ["optim.lowrank_params=['q[']"], "not a regular expression"),
        "selection matching nothing": (galore + ["optim.lowrank_params=[nope]"], "matches no"),
        "missing import": (t + ["imports=[no_such_module]"], "cannot import 'no_such_module'"),
    }


CASE_NAMES = list(_cases(Path("/x")))


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_gives_one_line_and_touches_nothing(ws, name):
    argv, fragment = _cases(ws.root)[name]
    ws.fails(argv, fragment, cwd=ws.root)


def test_unreadable_checkpoints_are_refused_not_overwritten(ws):
    for f in (ws.root / "run" / "checkpoints").rglob("*"):
        if f.is_file() and f.stat().st_size > 100 and "state" in f.parts:
            f.write_bytes(b"garbage")
    args = ["train", "-c", TINY, f"run_dir={ws.root / 'run'}", *QUICK, "train.steps=5"]
    ws.fails(args, "no readable checkpoint", cwd=ws.root)
