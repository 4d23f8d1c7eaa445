"""Tokenizers: UTF-8 bytes, or a byte-level BPE trained with Hugging Face `tokenizers`.

Both append nothing themselves; `prepare` appends `eos_id` after every document. `token_bytes[i]`
is the UTF-8 length of token i (0 for special tokens), so bits-per-byte of a batch is
`loss_sum / (ln 2 * token_bytes[targets].sum())`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .errors import DataError

EOS_TOKEN = "<|eos|>"


@runtime_checkable
class Tokenizer(Protocol):
    """What the pipeline and the trainer need from a tokenizer."""

    vocab_size: int
    eos_id: int
    token_bytes: np.ndarray  # [vocab_size] int32, UTF-8 bytes per token, 0 for special tokens

    def encode(self, text: str) -> np.ndarray:
        """Token ids [n] int32 of `text` (no EOS appended)."""
        ...

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """`encode` of each text."""
        ...

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text of `ids`; special tokens are dropped, invalid UTF-8 becomes U+FFFD."""
        ...

    def to_json(self) -> dict[str, Any]:
        """Identity recorded in meta.json; equal dicts mean equal tokenizers."""
        ...


class ByteTokenizer:
    """Ids 0..255 are the UTF-8 bytes; 256 is EOS."""

    vocab_size = 257
    eos_id = 256

    def __init__(self) -> None:
        self.token_bytes = np.ones(self.vocab_size, np.int32)
        self.token_bytes[self.eos_id] = 0

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids)
        return ids[ids < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def to_json(self) -> dict[str, Any]:
        return {"kind": "byte", "vocab_size": self.vocab_size}


def _byte_level_alphabet() -> dict[str, int]:
    """Inverse of GPT-2's `bytes_to_unicode`, the map HF's ByteLevel pre-tokenizer uses."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class BPETokenizer:
    """Byte-level BPE (GPT-2 style) with one special token, `<|eos|>`."""

    def __init__(self, hf_tokenizer: Any) -> None:
        self._tok = hf_tokenizer
        eos = hf_tokenizer.token_to_id(EOS_TOKEN)
        if eos is None:
            raise DataError(
                f"tokenizer has no {EOS_TOKEN!r} token; train it with tokenizer='bpe' or add "
                f"{EOS_TOKEN!r} as a special token"
            )
        self.eos_id = int(eos)
        self.vocab_size = int(hf_tokenizer.get_vocab_size(with_added_tokens=True))
        alphabet = _byte_level_alphabet()
        special = {t.content for t in hf_tokenizer.get_added_tokens_decoder().values()}
        self.token_bytes = np.zeros(self.vocab_size, np.int32)
        for token, i in hf_tokenizer.get_vocab(with_added_tokens=True).items():
            if token in special:
                continue
            # A byte-level token is a string over the 256-char alphabet, one char per byte;
            # decoding the id alone would turn partial UTF-8 into U+FFFD and miscount.
            self.token_bytes[i] = sum(1 for c in token if c in alphabet)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Trains on `texts` (any iterable, read once)."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def from_file(cls, path: str | Path) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if not path.is_file():
            raise DataError(
                f"tokenizer file '{path}' does not exist; pass 'byte', 'bpe' or a tokenizer.json"
            )
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as e:  # HF raises its own Exception type for malformed files.
            raise DataError(f"cannot load tokenizer '{path}': {e}; pass a HF tokenizer.json") from e

    def save(self, path: str | Path) -> None:
        self._tok.save(str(path))

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text).ids, np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, np.int32) for e in self._tok.encode_batch(list(texts))]

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def to_json(self) -> dict[str, Any]:
        digest = hashlib.sha1(self._tok.to_str().encode()).hexdigest()
        return {"kind": "bpe", "vocab_size": self.vocab_size, "sha1": digest}


def load_tokenizer(
    spec: str, *, train_texts: Iterable[str] | None = None, vocab_size: int = 4096
) -> Tokenizer:
    """ "byte", "bpe" (trained on `train_texts` to `vocab_size`) or a path to a tokenizer.json."""
    if spec == "byte":
        return ByteTokenizer()
    if spec == "bpe":
        if train_texts is None:
            raise DataError("tokenizer='bpe' needs training texts; call it through prepare()")
        return BPETokenizer.train(train_texts, vocab_size)
    path = Path(spec).expanduser()
    if path.suffix != ".json" and not path.is_file():
        raise DataError(
            f"data.tokenizer={spec!r} is not 'byte', 'bpe' or an existing tokenizer.json path"
        )
    return BPETokenizer.from_file(path)


def tokenizer_from_meta(meta: dict[str, Any], folder: Path) -> Tokenizer:
    """The tokenizer a prepared folder was made with (its kind and vocabulary size checked; not
    its sha1, which a newer `tokenizers` may serialise differently)."""
    recorded = meta["tokenizer"]
    if recorded["kind"] == "byte":
        tok: Tokenizer = ByteTokenizer()
    else:
        tok = BPETokenizer.from_file(folder / "tokenizer.json")
    found = tok.to_json()
    if (found["kind"], found["vocab_size"]) != (recorded["kind"], recorded["vocab_size"]):
        raise DataError(
            f"'{folder}/tokenizer.json' is a {found['kind']} tokenizer of {found['vocab_size']} "
            f"tokens, but the folder was prepared with a {recorded['kind']} tokenizer of "
            f"{recorded['vocab_size']}; rerun `menagerie prepare` into it with --force"
        )
    return tok
