"""The packed, index-based Grain pipeline: batch k is a pure function of (seed, k).

Epoch e permutes the documents with a seed derived from (seed, e), concatenates them (each already
ends in EOS) into one stream and cuts it into `windows_per_epoch = stream_len // (T + 1)`
consecutive windows of T + 1 tokens; the tail is dropped. Window order within an epoch is
shuffled too, so one batch mixes the corpus. Global window g = k * B + row lives in epoch
g // windows_per_epoch. Inputs are w[:-1], targets w[1:].

A document cut by a window boundary restarts its positions at 0 in the next window and gets that
window's segment id 1 (segment ids count documents within a row, from 1; 0 would be padding,
which full windows never have). `loss_mask` is 0 where the target belongs to another document
than the input: the EOS of a document, whose target is the next document's first token.

Nothing is replayed to resume: `start_step` slices the index space, and any process count that
divides the global batch reads its own rows [p * B / P, (p + 1) * B / P) of the same batches.
`IndexedDataset` holds that batching for any source of indexed rows (`data.synthetic` too).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import grain
import numpy as np

from .config import DataConfig
from .errors import DataError
from .prepare import auto_prepare, validate_prepared
from .sources import SPLITS
from .tokenizers import Tokenizer, tokenizer_from_meta

Batch = dict[str, np.ndarray]
_FOREVER = 2**62  # windows in "forever" (num_epochs=None); a MapDataset needs a length
_EPOCH_CACHE = 4  # epochs whose permutations stay in memory (a batch spans at most two)


class _Epoch(NamedTuple):
    doc_order: np.ndarray  # [N] int64, record index of the i-th document of the stream
    doc_starts: np.ndarray  # [N + 1] int64, stream offset of the i-th document; last = stream_len
    window_order: np.ndarray | None  # [W] int64 window permutation, None = identity


class IndexedDataset:
    """Batches of rows addressed by a global index: row g of global batch k is `window(k * B + r)`,
    so batch k is a pure function of (seed, k) and a process reads its own rows of it.

    Subclasses set `seq_len`, `windows_per_epoch`, `num_workers` and `prefetch` and define
    `window(index, *, seed, shuffle) -> Batch` (one row: tokens, targets, segment_ids,
    positions [T] int32, loss_mask [T] float32).
    """

    seq_len: int
    windows_per_epoch: int
    num_workers: int
    prefetch: int

    def window(self, index: int, *, seed: int, shuffle: bool = True) -> Batch:
        raise NotImplementedError

    def dataset(
        self,
        global_batch_size: int,
        *,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        shuffle: bool = True,
        num_epochs: int | None = None,
    ) -> grain.MapDataset:
        """MapDataset whose element k is this process's rows of global batch k."""
        if global_batch_size < 1 or global_batch_size % process_count != 0:
            raise DataError(
                f"global batch size {global_batch_size} is not a positive multiple of the "
                f"process count {process_count}; change the batch size"
            )
        if not 0 <= process_index < process_count:
            raise DataError(f"process_index={process_index} is outside [0, {process_count})")
        if seed < 0:
            raise DataError(f"seed={seed} must be non-negative")
        rows = global_batch_size // process_count
        if num_epochs is None:
            num_batches = _FOREVER // global_batch_size
        else:
            num_batches = num_epochs * self.windows_per_epoch // global_batch_size
        offset = process_index * rows

        def row_window(m: int) -> Batch:
            step, row = divmod(m, rows)
            return self.window(step * global_batch_size + offset + row, seed=seed, shuffle=shuffle)

        ds = grain.MapDataset.range(num_batches * rows).map(row_window)
        return ds.batch(rows, drop_remainder=True)

    def batches(
        self,
        global_batch_size: int,
        *,
        seed: int,
        start_step: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        shuffle: bool = True,
        num_epochs: int | None = None,
    ) -> Iterator[Batch]:
        """This process's rows of global batches start_step, start_step + 1, ...

        Each batch is a dict of numpy arrays, b = global_batch_size // process_count:
        tokens, targets, segment_ids, positions [b, T] int32; loss_mask [b, T] float32.
        """
        ds = self.dataset(
            global_batch_size,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
            shuffle=shuffle,
            num_epochs=num_epochs,
        )
        ds = ds[start_step:]  # resume by slicing the index space: nothing is replayed
        read = grain.ReadOptions(
            num_threads=self.num_workers, prefetch_buffer_size=max(2 * self.num_workers, 1)
        )
        it = ds.to_iter_dataset(read)
        if self.prefetch > 0:
            it = grain.experimental.ThreadPrefetchIterDataset(
                it, prefetch_buffer_size=self.prefetch
            )
        return iter(it)

    def eval_batches(
        self,
        global_batch_size: int,
        num_batches: int | None = None,
        *,
        process_index: int = 0,
        process_count: int = 1,
    ) -> Iterator[Batch]:
        """The same `num_batches` batches on every call: the windows of seed 0 unshuffled (a
        PackedDataset's in corpus order).

        None: every full batch of one pass (at least one). More batches than one pass wrap
        around to the first window.
        """
        if num_batches is None:
            num_batches = max(1, self.windows_per_epoch // global_batch_size)
        ds = self.dataset(
            global_batch_size,
            seed=0,
            process_index=process_index,
            process_count=process_count,
            shuffle=False,
        )
        return iter(ds[:num_batches].to_iter_dataset(grain.ReadOptions(num_threads=0)))


class PackedDataset(IndexedDataset):
    """Windows of `seq_len + 1` tokens over one split of a prepared folder.

    Attributes: `tokenizer`, `num_tokens` (tokens in the split, EOS included), `num_docs`,
    `token_bytes` ([vocab] int32, UTF-8 bytes per token id), `windows_per_epoch`, `meta`.
    """

    def __init__(
        self,
        prepared_dir: str | Path,
        split: str,
        seq_len: int,
        *,
        num_workers: int = 0,
        prefetch: int = 2,
    ) -> None:
        if split not in SPLITS:
            raise DataError(f"split={split!r} is unknown; use 'train' or 'validation'")
        if seq_len < 1:
            raise DataError(f"seq_len={seq_len} must be at least 1")
        self.folder = Path(prepared_dir).expanduser()
        self.meta = validate_prepared(self.folder)
        self.split, self.seq_len = split, seq_len
        self.num_workers, self.prefetch = num_workers, prefetch
        self.tokenizer: Tokenizer = tokenizer_from_meta(self.meta, self.folder)
        self.token_bytes: np.ndarray = self.tokenizer.token_bytes
        self._dtype = np.dtype(self.meta["dtype"])
        self._lengths = np.load(self.folder / split / "lengths.npy").astype(np.int64)
        self.num_docs = len(self._lengths)
        self.num_tokens = int(self._lengths.sum())
        shards = [str(self.folder / s) for s in self.meta["splits"][split]["shards"]]
        try:
            self._source = grain.sources.ArrayRecordDataSource(shards)
        except RuntimeError as e:  # validate_prepared checked sizes; this is what is left
            raise DataError(
                f"'{self.folder}/{split}' has an unreadable shard ({e}); rerun `menagerie "
                "prepare` with --force"
            ) from e
        if len(self._source) != self.num_docs:
            raise DataError(
                f"'{self.folder}/{split}' shards hold {len(self._source)} records but lengths.npy "
                f"has {self.num_docs}; rerun `menagerie prepare` with --force"
            )
        self.windows_per_epoch = self.num_tokens // (seq_len + 1)
        if self.windows_per_epoch == 0:
            raise DataError(
                f"{split} split of '{self.folder}' has {self.num_tokens} tokens, fewer than one "
                f"window of seq_len+1={seq_len + 1}; lower seq_len or add data"
            )
        self._epochs: OrderedDict[tuple[int, int, bool], _Epoch] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_config(
        cls,
        cfg: DataConfig,
        split: str,
        seq_len: int,
        *,
        prepared_dir: str | Path | None = None,
    ) -> PackedDataset:
        """The dataset over `split` of `prepared_dir` (default: `auto_prepare(cfg)`), with
        cfg's workers and prefetch."""
        folder = auto_prepare(cfg) if prepared_dir is None else prepared_dir
        return cls(folder, split, seq_len, num_workers=cfg.num_workers, prefetch=cfg.prefetch)

    # -- index -> window ---------------------------------------------------------------------

    def _epoch(self, seed: int, epoch: int, shuffle: bool) -> _Epoch:
        key = (seed, epoch, shuffle) if shuffle else (0, 0, False)
        with self._lock:
            if key in self._epochs:
                self._epochs.move_to_end(key)
                return self._epochs[key]
        if shuffle:
            doc_order = np.random.default_rng([seed, epoch, 0]).permutation(self.num_docs)
            window_order = np.random.default_rng([seed, epoch, 1]).permutation(
                self.windows_per_epoch
            )
        else:
            doc_order, window_order = np.arange(self.num_docs), None
        doc_starts = np.zeros(self.num_docs + 1, np.int64)
        np.cumsum(self._lengths[doc_order], out=doc_starts[1:])
        ep = _Epoch(doc_order, doc_starts, window_order)
        with self._lock:
            self._epochs[key] = ep
            while len(self._epochs) > _EPOCH_CACHE:
                self._epochs.popitem(last=False)
        return ep

    def window(self, index: int, *, seed: int, shuffle: bool = True) -> Batch:
        """Global window `index` as one row: tokens/targets/segment_ids/positions [T] int32,
        loss_mask [T] float32."""
        epoch, j = divmod(int(index), self.windows_per_epoch)
        ep = self._epoch(seed, epoch, shuffle)
        if ep.window_order is not None:
            j = int(ep.window_order[j])
        width = self.seq_len + 1
        lo, hi = j * width, (j + 1) * width
        # Only the documents the window spans are read: binary search in the epoch's offsets.
        first = int(np.searchsorted(ep.doc_starts, lo, side="right")) - 1
        last = int(np.searchsorted(ep.doc_starts, hi - 1, side="right")) - 1
        pieces = []
        for i in range(first, last + 1):
            start = int(ep.doc_starts[i])
            ids = self._record(int(ep.doc_order[i]))
            pieces.append(ids[max(lo - start, 0) : hi - start])
        w = np.concatenate(pieces).astype(np.int32)
        piece_lens = np.fromiter((len(p) for p in pieces), np.int64, len(pieces))
        piece_starts = np.cumsum(piece_lens) - piece_lens
        seg = np.repeat(np.arange(1, len(pieces) + 1, dtype=np.int32), piece_lens)
        pos = (np.arange(width) - np.repeat(piece_starts, piece_lens)).astype(np.int32)
        return {
            "tokens": w[:-1],
            "targets": w[1:],
            "segment_ids": seg[:-1],
            "positions": pos[:-1],
            "loss_mask": (seg[1:] == seg[:-1]).astype(np.float32),
        }

    def _record(self, doc: int) -> np.ndarray:
        """Token ids of record `doc`; a record whose length disagrees with lengths.npy is a
        corrupt shard, not a short document."""
        raw = self._source[doc]
        if len(raw) != self._lengths[doc] * self._dtype.itemsize:
            raise DataError(
                f"record {doc} of '{self.folder}/{self.split}' has {len(raw)} bytes, but "
                f"lengths.npy says {self._lengths[doc]} tokens; rerun `menagerie prepare` with "
                "--force"
            )
        return np.frombuffer(raw, self._dtype)


def measure_throughput(
    prepared_dir: str | Path,
    *,
    split: str = "train",
    seq_len: int = 1024,
    batch_size: int = 4,
    num_batches: int = 200,
    num_workers: int = 0,
    prefetch: int = 2,
    seed: int = 0,
) -> dict[str, Any]:
    """Tokens per second the iterator delivers (first batch excluded: it pays for set-up)."""
    ds = PackedDataset(prepared_dir, split, seq_len, num_workers=num_workers, prefetch=prefetch)
    t0 = time.perf_counter()
    it = ds.batches(batch_size, seed=seed)
    next(it)
    t1 = time.perf_counter()
    for _ in range(num_batches):
        next(it)
    seconds = time.perf_counter() - t1
    tokens = num_batches * batch_size * seq_len
    return {
        "seq_len": seq_len,
        "batch_size": batch_size,
        "num_batches": num_batches,
        "num_workers": num_workers,
        "first_batch_s": t1 - t0,
        "seconds": seconds,
        "batches_per_s": num_batches / seconds,
        "tokens_per_s": tokens / seconds,
    }
