"""Tokenize a corpus once into ArrayRecord shards that the Grain pipeline reads by index.

Layout of a prepared folder:

    meta.json                       written last: its presence means "complete"
    tokenizer.json                  for BPE / file tokenizers
    {split}/shard-00000.array_record  one record = one document's ids + EOS, little-endian
    {split}/lengths.npy             int64 [num_docs], tokens per record (EOS included)

meta.json records the byte size of every file and the record count of every shard, and its own
sha1 (over the rest of meta.json), so that `validate_prepared` finds a truncated shard or an
edited meta.json when the folder is opened, at the cost of a stat and a footer read per shard.

A folder is built in a temporary sibling `<name>.tmp-<host>-<pid>` that is renamed into place at
the end (into an existing folder: in its child `.prepare.tmp-<host>-<pid>`, whose parts are moved
in, meta.json last), so a failed prepare leaves nothing behind and an interrupted one leaves only
that temporary, which the next prepare there removes once its process is gone.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from .config import DataConfig
from .errors import DataError
from .sources import SPLITS, SourceReport, iter_documents, source_identity, split_share
from .tokenizers import BPETokenizer, Tokenizer, load_tokenizer

FORMAT_VERSION = 1
READER_VERSION = 2  # how sources are read (sources.py); part of the cache key
SHARD_BYTES = 1 << 30  # start a new shard after ~1 GiB of token payload
_WRITER_OPTIONS = "group_size:1,uncompressed"  # one record per chunk; reads are memcpy
_ENCODE_CHUNK = 512  # documents per encode_batch call (HF parallelises within a call)
_PARTS = ("tokenizer.json", *SPLITS)  # a prepared folder's own entries besides meta.json
_TMP = re.compile(r"^(?P<name>.+)\.tmp-(?P<host>.+)-(?P<pid>\d+)$")


def _dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")


# -- writing ---------------------------------------------------------------------------------


def _write_split(
    docs: Iterator[tuple[str, str]], tok: Tokenizer, dtype: np.dtype, out: Path, split: str
) -> tuple[dict[str, Any], dict[str, int]]:
    """Writes one split; returns its meta.json entry and the record count of each shard."""
    from array_record.python.array_record_module import ArrayRecordWriter

    (out / split).mkdir(parents=True, exist_ok=True)
    records: dict[str, int] = {}  # shard -> records, in order
    lengths: list[int] = []
    num_bytes = 0
    writer, shard, shard_bytes = None, "", 0
    eos = np.array([tok.eos_id], dtype)
    try:
        while chunk := list(islice(docs, _ENCODE_CHUNK)):
            texts = [text for _, text in chunk]
            for text, ids in zip(texts, tok.encode_batch(texts), strict=True):
                if writer is None or shard_bytes >= SHARD_BYTES:
                    if writer is not None:
                        writer.close()
                    shard = f"{split}/shard-{len(records):05d}.array_record"
                    writer, shard_bytes = ArrayRecordWriter(str(out / shard), _WRITER_OPTIONS), 0
                    records[shard] = 0
                record = np.concatenate([ids.astype(dtype), eos]).tobytes()
                writer.write(record)
                records[shard] += 1
                shard_bytes += len(record)
                lengths.append(len(ids) + 1)
                num_bytes += len(text.encode("utf-8"))
        if writer is not None:
            writer.close()
    except RuntimeError as e:  # array_record reports a failed write (disk full, ...) this way
        raise _as_os_error(e, out / shard) from e
    np.save(out / split / "lengths.npy", np.asarray(lengths, np.int64))
    info = {
        "num_docs": len(lengths),
        "num_tokens": int(sum(lengths)),
        "num_bytes": num_bytes,
        "shards": list(records),
    }
    return info, records


def _as_os_error(e: RuntimeError, path: Path) -> OSError:
    """array_record's "write() failed: No space left on device; writing ..." as an OSError."""
    message = str(e)
    code = next(
        (c for c in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) if os.strerror(c) in message),
        errno.EIO,
    )
    return OSError(code, os.strerror(code) if code != errno.EIO else message.split(";")[0], path)


def _seal(meta: dict[str, Any]) -> str:
    """sha1 of meta.json without its own "sha1" entry."""
    rest = {k: v for k, v in meta.items() if k != "sha1"}
    return hashlib.sha1(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def _file_table(folder: Path, records: dict[str, int]) -> dict[str, dict[str, int]]:
    """Byte size of every file of a prepared folder, and the record count of every shard."""
    names = ["tokenizer.json", *(f"{s}/lengths.npy" for s in SPLITS), *records]
    table = {n: {"bytes": (folder / n).stat().st_size} for n in names if (folder / n).is_file()}
    for shard, n in records.items():
        table[shard]["records"] = n
    return table


def _check_split_sizes(cfg: DataConfig, splits: dict[str, Any]) -> None:
    """One line saying how to fill both splits; the advice never points both ways."""
    total = sum(s["num_docs"] for s in splits.values())
    src = f"data.source='{cfg.source}'"
    if total == 1:
        raise DataError(
            f"{src} holds 1 document, and a train and a validation split need one each: pass a "
            "folder of several files (a single .txt file is cut into documents at line ends, so "
            "it needs several lines)"
        )
    for name in ("validation", "train"):
        if splits[name]["num_docs"]:
            continue
        shares = [split_share(doc_id) for doc_id, _ in iter_documents(cfg)]
        lo, hi = min(shares), max(shares)
        if name == "validation":  # a share must fall below val_fraction
            advice = f"raise data.val_fraction to at least {_between(lo, hi, up=True)}"
        else:  # a share must reach val_fraction
            advice = f"lower data.val_fraction to at most {_between(lo, hi, up=False)}"
        raise DataError(
            f"{name} split is empty: {total} documents with val_fraction={cfg.val_fraction}; "
            f"{advice}, or add data"
        )


def _between(lo: float, hi: float, *, up: bool) -> float:
    """The shortest decimal in (lo, hi]: `lo` rounded up, or `hi` rounded down. Any val_fraction
    in (lo, hi] puts the lowest share in validation and the highest in train."""
    for digits in range(1, 18):
        scale = 10.0 ** (digits - 1 - math.floor(math.log10(max(lo if up else hi, 1e-18))))
        y = (math.floor(lo * scale) + 1) / scale if up else math.floor(hi * scale) / scale
        if lo < y <= hi:
            return y
    return hi


def _build(cfg: DataConfig, out: Path) -> dict[str, Any]:
    """Tokenizes both splits of `cfg.source` into the empty folder `out`; returns meta."""
    report = SourceReport()
    if cfg.tokenizer == "bpe":
        train_texts = (text for _, text in iter_documents(cfg, "train", report))
        tok = load_tokenizer("bpe", train_texts=train_texts, vocab_size=cfg.bpe_vocab_size)
    else:
        tok = load_tokenizer(cfg.tokenizer)
    if isinstance(tok, BPETokenizer):
        tok.save(out / "tokenizer.json")
    dtype = _dtype(tok.vocab_size)
    splits, records = {}, {}
    for s in SPLITS:
        splits[s], shard_records = _write_split(iter_documents(cfg, s, report), tok, dtype, out, s)
        records.update(shard_records)
    if sum(s["num_docs"] for s in splits.values()) == 0:
        if skipped := sum(report.non_string.values()):
            raise DataError(
                f"data.source='{cfg.source}': all {skipped} rows have a '{cfg.text_field}' that "
                "is not a string (null, number or object); set data.text_field to the field that "
                "holds the text"
            )
        raise DataError(f"data.source='{cfg.source}' holds no non-empty documents; add data")
    _check_split_sizes(cfg, splits)
    if line := report.line(cfg.text_field):
        print(f"note: data.source='{cfg.source}': {line}", flush=True)
    meta = {
        "format_version": FORMAT_VERSION,
        "source": cfg.source,
        "source_identity": source_identity(cfg),
        "text_field": cfg.text_field,
        "val_fraction": cfg.val_fraction,
        "tokenizer": {"spec": cfg.tokenizer, **tok.to_json()},
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "dtype": dtype.str,
        "splits": splits,
        "skipped": {
            "non_string_rows": sum(report.non_string.values()),
            "binary_files": len(report.binary),
            "not_utf8_files": len(report.not_utf8),
        },
        "files": _file_table(out, records),
    }
    meta["sha1"] = _seal(meta)
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


# -- building in a temporary folder ----------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _remove_stale_temporaries(parent: Path, name: str | None = None) -> None:
    """Removes `<name>.tmp-<host>-<pid>` folders (any name when None) left in `parent` by a
    prepare on this host whose process is gone. Another host's are left alone: its pids are not
    ours to check."""
    if not parent.is_dir():
        return
    host = socket.gethostname()
    for p in parent.iterdir():
        m = _TMP.match(p.name)
        if m and m["host"] == host and name in (None, m["name"]) and not _alive(int(m["pid"])):
            shutil.rmtree(p, ignore_errors=True)


def _temporary(final: Path) -> Path:
    """`<name>.tmp-<host>-<pid>` beside `final`."""
    return final.with_name(f"{final.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def _missing_parents(folder: Path) -> list[Path]:
    """The ancestors of `folder` (itself included) that do not exist yet, outermost first; one
    that is a file is an error naming it."""
    missing = []
    for p in (folder, *folder.parents):
        if p.is_dir():
            break
        if p.exists() or p.is_symlink():
            if p.is_dir():  # made between the two checks, by a concurrent caller
                break
            raise NotADirectoryError(errno.ENOTDIR, "it is a file, not a folder", str(p))
        missing.append(p)
    return missing[::-1]


@contextmanager
def _staging(tmp: Path) -> Iterator[Path]:
    """`tmp`, made empty to build in; removed afterwards, as are the parent folders made for it
    when the build fails (the caller moves it into place on success)."""
    made = _missing_parents(tmp.parent)
    try:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in reversed(made):
            try:
                p.rmdir()
            except OSError:
                break
        raise
    shutil.rmtree(tmp, ignore_errors=True)


def _install(tmp: Path, out: Path) -> None:
    """Moves a built folder to `out`: one rename when `out` is new; into an existing `out` ours
    are replaced one by one, meta.json last, and foreign files stay."""
    if not out.exists():
        os.replace(tmp, out)
        return
    (out / "meta.json").unlink(missing_ok=True)  # incomplete from here until the end
    for name in _PARTS:
        old = out / name
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        elif old.exists() or old.is_symlink():
            old.unlink()
        if (tmp / name).exists():
            os.replace(tmp / name, old)
    os.replace(tmp / "meta.json", out / "meta.json")


@contextmanager
def _os_errors(folder: Path, fix: str) -> Iterator[None]:
    """An OS error while making `folder` becomes one line naming the file and the fix."""
    try:
        yield
    except OSError as e:
        where = f" ('{e.filename}')" if e.filename and str(e.filename) != str(folder) else ""
        reason = e.strerror or str(e) or type(e).__name__
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            fix = f"free some space, or {fix}"
        elif e.errno == errno.EFBIG:
            fix = f"raise the file size limit (ulimit -f), or {fix}"
        raise DataError(f"cannot write prepared data to '{folder}': {reason}{where}; {fix}") from e


def prepare(cfg: DataConfig, out_dir: str | Path, *, force: bool = False) -> Path:
    """Tokenizes both splits of `cfg.source` into `out_dir`; returns `out_dir`.

    Refuses a non-empty `out_dir` unless `force` (--force); even then it only replaces its own
    files. The folder is built beside `out_dir` (inside it, when it exists) and moved into place
    when complete, so a failed prepare leaves `out_dir` as it was.
    """
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise DataError(f"prepare output '{out}' is a file; pass a folder as --out")
    with _os_errors(out, "pass a writable folder as --out"):
        _remove_stale_temporaries(out.parent, out.name)
        _remove_stale_temporaries(out, ".prepare")
        if out.is_dir() and any(out.iterdir()) and not force:
            raise DataError(
                f"prepare output '{out}' is not empty; pass a new or empty folder as --out, or "
                "--force to replace the prepared data in it"
            )
        iter_documents(cfg)  # source errors before anything is written
        # Into an existing folder, build in a child: --force needs no write access to its parent.
        with _staging(_temporary(out / ".prepare" if out.is_dir() else out)) as tmp:
            _build(cfg, tmp)
            _install(tmp, out)
    return out


# -- opening ---------------------------------------------------------------------------------


def validate_prepared(folder: str | Path, *, redo: str | None = None) -> dict[str, Any]:
    """meta.json of a complete prepared folder; one DataError naming the first problem and
    `redo` (default: how to prepare it again).

    Checks meta.json against its sha1, the byte size of every file and the record count of every
    shard it lists (folders prepared before these were recorded get the other checks only).
    """
    folder = Path(folder).expanduser()
    meta_path = folder / "meta.json"
    redo = redo or f"rerun `menagerie prepare` into '{folder}' with --force or delete it"
    if not meta_path.is_file():
        raise DataError(f"'{folder}' has no meta.json (prepare was interrupted?); {redo}")
    try:
        meta = json.loads(meta_path.read_text())
        version = meta["format_version"]
        splits = {s: meta["splits"][s] for s in SPLITS}
        for key in ("vocab_size", "eos_id", "dtype", "tokenizer"):
            meta[key]
    except OSError as e:
        raise DataError(f"cannot read '{meta_path}' ({e.strerror}); make it readable") from e
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise DataError(f"'{meta_path}' is corrupt ({type(e).__name__}: {e}); {redo}") from e
    if "sha1" in meta and meta["sha1"] != _seal(meta):
        raise DataError(f"'{meta_path}' was edited after prepare (its sha1 does not match); {redo}")
    if version != FORMAT_VERSION:
        raise DataError(
            f"'{folder}' has format_version {version}, but this menagerie reads "
            f"{FORMAT_VERSION}; {redo}"
        )
    if meta["tokenizer"]["kind"] != "byte" and not (folder / "tokenizer.json").is_file():
        raise DataError(f"'{folder}/tokenizer.json' is missing; {redo}")
    for split in splits.values():
        for shard in split["shards"]:
            if not (folder / shard).is_file():
                raise DataError(f"shard '{folder / shard}' is missing; {redo}")
    for name, expected in meta.get("files", {}).items():
        _check_file(folder / name, expected, redo)
    for name, split in splits.items():
        try:
            lengths = np.load(folder / name / "lengths.npy")
        except (OSError, ValueError) as e:
            raise DataError(
                f"'{folder / name / 'lengths.npy'}' is missing or corrupt; {redo}"
            ) from e
        if len(lengths) != split["num_docs"] or int(lengths.sum()) != split["num_tokens"]:
            raise DataError(
                f"'{folder / name / 'lengths.npy'}' has {len(lengths)} docs / {int(lengths.sum())}"
                f" tokens but meta.json says {split['num_docs']} / {split['num_tokens']}; {redo}"
            )
    return meta


def _check_file(path: Path, expected: dict[str, int], redo: str) -> None:
    from array_record.python.array_record_module import ArrayRecordReader

    try:
        size = path.stat().st_size
    except OSError as e:
        raise DataError(f"'{path}' is missing or unreadable ({e.strerror}); {redo}") from e
    if size != expected["bytes"]:
        raise DataError(
            f"'{path}' has {size} bytes but meta.json recorded {expected['bytes']} (truncated or "
            f"changed after prepare); {redo}"
        )
    if "records" not in expected:
        return
    try:
        reader = ArrayRecordReader(str(path))
        count = reader.num_records()
        reader.close()
    except RuntimeError as e:
        raise DataError(f"'{path}' is not a readable ArrayRecord shard ({e}); {redo}") from e
    if count != expected["records"]:
        raise DataError(
            f"'{path}' holds {count} records but meta.json recorded {expected['records']}; {redo}"
        )


# -- the cache -------------------------------------------------------------------------------


def cache_root(cfg: DataConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("MENAGERIE_CACHE") or "~/.cache/menagerie"
    return Path(root).expanduser()


def _cache_setting(cfg: DataConfig) -> str:
    """The setting that chose `cache_root(cfg)`."""
    if cfg.cache_dir:
        return "data.cache_dir"
    return "MENAGERIE_CACHE" if os.environ.get("MENAGERIE_CACHE") else "data.cache_dir"


def cache_key(cfg: DataConfig) -> str:
    """sha1 of everything that decides the prepared bytes."""
    tokenizer = cfg.tokenizer
    if tokenizer not in ("byte", "bpe"):
        path = Path(tokenizer).expanduser()
        if not path.is_file():
            raise DataError(
                f"data.tokenizer={tokenizer!r} is not 'byte', 'bpe' or an existing tokenizer.json"
            )
        tokenizer = f"file:{hashlib.sha1(path.read_bytes()).hexdigest()}"
    key = {
        "format_version": FORMAT_VERSION,
        "reader_version": READER_VERSION,
        "source": source_identity(cfg),
        "tokenizer": tokenizer,
        "bpe_vocab_size": cfg.bpe_vocab_size if cfg.tokenizer == "bpe" else None,
        "val_fraction": cfg.val_fraction,
    }
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()


_THREAD_LOCKS: dict[Path, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


def _thread_lock(entry: Path) -> threading.Lock:
    """This process's lock for one cache entry."""
    with _THREAD_LOCKS_GUARD:
        return _THREAD_LOCKS.setdefault(entry, threading.Lock())


def auto_prepare(cfg: DataConfig) -> Path:
    """A prepared folder for `cfg`: `cfg.source` itself if prepared, else one in the cache.

    A folder given as `source` carries its own tokenizer; `cfg.tokenizer` is then not used, and
    a problem with it is one DataError. A cache entry is ours: a broken one is rebuilt, and the
    temporaries of interrupted prepares on this host are removed. Concurrent callers serialise
    on a lock file per entry (threads of one process also on a thread lock: they share the
    temporary folder's name, and where flock is emulated by POSIX record locks, as on NFS, a
    process's threads do not exclude each other); each builds in a temporary folder renamed into
    place, so no one ever sees a half-written entry.
    """
    if cfg.source != "stdlib" and (Path(cfg.source).expanduser() / "meta.json").exists():
        folder = Path(cfg.source).expanduser()
        validate_prepared(folder)
        return folder
    key = cache_key(cfg)
    stem = "stdlib" if cfg.source == "stdlib" else Path(cfg.source).expanduser().resolve().stem
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem)[:40]
    tok = cfg.tokenizer if cfg.tokenizer in ("byte", "bpe") else "file"
    root = cache_root(cfg)
    parent = root / "prepared"
    final = parent / f"{stem}-{tok}-{key[:16]}"
    fix = f"set {_cache_setting(cfg)} (now '{root}') to a writable folder"
    with _os_errors(root, fix):
        _missing_parents(parent)  # names a file in the way
        parent.mkdir(parents=True, exist_ok=True)
        try:
            lock = open(parent / f".{final.name}.lock", "w")
        except OSError:
            if final.is_dir():  # a read-only cache that holds the entry already serves
                validate_prepared(final)
                return final
            raise
        with _thread_lock(final), lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            _remove_stale_temporaries(parent)
            if final.exists():
                try:
                    validate_prepared(final, redo="rebuilding this cached copy")
                    return final
                except DataError as e:  # ours, so set it aside and rebuild it
                    print(f"note: {e}", flush=True)
                    shutil.rmtree(_temporary(final), ignore_errors=True)
                    os.replace(final, _temporary(final))
            with _staging(_temporary(final)) as tmp:
                meta = _build(cfg, tmp)
                os.replace(tmp, final)
    docs = sum(s["num_docs"] for s in meta["splits"].values())
    tokens = sum(s["num_tokens"] for s in meta["splits"].values())
    print(f"prepared data.source='{cfg.source}' ({docs} documents, {tokens} tokens) into '{final}'")
    return final
