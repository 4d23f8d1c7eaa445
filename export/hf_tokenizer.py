"""Our tokenizers as Hugging Face tokenizer files, and a Hugging Face tokenizer.json as ours.

Export (`write_tokenizer`): tokenizer.json, tokenizer_config.json and special_tokens_map.json,
which `AutoTokenizer.from_pretrained` loads as a `PreTrainedTokenizerFast` encoding text to our
ids.
- byte: a `tokenizers` BPE with no merges over the 256 characters of GPT-2's byte-to-unicode
  map (the ByteLevel pre-tokenizer's alphabet), character of byte b -> id b, and `<|eos|>` as
  special token 256: every text encodes to its UTF-8 bytes, as `ByteTokenizer` does. Ours reads
  the text "<|eos|>" as 7 bytes, so tokenizer_config.json sets `split_special_tokens` (HF then
  does too; `tokenizers` keeps no such flag in tokenizer.json).
- bpe: its own tokenizer.json (a `tokenizers` file already).

Import (`read_tokenizer`): a folder's tokenizer.json is either the byte tokenizer above (->
data.tokenizer "byte") or a byte-level BPE (ByteLevel pre-tokenizer, BPE model: -> its JSON,
saved in the run folder). Any other (SentencePiece-style Metaspace BPE, WordPiece, Unigram) is
refused: bits per byte count the bytes of byte-level tokens (`BPETokenizer.token_bytes`). Our
end-of-document token is `<|eos|>`; a BPE whose end-of-text token is another (config.json
`eos_token_id`) gets it renamed to `<|eos|>`, same id, in the copy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from menagerie.data.tokenizers import (
    EOS_TOKEN,
    BPETokenizer,
    ByteTokenizer,
    _byte_level_alphabet,
)
from menagerie.train.errors import ConfigError


def byte_tokenizer_json() -> str:
    """The `tokenizers` JSON of `ByteTokenizer` (see the module docstring)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab=dict(_byte_level_alphabet()), merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOS_TOKEN, special=True)])
    return tok.to_str()


def write_tokenizer(tokenizer: Any, out_dir: Path, max_length: int) -> None:
    """The HF tokenizer files of our `tokenizer` (byte or BPE) into `out_dir`."""
    if isinstance(tokenizer, ByteTokenizer):
        text, split_special = byte_tokenizer_json(), True
    elif isinstance(tokenizer, BPETokenizer):
        text, split_special = tokenizer._tok.to_str(), False
    else:
        raise ConfigError(
            f"--format hf writes byte and BPE tokenizers; this run's is {type(tokenizer).__name__}"
        )
    (out_dir / "tokenizer.json").write_text(text)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN,
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": split_special,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"eos_token": EOS_TOKEN}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


@dataclass(frozen=True)
class ImportedTokenizer:
    """What `import-hf` sets data.tokenizer from: "byte", or a BPE's tokenizer.json text."""

    kind: str  # "byte" | "bpe"
    vocab_size: int
    json: str | None = None


def read_tokenizer(model_dir: Path, hf_config: dict) -> ImportedTokenizer:
    """The tokenizer of a Hugging Face folder as ours; ConfigError (one line) if ours cannot
    represent it or the model's vocabulary (`hf_config["vocab_size"]`) cannot hold its ids."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(
            f"'{model_dir}' has no tokenizer.json (a fast tokenizer); menagerie reads byte-level "
            "BPE tokenizer.json files (a slow SentencePiece tokenizer.model cannot be mapped)"
        )
    try:
        spec = json.loads(path.read_text())
        if not isinstance(spec.get("model"), dict):
            raise ValueError("it has no 'model' section")
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"cannot read '{path}' as a tokenizer.json: {e}") from None
    ours = json.loads(byte_tokenizer_json())
    if _same_tokens(spec, ours):
        tok = ImportedTokenizer("byte", ByteTokenizer.vocab_size)
    else:
        tok = _byte_level_bpe(spec, path, hf_config)
    if tok.vocab_size > hf_config["vocab_size"]:
        raise ConfigError(
            f"'{path}' holds {tok.vocab_size} tokens but the model's embedding has "
            f"vocab_size={hf_config['vocab_size']} rows; its ids cannot all be mapped"
        )
    return tok


def _same_tokens(spec: dict, byte_spec: dict) -> bool:
    """Whether `spec` is our byte tokenizer: same BPE vocabulary, no merges, `<|eos|>` at 256."""
    added = [(t.get("id"), t.get("content")) for t in spec.get("added_tokens") or []]
    return (
        spec["model"].get("type") == "BPE"
        and spec["model"].get("vocab") == byte_spec["model"]["vocab"]
        and not spec["model"].get("merges")
        and added == [(ByteTokenizer.eos_id, EOS_TOKEN)]
        and _has_byte_level(spec)
    )


def _has_byte_level(spec: dict) -> bool:
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return any(s.get("type") == "ByteLevel" for s in steps)


def _byte_level_bpe(spec: dict, path: Path, hf_config: dict) -> ImportedTokenizer:
    """A byte-level BPE tokenizer.json as ours (its end-of-text token renamed `<|eos|>`)."""
    from tokenizers import Tokenizer

    kind = spec["model"].get("type")
    if kind != "BPE" or not _has_byte_level(spec):
        pre = (spec.get("pre_tokenizer") or {}).get("type")
        raise ConfigError(
            f"'{path}' is a {kind} tokenizer with {pre} pre-tokenization; menagerie maps only "
            "byte-level BPE (ByteLevel pre-tokenizer), whose tokens it can count in bytes"
        )
    tok = Tokenizer.from_str(json.dumps(spec))
    if tok.token_to_id(EOS_TOKEN) is None:
        old = _eos_token(tok, hf_config, path)
        spec = _renamed(spec, old, EOS_TOKEN)
        tok = Tokenizer.from_str(json.dumps(spec))
    text = json.dumps(spec, ensure_ascii=False)
    size = max(tok.get_vocab(with_added_tokens=True).values()) + 1
    return ImportedTokenizer("bpe", max(size, tok.get_vocab_size(with_added_tokens=True)), text)


def _eos_token(tok: Any, hf_config: dict, path: Path) -> str:
    """The text of the model's end-of-text token (config.json `eos_token_id`, first if a list)."""
    eos = hf_config.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos
    text = tok.id_to_token(eos) if isinstance(eos, int) else None
    if text is None:
        raise ConfigError(
            f"'{path}' has no {EOS_TOKEN} token and config.json names no end-of-text token in "
            f"it (eos_token_id={hf_config.get('eos_token_id')!r}); menagerie needs one to end "
            "documents"
        )
    return text


def _renamed(tree: Any, old: str, new: str) -> Any:
    """`tree` with every string (key or value) equal to `old` replaced by `new`."""
    if isinstance(tree, dict):
        return {(new if k == old else k): _renamed(v, old, new) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_renamed(v, old, new) for v in tree]
    return new if tree == old else tree
