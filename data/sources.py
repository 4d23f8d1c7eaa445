"""Documents as (doc_id, text), in a deterministic order, with the train/validation split.

A document's split is a pure function of sha1(doc_id), so adding documents never moves others.
doc_ids are relative to the source (a path inside a folder, "file:line" for JSONL, "file:row" for
Parquet), so moving a corpus does not change its split either.

This is the one place that reads sources, and it reads them by these rules:
- a .txt file inside a folder is one document. A .txt file given alone as the source is a corpus,
  not one document (which could never fill both splits): it is cut after a line end into
  documents of about 1/100 of its characters (at most 1 Mi characters each), with doc_ids
  "file:first_line";
- a JSONL row or Parquet row whose text field is not a string (null, a number, an object) is
  skipped, never turned into text such as "None";
- a text file holding a NUL byte is binary and is skipped; bytes that are not UTF-8 become U+FFFD;
- a file that cannot be read is a `DataError` naming it.
What was skipped or replaced is counted in a `SourceReport`; `prepare` prints it in one line.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .config import DataConfig
from .errors import DataError

Split = Literal["train", "validation"]
SPLITS: tuple[Split, ...] = ("train", "validation")
EXTENSIONS = (".txt", ".jsonl", ".parquet")
_HINT = (
    "pass a .txt/.jsonl/.parquet file or folder, a prepared folder (menagerie prepare), or 'stdlib'"
)
_PIECES = 100  # documents a single .txt source is cut into (fewer when it has fewer lines)
_PIECE_MAX = 1 << 20  # characters; a window reads a whole document, so documents stay small
_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON can escape them; UTF-8 cannot encode them


@dataclass
class SourceReport:
    """What reading a source skipped or changed, per file.

    Entries are set, not added, each time a file is read, so a source read once per split (and
    once more to train a BPE) is still counted once.
    """

    rows: dict[str, int] = field(default_factory=dict)  # JSONL/Parquet file -> rows read
    non_string: dict[str, int] = field(default_factory=dict)  # file -> rows skipped, not a str
    binary: set[str] = field(default_factory=set)  # files skipped: they hold a NUL byte
    not_utf8: set[str] = field(default_factory=set)  # files whose bad bytes became U+FFFD

    def line(self, text_field: str) -> str | None:
        """One line that says what was skipped or replaced; None when nothing was."""
        parts = []
        if skipped := sum(self.non_string.values()):
            first = min(f for f, n in self.non_string.items() if n)
            parts.append(
                f"skipped {skipped} of {sum(self.rows.values())} rows whose '{text_field}' is "
                f"not a string (null, number or object; first in {first})"
            )
        if self.binary:
            parts.append(
                f"skipped {len(self.binary)} binary file(s) (NUL bytes; first {min(self.binary)})"
            )
        if self.not_utf8:
            parts.append(
                f"replaced undecodable bytes by U+FFFD in {len(self.not_utf8)} file(s) that are "
                f"not UTF-8 (first {min(self.not_utf8)})"
            )
        return "; ".join(parts) or None


def split_share(doc_id: str) -> float:
    """Where sha1(doc_id) falls in [0, 1): the document is held out when below val_fraction."""
    return int.from_bytes(hashlib.sha1(doc_id.encode("utf-8")).digest()[:8], "little") / 2.0**64


def split_of(doc_id: str, val_fraction: float) -> Split:
    """'validation' for a `val_fraction` share of doc_ids, chosen by sha1."""
    return "validation" if split_share(doc_id) < val_fraction else "train"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def source_identity(cfg: DataConfig) -> str:
    """A string that changes whenever the documents `cfg.source` yields may change."""
    if cfg.source == "stdlib":
        v = sys.version_info
        return f"stdlib:python-{v.major}.{v.minor}.{v.micro}:{stdlib_root()}"
    files = _files(Path(cfg.source).expanduser())
    root = Path(cfg.source).expanduser().resolve()
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    digest = hashlib.sha1(json.dumps(stats).encode()).hexdigest()
    return f"path:{root}:{cfg.text_field}:{digest}"


def _files(path: Path) -> list[Path]:
    """The data files of a file or folder source, sorted by relative path."""
    if not path.exists():
        raise DataError(f"data.source='{path}' does not exist; {_HINT}")
    if (path / "meta.json").exists() if path.is_dir() else False:
        raise DataError(
            f"data.source='{path}' is a prepared folder (it holds meta.json), not raw documents; "
            "train on it directly, or pass the raw documents to prepare"
        )
    if path.is_file():
        if path.suffix not in EXTENSIONS:
            raise DataError(f"data.source='{path}' has unknown extension '{path.suffix}'; {_HINT}")
        return [path]
    files = sorted(
        (f for f in path.rglob("*") if f.is_file() and f.suffix in EXTENSIONS),
        key=lambda f: f.relative_to(path).as_posix(),
    )
    files = [f for f in files if not any(p.startswith(".") for p in f.relative_to(path).parts)]
    if not files:
        raise DataError(f"data.source='{path}' holds no .txt/.jsonl/.parquet files; {_HINT}")
    return files


def _decode(raw: bytes, name: str, report: SourceReport) -> str | None:
    """Text of a file's bytes; None for a binary file (a NUL byte, as git decides)."""
    if b"\0" in raw:
        report.binary.add(name)
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        report.not_utf8.add(name)
        return raw.decode("utf-8", errors="replace")


def _stdlib_documents(report: SourceReport) -> Iterator[tuple[str, str]]:
    root = stdlib_root()
    files = []
    for f in root.rglob("*.py"):
        rel = f.relative_to(root)
        if "site-packages" in rel.parts or "dist-packages" in rel.parts:
            continue
        files.append((rel.as_posix(), f))
    for rel, f in sorted(files):
        try:
            raw = f.read_bytes()
        except OSError:
            continue
        if (text := _decode(raw, rel, report)) is not None:
            yield rel, text


def _txt_pieces(name: str, text: str) -> Iterator[tuple[str, str]]:
    """A .txt file given alone as the source, cut after a line end into about _PIECES
    documents; doc_id "name:first_line"."""
    target = min(_PIECE_MAX, max(1, len(text) // _PIECES))
    start, line = 0, 1
    while start < len(text):
        cut = text.find("\n", start + target - 1)
        end = len(text) if cut < 0 else cut + 1
        yield f"{name}:{line}", text[start:end]
        line += text.count("\n", start, end)
        start = end


def _jsonl_documents(
    f: Path, name: str, field: str, report: SourceReport
) -> Iterator[tuple[str, str]]:
    rows = skipped = 0
    with f.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8-sig")
            except UnicodeDecodeError:
                report.not_utf8.add(name)
                line = raw.decode("utf-8-sig", errors="replace")
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{f}:{lineno} is not valid JSON ({e.msg}); fix or drop the line"
                ) from e
            if not isinstance(row, dict) or field not in row:
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise DataError(
                    f"{f}:{lineno} has no field '{field}' (has {keys}); set data.text_field"
                )
            rows += 1
            text = row[field]
            if not isinstance(text, str):
                skipped += 1
                continue
            if _SURROGATE.search(text):  # an escape such as "\ud800" that is no character
                report.not_utf8.add(name)
                text = _SURROGATE.sub("\ufffd", text)
            yield f"{name}:{lineno}", text
    report.rows[name], report.non_string[name] = rows, skipped


def _parquet_documents(
    f: Path, name: str, field: str, report: SourceReport
) -> Iterator[tuple[str, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
        if field not in pf.schema_arrow.names:
            raise DataError(
                f"{f} has no column '{field}' (has {pf.schema_arrow.names}); set data.text_field"
            )
        rows = skipped = 0
        for batch in pf.iter_batches(columns=[field], batch_size=4096):
            for text in batch.column(0).to_pylist():
                if isinstance(text, str):
                    yield f"{name}:{rows}", text
                else:
                    skipped += 1
                rows += 1
    except (pa.ArrowException, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"'{f}' is not a readable Parquet file ({reason}); replace it or remove it from "
            "data.source"
        ) from e
    report.rows[name], report.non_string[name] = rows, skipped


def _path_documents(path: Path, field: str, report: SourceReport) -> Iterator[tuple[str, str]]:
    files = _files(path)
    for f in files:
        name = f.name if path.is_file() else f.relative_to(path).as_posix()
        try:
            if f.suffix == ".jsonl":
                yield from _jsonl_documents(f, name, field, report)
            elif f.suffix == ".parquet":
                yield from _parquet_documents(f, name, field, report)
            elif (text := _decode(f.read_bytes(), name, report)) is None:
                continue
            elif path.is_file():
                yield from _txt_pieces(name, text)
            else:
                yield name, text
        except OSError as e:
            raise DataError(
                f"cannot read '{f}' ({e.strerror or e}); make it readable or remove it from "
                "data.source"
            ) from e


def iter_documents(
    cfg: DataConfig, split: Split | None = None, report: SourceReport | None = None
) -> Iterator[tuple[str, str]]:
    """(doc_id, text) of every non-empty document of `cfg.source` in `split` (None: all);
    what was skipped or replaced goes into `report`.

    Checks that the source exists eagerly; empty corpora and splits are caught by `prepare`.
    """
    if split is not None and split not in SPLITS:
        raise DataError(f"split={split!r} is unknown; use 'train' or 'validation'")
    report = SourceReport() if report is None else report
    if cfg.source == "stdlib":
        docs = _stdlib_documents(report)
    else:
        path = Path(cfg.source).expanduser()
        _files(path)  # fail now, not on first next()
        docs = _path_documents(path, cfg.text_field, report)
    return (
        (doc_id, text)
        for doc_id, text in docs
        if text and (split is None or split_of(doc_id, cfg.val_fraction) == split)
    )
