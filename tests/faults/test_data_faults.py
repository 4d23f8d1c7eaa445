"""Bad data sources, broken prepared folders and OS faults while preparing, through the real CLI.

A failure is one `error:` line that names the file and the fix, with nothing that existed changed
and nothing left behind; what reading a source skipped or replaced is one `note:` line on stdout.
Most cases fail before any training (`prepare`, or `train` while it prepares its data), and
independent runs start together so that their start-ups overlap.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from menagerie.data import DataConfig, auto_prepare, prepare, validate_prepared

from ..cli_testing import ROOT, TINY, cli_env
from .faults_testing import NO_DAC, Workspace, run_cli

QUICK = ["train.steps=2", "train.eval_batches=0", "train.sample_tokens=0", "checkpoint.every=0"]


def write_corpus(folder: Path, n: int = 30, size: int = 420) -> Path:
    """n documents of about `size` bytes."""
    folder.mkdir(parents=True)
    for i in range(n):
        text = f"document {i}: " + "words and more words " * (size // 21)
        (folder / f"doc{i:02d}.txt").write_text(text)
    return folder


def workspace(root: Path) -> Workspace:
    """A notes file (from Workspace) and a folder of 30 documents."""
    root.mkdir(parents=True, exist_ok=True)
    w = Workspace(root)
    write_corpus(root / "corpus")
    return w


def together(**checks) -> None:
    """Runs independent checks at once (each in its own folder); fails naming every check that
    failed."""
    with ThreadPoolExecutor(4) as pool:
        futures = {name: pool.submit(check) for name, check in checks.items()}
    failed = {name: f.exception() for name, f in futures.items() if f.exception()}
    assert not failed, "\n".join(f"{name}: {e!r}"[:3000] for name, e in failed.items())


def prepares(out: Path, *overrides) -> dict:
    """`menagerie prepare --out OUT ...` succeeds; returns its stdout's note lines and meta."""
    done = run_cli(["prepare", "--out", out, *overrides])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    notes = [line for line in done.stdout.splitlines() if line.startswith("note:")]
    return {"notes": notes, **validate_prepared(out)}


def num_docs(meta: dict) -> int:
    return sum(s["num_docs"] for s in meta["splits"].values())


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- a single .txt file --------------------------------------------------------------------------


def test_single_txt_file_is_cut_into_documents(tmp_path: Path) -> None:
    ws = workspace(tmp_path / "ws")
    lines = [f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(500)]
    (tmp_path / "book.txt").write_text("\n".join(lines) + "\n")
    (ws.root / "line.txt").write_text("one line and no line end")

    def book() -> None:
        meta = prepares(tmp_path / "book", f"data.source={tmp_path / 'book.txt'}")
        assert 90 <= num_docs(meta) <= 110 and meta["splits"]["validation"]["num_docs"] > 0
        assert sum(s["num_bytes"] for s in meta["splits"].values()) == len("\n".join(lines)) + 1

    def one_line() -> None:
        argv = ["prepare", "--out", ws.root / "line", f"data.source={ws.root / 'line.txt'}"]
        ws.fails(argv, "holds 1 document, and a train and a validation split need one each")

    together(book=book, one_line=one_line)


# -- rows whose text is not a string, binary and non-UTF-8 files ----------------------------------


def test_skipped_rows_and_files_are_counted_in_one_note(tmp_path: Path) -> None:
    ws = workspace(tmp_path / "ws")
    src = write_corpus(tmp_path / "mixed", n=10)
    good = [f"row {i} " * 10 for i in range(10)]
    bad = [None, 12345, {"nested": "object"}, ["a", "list"], True] * 2
    rows = [{"text": t} for pair in zip(good, bad, strict=True) for t in pair]
    (src / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.table({"text": ["parquet row " * 5] * 4 + [None]}), src / "b.parquet")
    (src / "latin1.txt").write_bytes("café crème, déjà vu".encode("latin-1"))
    (src / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 10)
    (src / "c.jsonl").write_bytes(b'{"text": "caf\xe9"}\n{"text": "lone \\ud800 surrogate"}\n')
    (ws.root / "nulls.jsonl").write_text('{"text": null}\n{"text": 7}\n{"text": {"a": 1}}\n')

    def mixed() -> None:
        meta = prepares(tmp_path / "out", f"data.source={src}", "data.val_fraction=0.3")
        assert meta["notes"] == [
            f"note: data.source='{src}': skipped 11 of 27 rows whose 'text' is not a string "
            "(null, number or object; first in a.jsonl); skipped 1 binary file(s) (NUL bytes; "
            "first image.txt); replaced undecodable bytes by U+FFFD in 2 file(s) that are not "
            "UTF-8 (first c.jsonl)"
        ]
        assert num_docs(meta) == 10 + 10 + 4 + 1 + 2  # .txt, JSONL, Parquet, latin-1, c.jsonl
        texts = b"".join((src / f"doc{i:02d}.txt").read_bytes() for i in range(10))
        latin1 = "café crème, déjà vu".encode("latin-1").decode("utf-8", errors="replace")
        expected = len(texts) + len("".join(good)) + 4 * 60 + len(latin1.encode())
        expected += len("caf\ufffd".encode()) + len("lone \ufffd surrogate".encode())
        assert sum(s["num_bytes"] for s in meta["splits"].values()) == expected

    def all_skipped() -> None:
        argv = ["prepare", "--out", ws.root / "out", f"data.source={ws.root / 'nulls.jsonl'}"]
        ws.fails(argv, "all 3 rows have a 'text' that is not a string")

    together(mixed=mixed, all_skipped=all_skipped)


# -- a failed or interrupted prepare -------------------------------------------------------------


def test_failed_prepare_leaves_nothing_and_its_advice_works(tmp_path: Path) -> None:
    ws = workspace(tmp_path)
    src = write_corpus(ws.root / "few", n=4)
    out = ws.root / "new" / "out"
    argv = ["prepare", "--out", out, f"data.source={src}"]
    line = ws.fails([*argv, "data.val_fraction=0.0"], "validation split is empty: 4 documents")
    fraction = line.split("raise data.val_fraction to at least ")[1].split(",")[0]

    stale = ws.root / "new" / f"out.tmp-{socket.gethostname()}-{dead_pid()}"
    (stale / "train").mkdir(parents=True)
    (stale / "train" / "shard-00000.array_record").write_bytes(b"\0" * 4096)
    meta = prepares(out, f"data.source={src}", f"data.val_fraction={fraction}")
    assert meta["splits"]["validation"]["num_docs"] > 0 and meta["splits"]["train"]["num_docs"]
    assert [p.name for p in out.parent.iterdir()] == ["out"]  # the stale temporary is gone

    ws.fails(argv, "is not empty; pass a new or empty folder as --out, or --force")


def _start_train(args: list, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "menagerie.train.cli", "train", "-c", TINY, *QUICK, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=cli_env(),
        cwd=cwd,
    )


def test_interrupted_automatic_prepare_is_cleaned_up_and_corrupt_cache_rebuilt(tmp_path) -> None:
    cache = tmp_path / "cache"
    cfg = DataConfig(source=str(write_corpus(tmp_path / "corpus")), cache_dir=str(cache))
    entry = auto_prepare(cfg)
    with open(entry / "train" / "shard-00000.array_record", "r+b") as f:
        f.truncate(1000)

    # Killed while it prepares the standard library into the cache: its temporary stays.
    killed = _start_train([f"data.cache_dir={cache}", f"run_dir={tmp_path / 'r1'}"], ROOT)
    deadline = time.monotonic() + 120
    while not list((cache / "prepared").glob("stdlib-*.tmp-*")):
        if killed.poll() is not None or time.monotonic() > deadline:
            killed.kill()
            pytest.fail("no temporary folder seen: " + killed.communicate()[0][-3000:])
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert list((cache / "prepared").glob("stdlib-*.tmp-*"))

    # The next run removes it and rebuilds its own corrupt cached copy; stopped once prepared.
    args = [f"data.source={cfg.source}", f"data.cache_dir={cache}", "run_dir=r2"]
    run = _start_train(args, tmp_path)
    out = []
    for line in run.stdout:
        out.append(line)
        if line.startswith("prepared "):
            break
    run.kill()
    out.append(run.communicate()[0])
    text = "".join(out)
    shard = entry / "train" / "shard-00000.array_record"
    assert f"note: '{shard}' has 1000 bytes but meta.json recorded" in text, text
    assert "rebuilding this cached copy" in text
    assert f"into '{entry}'" in text and "Traceback" not in text
    assert validate_prepared(entry)
    assert not list((cache / "prepared").glob("*.tmp-*"))


# -- OS and file faults: one line naming the file and the fix ------------------------------------


def _truncate_shard(prep: Path) -> None:
    with open(prep / "train" / "shard-00000.array_record", "r+b") as f:
        f.truncate(5000)


def _edit_meta(prep: Path) -> None:
    meta = json.loads((prep / "meta.json").read_text())
    meta["dtype"] = "<u4"
    (prep / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def _read_only(folder: Path) -> None:
    folder.mkdir()
    folder.chmod(0o555)


def _corrupt_parquet(f: Path) -> None:
    pq.write_table(pa.table({"text": ["a parquet row"] * 100}), f)
    raw = bytearray(f.read_bytes())
    raw[4:40] = os.urandom(36)
    f.write_bytes(bytes(raw[: len(raw) // 2]) + b"PAR1")


def _faults(root: Path) -> dict:
    """name -> (set-up, argv, fragment of the one line, command prefix, environment)."""
    t = ["train", "-c", TINY, *QUICK]
    corpus = f"data.source={root / 'corpus'}"
    notes = root / "notes.txt"
    shard = root / "prep" / "train" / "shard-00000.array_record"
    return {
        "cache is a file (MENAGERIE_CACHE)": (
            None,
            [*t, corpus],
            f"cannot write prepared data to '{notes}': it is a file, not a folder; set "
            f"MENAGERIE_CACHE (now '{notes}') to a writable folder",
            (),
            {**cli_env(), "MENAGERIE_CACHE": str(notes)},
        ),
        "cache is under a file (data.cache_dir)": (
            None,
            [*t, corpus, f"data.cache_dir={notes}/cache"],
            f"it is a file, not a folder ('{notes}'); set data.cache_dir",
            (),
            None,
        ),
        "cache in a read-only folder": (
            lambda: _read_only(root / "ro"),
            [*t, corpus, f"data.cache_dir={root / 'ro'}"],
            f"cannot write prepared data to '{root / 'ro'}': Permission denied "
            f"('{root / 'ro' / 'prepared'}'); set data.cache_dir (now '{root / 'ro'}') to a "
            "writable folder",
            NO_DAC,
            None,
        ),
        "prepare --out under a file": (
            None,
            ["prepare", "--out", notes / "out", corpus],
            f"it is a file, not a folder ('{notes}'); pass a writable folder as --out",
            (),
            None,
        ),
        "prepare --out in a read-only folder": (
            lambda: _read_only(root / "ro"),
            ["prepare", "--out", root / "ro" / "out", corpus],
            f"cannot write prepared data to '{root / 'ro' / 'out'}': Permission denied",
            NO_DAC,
            None,
        ),
        "a write fails midway (file size limit)": (
            lambda: write_corpus(root / "big", n=40, size=10_000),
            ["prepare", "--out", root / "out", f"data.source={root / 'big'}"],
            f"cannot write prepared data to '{root / 'out'}': File too large ('{root}/out.tmp-",
            ["prlimit", "--fsize=200000"],  # the limit is per file; Python ignores SIGXFSZ
            None,
        ),
        "unreadable source file": (
            lambda: (root / "corpus" / "doc03.txt").chmod(0),
            ["prepare", "--out", root / "out", corpus],
            f"cannot read '{root / 'corpus' / 'doc03.txt'}' (Permission denied)",
            NO_DAC,
            None,
        ),
        "corrupt Parquet file": (
            lambda: _corrupt_parquet(root / "bad.parquet"),
            ["prepare", "--out", root / "out", f"data.source={root / 'bad.parquet'}"],
            f"'{root / 'bad.parquet'}' is not a readable Parquet file",
            (),
            None,
        ),
        "truncated shard in a prepared folder": (
            lambda: _truncate_shard(root / "prep"),
            [*t, f"data.source={root / 'prep'}"],
            f"'{shard}' has 5000 bytes but meta.json recorded",
            (),
            None,
        ),
        "edited meta.json in a prepared folder": (
            lambda: _edit_meta(root / "prep"),
            [*t, f"data.source={root / 'prep'}"],
            f"'{root / 'prep' / 'meta.json'}' was edited after prepare",
            (),
            None,
        ),
    }


def test_os_and_file_faults_give_one_line(tmp_path: Path) -> None:
    """Each fault in its own workspace (which holds a prepared folder `prep`), run in a train or
    prepare command from that workspace, so a default run folder would land inside it."""
    checks = {}
    for i, (name, (setup, argv, fragment, prefix, env)) in enumerate(_faults(Path("/x")).items()):
        ws = workspace(tmp_path / str(i))
        prepare(DataConfig(source=str(ws.root / "corpus"), val_fraction=0.2), ws.root / "prep")
        setup, argv, fragment, prefix, env = _faults(ws.root)[name]
        if setup is not None:
            setup()
        checks[name] = lambda ws=ws, a=(argv, fragment, prefix, env): ws.fails(
            a[0], a[1], cwd=ws.root, prefix=a[2], env=a[3]
        )
    together(**checks)
