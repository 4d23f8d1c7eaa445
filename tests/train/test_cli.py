"""The CLI's happy paths: prepare a JSONL corpus with BPE, train on it, evaluate the run."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

from menagerie.train.cli import main

from .conftest import TINY


def test_prepare_train_eval_on_jsonl_with_bpe(tmp_path, capsys):
    # A small real corpus: the text of a few stdlib modules, one JSONL document per paragraph.
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for name in ("textwrap.py", "shlex.py", "fnmatch.py", "glob.py", "colorsys.py"):
        docs += [p for p in (stdlib / name).read_text().split("\n\n") if p.strip()]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))

    data = [
        "data.source=" + str(corpus),
        "data.tokenizer=bpe",
        "data.bpe_vocab_size=300",
        "data.val_fraction=0.2",
    ]
    assert main(["prepare", "--out", str(tmp_path / "prepared"), *data]) == 0
    meta = json.loads((tmp_path / "prepared" / "meta.json").read_text())
    assert meta["vocab_size"] == 300 and (tmp_path / "prepared" / "tokenizer.json").is_file()

    run = tmp_path / "run"
    common = [
        f"run_dir={run}",
        f"data.source={tmp_path / 'prepared'}",
        "data.tokenizer=bpe",
        "data.bpe_vocab_size=300",
    ]
    assert (
        main(
            [
                "train",
                "-c",
                str(TINY),
                *common,
                "train.steps=6",
                "train.sample_tokens=8",
                "train.eval_every=0",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "final eval: loss" in out and "sample:" in out

    assert main(["eval", f"run_dir={run}"]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith("step 6: eval loss ")
