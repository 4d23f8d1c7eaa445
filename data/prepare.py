"""Tokenize a corpus once into ArrayRecord shards that the Grain pipeline reads by index.

Layout of a prepared folder:

    meta.json                       written last, atomically: its presence means "complete"
    tokenizer.json                  for BPE / file tokenizers
    {split}/shard-00000.array_record  one record = one document's ids + EOS, little-endian
    {split}/lengths.npy             int64 [num_docs], tokens per record (EOS included)
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from .config import DataConfig
from .errors import DataError
from .sources import SPLITS, iter_documents, source_identity
from .tokenizers import BPETokenizer, Tokenizer, load_tokenizer

FORMAT_VERSION = 1
SHARD_BYTES = 1 << 30  # start a new shard after ~1 GiB of token payload
_WRITER_OPTIONS = "group_size:1,uncompressed"  # one record per chunk; reads are memcpy
_ENCODE_CHUNK = 512  # documents per encode_batch call (HF parallelises within a call)


def _dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")


def _write_split(
    docs: Iterator[tuple[str, str]], tok: Tokenizer, dtype: np.dtype, out: Path, split: str
) -> dict[str, Any]:
    from array_record.python.array_record_module import ArrayRecordWriter

    (out / split).mkdir(parents=True, exist_ok=True)
    shards: list[str] = []
    lengths: list[int] = []
    num_bytes = 0
    writer, shard_bytes = None, 0
    eos = np.array([tok.eos_id], dtype)
    while chunk := list(islice(docs, _ENCODE_CHUNK)):
        texts = [text for _, text in chunk]
        for text, ids in zip(texts, tok.encode_batch(texts), strict=True):
            if writer is None or shard_bytes >= SHARD_BYTES:
                if writer is not None:
                    writer.close()
                shards.append(f"{split}/shard-{len(shards):05d}.array_record")
                writer, shard_bytes = ArrayRecordWriter(str(out / shards[-1]), _WRITER_OPTIONS), 0
            record = np.concatenate([ids.astype(dtype), eos]).tobytes()
            writer.write(record)
            shard_bytes += len(record)
            lengths.append(len(ids) + 1)
            num_bytes += len(text.encode("utf-8"))
    if writer is not None:
        writer.close()
    np.save(out / split / "lengths.npy", np.asarray(lengths, np.int64))
    return {
        "num_docs": len(lengths),
        "num_tokens": int(sum(lengths)),
        "num_bytes": num_bytes,
        "shards": shards,
    }


def prepare(cfg: DataConfig, out_dir: str | Path, *, force: bool = False) -> Path:
    """Tokenizes both splits of `cfg.source` into `out_dir`; returns `out_dir`.

    Refuses a non-empty `out_dir` unless `force`; even then it only overwrites its own files.
    """
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise DataError(f"prepare output '{out}' is a file; pass a folder")
    if out.exists() and any(out.iterdir()) and not force:
        raise DataError(f"prepare output '{out}' is not empty; pass an empty folder or force=True")
    out.mkdir(parents=True, exist_ok=True)

    iter_documents(cfg)  # source errors before any training or writing
    if cfg.tokenizer == "bpe":
        train_texts = (text for _, text in iter_documents(cfg, "train"))
        tok = load_tokenizer("bpe", train_texts=train_texts, vocab_size=cfg.bpe_vocab_size)
    else:
        tok = load_tokenizer(cfg.tokenizer)
    if isinstance(tok, BPETokenizer):
        tok.save(out / "tokenizer.json")
    dtype = _dtype(tok.vocab_size)

    splits = {s: _write_split(iter_documents(cfg, s), tok, dtype, out, s) for s in SPLITS}
    total = sum(s["num_docs"] for s in splits.values())
    if total == 0:
        raise DataError(f"data.source='{cfg.source}' holds no non-empty documents; add data")
    for name, hint in (("train", "lower"), ("validation", "raise")):
        if splits[name]["num_docs"] == 0:
            raise DataError(
                f"{name} split is empty: {total} documents with val_fraction={cfg.val_fraction}; "
                f"{hint} data.val_fraction or add data"
            )
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
    }
    tmp = out / f".meta.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out / "meta.json")
    return out


def validate_prepared(folder: str | Path) -> dict[str, Any]:
    """meta.json of a complete prepared folder; one DataError naming the first problem."""
    folder = Path(folder).expanduser()
    meta_path = folder / "meta.json"
    redo = f"rerun `menagerie prepare` into '{folder}' with --force or delete it"
    if not meta_path.is_file():
        raise DataError(f"'{folder}' has no meta.json (prepare was interrupted?); {redo}")
    try:
        meta = json.loads(meta_path.read_text())
        version = meta["format_version"]
        splits = {s: meta["splits"][s] for s in SPLITS}
        for key in ("vocab_size", "eos_id", "dtype", "tokenizer"):
            meta[key]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise DataError(f"'{meta_path}' is corrupt ({type(e).__name__}: {e}); {redo}") from e
    if version != FORMAT_VERSION:
        raise DataError(
            f"'{folder}' has format_version {version}, but this menagerie reads "
            f"{FORMAT_VERSION}; {redo}"
        )
    if meta["tokenizer"]["kind"] != "byte" and not (folder / "tokenizer.json").is_file():
        raise DataError(f"'{folder}/tokenizer.json' is missing; {redo}")
    for name, split in splits.items():
        for shard in split["shards"]:
            if not (folder / shard).is_file():
                raise DataError(f"shard '{folder / shard}' is missing; {redo}")
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


def cache_root(cfg: DataConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("MENAGERIE_CACHE") or "~/.cache/menagerie"
    return Path(root).expanduser()


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
        "source": source_identity(cfg),
        "tokenizer": tokenizer,
        "bpe_vocab_size": cfg.bpe_vocab_size if cfg.tokenizer == "bpe" else None,
        "val_fraction": cfg.val_fraction,
    }
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()


def auto_prepare(cfg: DataConfig) -> Path:
    """A prepared folder for `cfg`: `cfg.source` itself if prepared, else one in the cache.

    A folder given as `source` carries its own tokenizer; `cfg.tokenizer` is then not used.
    Concurrent callers serialise on a lock file; each prepares into a private temporary folder
    that is renamed into place, so no one ever sees a half-written cache entry.
    """
    if cfg.source != "stdlib" and (Path(cfg.source).expanduser() / "meta.json").exists():
        folder = Path(cfg.source).expanduser()
        validate_prepared(folder)
        return folder
    key = cache_key(cfg)
    stem = "stdlib" if cfg.source == "stdlib" else Path(cfg.source).expanduser().resolve().stem
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem)[:40]
    tok = cfg.tokenizer if cfg.tokenizer in ("byte", "bpe") else "file"
    parent = cache_root(cfg) / "prepared"
    final = parent / f"{stem}-{tok}-{key[:16]}"
    parent.mkdir(parents=True, exist_ok=True)
    with open(parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.exists():
            try:
                validate_prepared(final)
                return final
            except DataError:  # an entry we made but that is broken: set it aside and redo
                broken = parent / f".broken-{final.name}-{os.getpid()}-{time.time_ns()}"
                os.rename(final, broken)
                shutil.rmtree(broken, ignore_errors=True)
        tmp = parent / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            prepare(cfg, tmp)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
