"""menagerie.data: tokenizers, document sources, prepared ArrayRecord shards, packed Grain batches.

cfg = DataConfig(source="stdlib", tokenizer="byte")
ds = PackedDataset(auto_prepare(cfg), "train", seq_len=1024)
for batch in ds.batches(global_batch_size=8, seed=0, start_step=step): ...
"""

from .config import DataConfig
from .errors import DataError
from .pipeline import PackedDataset, measure_throughput
from .prepare import auto_prepare, prepare, validate_prepared
from .sources import iter_documents
from .tokenizers import BPETokenizer, ByteTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "DataConfig",
    "DataError",
    "PackedDataset",
    "Tokenizer",
    "auto_prepare",
    "iter_documents",
    "load_tokenizer",
    "measure_throughput",
    "prepare",
    "validate_prepared",
]
