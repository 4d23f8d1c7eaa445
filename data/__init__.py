"""menagerie.data: tokenizers, document sources, prepared ArrayRecord shards, packed Grain batches,
synthetic in-context tasks.

cfg = DataConfig(source="stdlib", tokenizer="byte")
ds = PackedDataset(auto_prepare(cfg), "train", seq_len=1024)
for batch in ds.batches(global_batch_size=8, seed=0, start_step=step): ...
train, validation = open_datasets(cfg, seq_len=1024)  # what the trainer reads, any source
"""

from __future__ import annotations

from .config import DataConfig, TaskConfig
from .errors import DataError
from .path_star import PathStarConfig
from .pipeline import IndexedDataset, PackedDataset, measure_throughput
from .prepare import auto_prepare, prepare, validate_prepared
from .sources import iter_documents
from .synthetic import LinRegConfig, MQARConfig, SyntheticDataset, TaskTokenizer
from .tokenizers import BPETokenizer, ByteTokenizer, Tokenizer, load_tokenizer


def open_datasets(cfg: DataConfig, seq_len: int) -> tuple[IndexedDataset, IndexedDataset]:
    """The train and validation datasets of `cfg`: a synthetic task's two streams, or the two
    splits of the prepared source (prepared first if it is not yet, `auto_prepare`)."""
    if cfg.is_synthetic:
        return tuple(SyntheticDataset.from_config(cfg, s, seq_len) for s in ("train", "validation"))
    prepared = auto_prepare(cfg)
    return tuple(
        PackedDataset.from_config(cfg, s, seq_len, prepared_dir=prepared)
        for s in ("train", "validation")
    )


__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "DataConfig",
    "DataError",
    "IndexedDataset",
    "LinRegConfig",
    "MQARConfig",
    "PackedDataset",
    "PathStarConfig",
    "SyntheticDataset",
    "TaskConfig",
    "TaskTokenizer",
    "Tokenizer",
    "auto_prepare",
    "iter_documents",
    "load_tokenizer",
    "measure_throughput",
    "open_datasets",
    "prepare",
    "validate_prepared",
]
