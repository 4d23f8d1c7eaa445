"""`DataConfig`: where documents come from, how they are tokenized and split."""

from __future__ import annotations

import pydantic


class DataConfig(pydantic.BaseModel):
    """The `data:` section of a run config."""

    model_config = pydantic.ConfigDict(
        extra="forbid",
        use_attribute_docstrings=True,
        validate_assignment=True,
        allow_inf_nan=False,
        strict=True,
    )

    source: str = "stdlib"
    """Documents to train on. "stdlib": the running interpreter's standard-library `.py` files
    (site-packages excluded, sorted by relative path). Otherwise a path to a .txt/.jsonl/.parquet
    file, a folder of them (searched recursively, sorted), or a prepared folder holding
    `meta.json` (the output of `menagerie prepare`). In a folder each .txt file is a document; a
    .txt file given alone is cut after line ends into about 100 documents, so that both splits
    get some. Rows whose text is not a string and binary files are skipped, and bytes that are not
    UTF-8 become U+FFFD; prepare reports the counts in one line."""

    text_field: str = "text"
    """The JSONL key / Parquet column that holds a document's text."""

    tokenizer: str = "byte"
    """"byte" (UTF-8 bytes + EOS, vocab 257), "bpe" (train a byte-level BPE of `bpe_vocab_size`
    on the training split with HF `tokenizers`), or a path to a `tokenizer.json`."""

    bpe_vocab_size: int = pydantic.Field(4096, ge=258)
    """Vocabulary size of the BPE trained when `tokenizer == "bpe"` (includes `<|eos|>`)."""

    val_fraction: float = pydantic.Field(0.05, ge=0.0, lt=1.0)
    """Fraction of documents held out for validation. The split is a pure function of the sha1 of
    each document's identifier, so adding files never moves other documents between splits."""

    cache_dir: str | None = None
    """Where automatically prepared data goes. None: $MENAGERIE_CACHE, else ~/.cache/menagerie.
    Its entries are rebuilt when found broken; leftovers of interrupted prepares are removed."""

    num_workers: int = pydantic.Field(0, ge=0)
    """Grain read threads that build windows for the iterator. 0: built in-process, in order."""

    prefetch: int = pydantic.Field(2, ge=0)
    """Batches prepared ahead of the trainer by a background thread. 0: no prefetch thread."""
