import json
import os
import re
import socket
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from grain.sources import ArrayRecordDataSource
from menagerie.data import (
    BPETokenizer,
    DataConfig,
    DataError,
    PackedDataset,
    auto_prepare,
    iter_documents,
    prepare,
    validate_prepared,
)


@pytest.fixture
def prepared(text_folder: Path, tmp_path: Path) -> tuple[DataConfig, Path]:
    cfg = DataConfig(source=str(text_folder), val_fraction=0.3)
    return cfg, prepare(cfg, tmp_path / "out")


def test_meta_lengths_and_records(prepared: tuple[DataConfig, Path]) -> None:
    cfg, out = prepared
    meta = json.loads((out / "meta.json").read_text())
    assert meta == validate_prepared(out)
    assert (meta["vocab_size"], meta["eos_id"], meta["dtype"]) == (257, 256, "<u2")
    assert meta["tokenizer"]["kind"] == "byte" and meta["format_version"] == 1
    for split in ("train", "validation"):
        docs = list(iter_documents(cfg, split))
        info = meta["splits"][split]
        lengths = np.load(out / split / "lengths.npy")
        source = ArrayRecordDataSource([str(out / s) for s in info["shards"]])
        assert info["num_docs"] == len(docs) == len(lengths) == len(source) > 0
        assert info["num_tokens"] == lengths.sum()
        assert info["num_bytes"] == sum(len(t.encode()) for _, t in docs)
        for i, (_, text) in enumerate(docs):
            ids = np.frombuffer(source[i], "<u2")
            assert len(ids) == lengths[i] and ids[-1] == 256
            assert (
                ids[:-1].tobytes() == np.frombuffer(text.encode(), np.uint8).astype("<u2").tobytes()
            )
    assert not list(out.glob(".meta.json.tmp*"))


def test_refuses_non_empty_folder_and_force_keeps_foreign_files(
    prepared: tuple[DataConfig, Path],
) -> None:
    cfg, out = prepared
    with pytest.raises(DataError, match="is not empty; .* or --force to replace"):
        prepare(cfg, out)
    (out / "mine.txt").write_text("keep me")
    prepare(cfg, out, force=True)
    assert (out / "mine.txt").read_text() == "keep me"
    validate_prepared(out)


def test_corrupt_folders_raise_one_line(prepared: tuple[DataConfig, Path]) -> None:
    _, out = prepared
    meta = (out / "meta.json").read_text()
    (out / "meta.json").write_text(meta[: len(meta) // 2])
    for check in (validate_prepared, lambda d: PackedDataset(d, "train", 8)):
        with pytest.raises(DataError, match="meta.json' is corrupt") as e:
            check(out)
        assert "\n" not in str(e.value)
    (out / "meta.json").write_text(meta)
    np.save(out / "train" / "lengths.npy", np.load(out / "train" / "lengths.npy")[:-1])
    with pytest.raises(DataError, match="lengths.npy' has"):
        validate_prepared(out)
    (out / "meta.json").unlink()
    with pytest.raises(DataError, match="has no meta.json"):
        validate_prepared(out)


def test_missing_shard(prepared: tuple[DataConfig, Path]) -> None:
    _, out = prepared
    (out / "validation" / "shard-00000.array_record").unlink()
    with pytest.raises(DataError, match="shard .* is missing"):
        validate_prepared(out)


def test_empty_split_and_corpus(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    for i in range(3):
        (tmp_path / "c" / f"{i}.txt").write_text(f"document {i}")
    cfg = DataConfig(source=str(tmp_path / "c"), val_fraction=0.0)
    with pytest.raises(
        DataError, match=r"validation split is empty: 3 documents with val_fraction"
    ):
        prepare(cfg, tmp_path / "out")
    with pytest.raises(DataError, match=r"train split is empty: 3 documents .* lower data.val"):
        prepare(cfg.model_copy(update={"val_fraction": 0.99999}), tmp_path / "out", force=True)
    assert not (tmp_path / "out" / "meta.json").exists()
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "empty.txt").write_text("")
    with pytest.raises(DataError, match="no non-empty documents"):
        prepare(DataConfig(source=str(tmp_path / "e")), tmp_path / "out2")


def test_bpe_prepare(text_folder: Path, tmp_path: Path) -> None:
    cfg = DataConfig(source=str(text_folder), tokenizer="bpe", bpe_vocab_size=300, val_fraction=0.3)
    out = prepare(cfg, tmp_path / "out")
    meta = validate_prepared(out)
    assert meta["tokenizer"]["kind"] == "bpe" and (out / "tokenizer.json").is_file()
    ds = PackedDataset(out, "train", seq_len=16)
    assert isinstance(ds.tokenizer, BPETokenizer) and ds.tokenizer.vocab_size == meta["vocab_size"]
    docs = [t for _, t in iter_documents(cfg, "train")]
    lengths = np.load(out / "train" / "lengths.npy")
    assert lengths[0] == len(ds.tokenizer.encode(docs[0])) + 1
    assert meta["splits"]["train"]["num_bytes"] == sum(len(t.encode()) for t in docs)
    batch = next(ds.eval_batches(2, 1))
    text = ds.tokenizer.decode(batch["tokens"][0])
    assert docs[0].startswith(text)


def test_auto_prepare_caches(text_folder: Path, cache_env: Path) -> None:
    cfg = DataConfig(source=str(text_folder), val_fraction=0.3)
    first = auto_prepare(cfg)
    assert first.parent == cache_env / "prepared" and first.name.startswith("corpus-byte-")
    stamp = (first / "meta.json").stat().st_mtime_ns
    assert auto_prepare(cfg) == first and (first / "meta.json").stat().st_mtime_ns == stamp
    assert auto_prepare(DataConfig(source=str(text_folder), val_fraction=0.4)) != first
    assert auto_prepare(DataConfig(source=str(first))) == first  # a prepared folder as source
    (text_folder / "extra.txt").write_text("a new document changes the source identity")
    assert auto_prepare(cfg) != first
    (first / "meta.json").unlink()  # a broken cache entry is redone
    (text_folder / "extra.txt").unlink()
    assert auto_prepare(cfg) == first and validate_prepared(first)


def test_auto_prepare_concurrent(text_folder: Path, cache_env: Path) -> None:
    cfg = DataConfig(source=str(text_folder), val_fraction=0.3)
    results: list[Path | BaseException] = []

    def run() -> None:
        try:
            results.append(auto_prepare(cfg))
        except BaseException as e:  # noqa: BLE001 - surfaced by the assert below
            results.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and isinstance(results[0], Path), results
    assert [p.name for p in (cache_env / "prepared").iterdir() if not p.name.endswith(".lock")] == [
        results[0].name
    ]


@pytest.mark.parametrize("val_fraction", [0.0, 0.999])
def test_empty_split_advice_names_a_fraction_that_works(tmp_path: Path, val_fraction) -> None:
    (tmp_path / "c").mkdir()
    for i in range(5):
        (tmp_path / "c" / f"{i}.txt").write_text(f"document {i}")
    cfg = DataConfig(source=str(tmp_path / "c"), val_fraction=val_fraction)
    with pytest.raises(DataError, match=r"(raise|lower) data.val_fraction to at (least|most)") as e:
        prepare(cfg, tmp_path / "out")
    advised = float(re.search(r"at (?:least|most) ([0-9.e-]+),", str(e.value))[1])
    meta = prepare(cfg.model_copy(update={"val_fraction": advised}), tmp_path / "out")
    assert all(s["num_docs"] for s in validate_prepared(meta)["splits"].values())
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "0.txt").write_text("alone")
    with pytest.raises(DataError, match="holds 1 document, and a train and a validation split"):
        prepare(DataConfig(source=str(tmp_path / "one")), tmp_path / "out2")


def test_failed_prepare_leaves_nothing_and_stale_temporaries_go(tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "0.txt").write_text("alone")
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(DataError, match="holds 1 document"):
        prepare(DataConfig(source=str(tmp_path / "one")), out)
    assert not (tmp_path / "a").exists()  # nor the parents made for it
    dead = _dead_pid()
    stale = out.parent / f"out.tmp-{socket.gethostname()}-{dead}"
    live = out.parent / f"out.tmp-{socket.gethostname()}-{os.getpid()}-other"  # not ours: kept
    other_host = out.parent / f"out.tmp-elsewhere-{dead}"  # another host's: kept
    for d in (stale, live, other_host):
        d.mkdir(parents=True)
    for i in range(1, 20):
        (tmp_path / "one" / f"{i}.txt").write_text(f"document {i}")
    prepare(DataConfig(source=str(tmp_path / "one"), val_fraction=0.3), out)
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(
        ["out", live.name, other_host.name]
    )


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_truncated_shard_and_edited_meta_are_found_on_open(
    prepared: tuple[DataConfig, Path],
) -> None:
    _, out = prepared
    meta = (out / "meta.json").read_text()
    edited = json.loads(meta)
    edited["splits"]["train"]["num_docs"] += 1
    (out / "meta.json").write_text(json.dumps(edited))
    with pytest.raises(DataError, match="meta.json' was edited after prepare"):
        validate_prepared(out)
    (out / "meta.json").write_text(meta)
    shard = out / "train" / "shard-00000.array_record"
    raw = shard.read_bytes()
    shard.write_bytes(raw[:-10])
    with pytest.raises(DataError, match=f"'{shard}' has {len(raw) - 10} bytes but meta.json"):
        validate_prepared(out)
    shard.write_bytes(raw)
    validate_prepared(out)


def test_auto_prepare_rebuilds_a_corrupt_cache_entry(
    text_folder: Path, cache_env: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = DataConfig(source=str(text_folder), val_fraction=0.3)
    entry = auto_prepare(cfg)
    assert f"into '{entry}'" in capsys.readouterr().out
    (entry / "validation" / "shard-00000.array_record").write_bytes(b"")
    assert auto_prepare(cfg) == entry and validate_prepared(entry)
    out = capsys.readouterr().out
    assert f"note: '{entry}/validation/shard-00000.array_record' has 0 bytes but meta.json" in out
    assert "; rebuilding this cached copy\n" in out
    assert [p.name for p in (cache_env / "prepared").iterdir() if not p.name.endswith(".lock")] == [
        entry.name
    ]


def test_prepare_into_an_existing_folder_builds_inside_it(text_folder: Path, tmp_path) -> None:
    """--force into an existing folder needs no write access to its parent: nothing is made
    beside it, and the leftover of an interrupted prepare inside it is removed."""
    out = tmp_path / "parent" / "out"
    (out / f".prepare.tmp-{socket.gethostname()}-{_dead_pid()}").mkdir(parents=True)
    (out / "mine.txt").write_text("keep me")
    prepare(DataConfig(source=str(text_folder), val_fraction=0.3), out, force=True)
    assert [p.name for p in out.parent.iterdir()] == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "mine.txt", "train", "validation"]
    validate_prepared(out)
