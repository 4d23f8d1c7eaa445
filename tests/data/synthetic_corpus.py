"""Synthetic prepared folders whose token ids are all unique, for token-exact packing tests.

A plain module (not conftest) so tests can import it by a name no other test folder uses.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from menagerie.data.prepare import FORMAT_VERSION


def write_token_folder(folder: Path, docs: list[np.ndarray], split: str = "train") -> Path:
    """A prepared folder whose `split` holds `docs` verbatim (uint32 ids, the last id of each
    doc standing in for its EOS); the other split gets one tiny doc. Bypasses `prepare` so that
    every token id can be unique and packing can be checked token by token."""
    other = "validation" if split == "train" else "train"
    splits = {}
    for name, split_docs in ((split, docs), (other, [np.array([0, 1], np.uint32)])):
        (folder / name).mkdir(parents=True, exist_ok=True)
        shard = f"{name}/shard-00000.array_record"
        writer = ArrayRecordWriter(str(folder / shard), "group_size:1,uncompressed")
        for d in split_docs:
            writer.write(np.asarray(d, "<u4").tobytes())
        writer.close()
        lengths = np.array([len(d) for d in split_docs], np.int64)
        np.save(folder / name / "lengths.npy", lengths)
        splits[name] = {
            "num_docs": len(split_docs),
            "num_tokens": int(lengths.sum()),
            "num_bytes": int(lengths.sum()),
            "shards": [shard],
        }
    meta = {
        "format_version": FORMAT_VERSION,
        "source": "synthetic",
        "tokenizer": {"spec": "byte", "kind": "byte", "vocab_size": 257},
        "vocab_size": 257,
        "eos_id": 256,
        "dtype": "<u4",
        "splits": splits,
    }
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def unique_docs(lengths: list[int]) -> list[np.ndarray]:
    """Doc i holds consecutive ids starting where doc i-1 stopped: every id is unique."""
    starts = np.cumsum([0, *lengths])
    return [np.arange(s, s + n, dtype=np.uint32) for s, n in zip(starts, lengths, strict=False)]
