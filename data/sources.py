"""Documents as (doc_id, text), in a deterministic order, with the train/validation split.

A document's split is a pure function of sha1(doc_id), so adding documents never moves others.
doc_ids are relative to the source (a path inside a folder, "file:line" for JSONL, "file:row" for
Parquet), so moving a corpus does not change its split either.
"""

from __future__ import annotations

import hashlib
import json
import sys
import sysconfig
from collections.abc import Iterator
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


def split_of(doc_id: str, val_fraction: float) -> Split:
    """'validation' for a `val_fraction` share of doc_ids, chosen by sha1."""
    h = int.from_bytes(hashlib.sha1(doc_id.encode("utf-8")).digest()[:8], "little")
    return "validation" if h < val_fraction * 2.0**64 else "train"


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
            f"data.source='{path}' is a prepared folder, not raw documents; use auto_prepare() "
            "or PackedDataset on it"
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


def _stdlib_documents() -> Iterator[tuple[str, str]]:
    root = stdlib_root()
    files = []
    for f in root.rglob("*.py"):
        rel = f.relative_to(root)
        if "site-packages" in rel.parts or "dist-packages" in rel.parts:
            continue
        files.append((rel.as_posix(), f))
    for rel, f in sorted(files):
        try:
            text = f.read_bytes().decode("utf-8", errors="replace")
        except OSError:
            continue
        yield rel, text


def _jsonl_documents(f: Path, name: str, field: str) -> Iterator[tuple[str, str]]:
    with f.open("rb") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
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
            yield f"{name}:{lineno}", str(row[field])


def _parquet_documents(f: Path, name: str, field: str) -> Iterator[tuple[str, str]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f)
    if field not in pf.schema_arrow.names:
        raise DataError(
            f"{f} has no column '{field}' (has {pf.schema_arrow.names}); set data.text_field"
        )
    row = 0
    for batch in pf.iter_batches(columns=[field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield f"{name}:{row}", str(text)
            row += 1


def _path_documents(path: Path, field: str) -> Iterator[tuple[str, str]]:
    files = _files(path)
    for f in files:
        name = f.name if path.is_file() else f.relative_to(path).as_posix()
        if f.suffix == ".txt":
            yield name, f.read_bytes().decode("utf-8", errors="replace")
        elif f.suffix == ".jsonl":
            yield from _jsonl_documents(f, name, field)
        else:
            yield from _parquet_documents(f, name, field)


def iter_documents(cfg: DataConfig, split: Split | None = None) -> Iterator[tuple[str, str]]:
    """(doc_id, text) of every non-empty document of `cfg.source` in `split` (None: all).

    Checks that the source exists eagerly; empty corpora and splits are caught by `prepare`.
    """
    if split is not None and split not in SPLITS:
        raise DataError(f"split={split!r} is unknown; use 'train' or 'validation'")
    if cfg.source == "stdlib":
        docs = _stdlib_documents()
    else:
        path = Path(cfg.source).expanduser()
        _files(path)  # fail now, not on first next()
        docs = _path_documents(path, cfg.text_field)
    return (
        (doc_id, text)
        for doc_id, text in docs
        if text and (split is None or split_of(doc_id, cfg.val_fraction) == split)
    )
