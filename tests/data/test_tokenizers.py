from pathlib import Path

import numpy as np
import pytest
from menagerie.data import BPETokenizer, ByteTokenizer, DataError, Tokenizer, load_tokenizer

SAMPLES = [
    "hello world",
    "naïve café — ünïcödé",
    "日本語のテキスト 🙂🚀",
    "",
    "def f(x):\n    return x\n",
]
TRAIN_TEXT = [
    "the quick brown fox jumps over the lazy dog. " * 20,
    "def main():\n    print('hello world')\n" * 20,
    "naïve café résumé — 日本語 🙂 " * 20,
]


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(iter(TRAIN_TEXT), vocab_size=400)


@pytest.mark.parametrize("text", SAMPLES)
def test_byte_round_trip_and_token_bytes(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == np.int32
    assert tok.decode(ids) == text
    assert tok.token_bytes[ids].sum() == len(text.encode("utf-8"))
    assert tok.decode(np.append(ids, tok.eos_id)) == text  # EOS is dropped


def test_byte_tokenizer_shape() -> None:
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    assert (tok.vocab_size, tok.eos_id, tok.token_bytes.shape) == (257, 256, (257,))
    assert tok.token_bytes[256] == 0 and (tok.token_bytes[:256] == 1).all()


@pytest.mark.parametrize("text", SAMPLES)
def test_bpe_round_trip_and_token_bytes(bpe: BPETokenizer, text: str) -> None:
    ids = bpe.encode(text)
    assert ids.dtype == np.int32
    assert bpe.decode(ids) == text
    assert bpe.token_bytes[ids].sum() == len(text.encode("utf-8"))


def test_bpe_learned_merges_and_eos(bpe: BPETokenizer) -> None:
    assert isinstance(bpe, Tokenizer)
    assert bpe.vocab_size == len(bpe.token_bytes) <= 400
    assert bpe.token_bytes[bpe.eos_id] == 0
    assert bpe.token_bytes.max() > 3  # merges happened
    assert len(bpe.encode(TRAIN_TEXT[0])) < len(TRAIN_TEXT[0]) / 3
    assert bpe.decode([*bpe.encode("ab"), bpe.eos_id]) == "ab"


def test_bpe_save_load(bpe: BPETokenizer, tmp_path: Path) -> None:
    bpe.save(tmp_path / "tokenizer.json")
    again = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert again.to_json() == bpe.to_json()
    for text in SAMPLES:
        np.testing.assert_array_equal(again.encode(text), bpe.encode(text))
    np.testing.assert_array_equal(again.token_bytes, bpe.token_bytes)


def test_load_tokenizer_errors(tmp_path: Path) -> None:
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(DataError, match="needs training texts"):
        load_tokenizer("bpe")
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing.json"))
    with pytest.raises(DataError, match="not 'byte', 'bpe'"):
        load_tokenizer("sentencepiece")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot load tokenizer"):
        load_tokenizer(str(tmp_path / "bad.json"))
