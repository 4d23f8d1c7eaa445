import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from menagerie.data import DataConfig, DataError, PackedDataset, prepare
from menagerie.data.pipeline import measure_throughput
from synthetic_corpus import unique_docs, write_token_folder

LENGTHS = [3, 40, 7, 1, 25, 90, 12, 5, 60, 2, 33, 18]  # 296 tokens


@pytest.fixture
def synthetic(tmp_path: Path) -> Path:
    return write_token_folder(tmp_path / "syn", unique_docs(LENGTHS))


def epoch_windows(ds: PackedDataset, epoch: int, seed: int = 0) -> list[dict]:
    w = ds.windows_per_epoch
    return [ds.window(i, seed=seed) for i in range(epoch * w, (epoch + 1) * w)]


def check_rows(rows: list[dict], lengths: list[int]) -> None:
    """Every row is a valid cut of a stream of whole documents with unique token ids."""
    starts = np.cumsum([0, *lengths])
    for r in rows:
        tok, tgt, seg, pos, mask = (
            r[k] for k in ("tokens", "targets", "segment_ids", "positions", "loss_mask")
        )
        assert tok.dtype == tgt.dtype == seg.dtype == pos.dtype == np.int32
        assert mask.dtype == np.float32
        np.testing.assert_array_equal(tok[1:], tgt[:-1])  # shifted by one
        doc = np.searchsorted(starts, np.append(tok, tgt[-1]), side="right") - 1
        offset = np.append(tok, tgt[-1]) - starts[doc]
        new_seg = np.flatnonzero(np.diff(doc[:-1]) != 0) + 1
        # Segments change exactly where the document changes, numbered 1, 2, ...
        np.testing.assert_array_equal(np.flatnonzero(np.diff(seg) != 0) + 1, new_seg)
        assert seg[0] == 1 and (np.diff(seg) >= 0).all() and seg.min() >= 1
        # A new document inside a row starts at its first token, after the previous one's EOS.
        assert (offset[new_seg] == 0).all()
        assert (offset[new_seg - 1] == np.asarray(lengths)[doc[new_seg - 1]] - 1).all()
        # Within a segment ids are consecutive; positions restart at every segment start.
        same = doc[1:] == doc[:-1]
        assert (np.diff(np.append(tok, tgt[-1]))[same] == 1).all()
        seg_start = np.concatenate([[0], new_seg])
        expected_pos = np.arange(len(tok)) - np.repeat(seg_start, np.diff([*seg_start, len(tok)]))
        np.testing.assert_array_equal(pos, expected_pos)
        # Loss only where input and target share a document: zero exactly at document ends.
        np.testing.assert_array_equal(mask, same.astype(np.float32))
        assert mask[(offset[:-1] == np.asarray(lengths)[doc[:-1]] - 1)].sum() == 0


def check_epoch_coverage(ds: PackedDataset, lengths: list[int], epoch: int) -> np.ndarray:
    rows = epoch_windows(ds, epoch)
    seen = np.concatenate([np.append(r["tokens"], r["targets"][-1]) for r in rows])
    total = sum(lengths)
    assert len(seen) == len(set(seen.tolist())) == ds.windows_per_epoch * (ds.seq_len + 1)
    assert total - len(seen) < ds.seq_len + 1  # only the stream's tail is dropped
    assert set(seen.tolist()) <= set(range(total))
    check_rows(rows, lengths)
    return np.array([r["tokens"][0] for r in rows])


def test_epoch_covers_every_token_once_and_epochs_differ(synthetic: Path) -> None:
    ds = PackedDataset(synthetic, "train", seq_len=15)
    assert ds.windows_per_epoch == sum(LENGTHS) // 16 and ds.num_tokens == sum(LENGTHS)
    firsts = [check_epoch_coverage(ds, LENGTHS, e) for e in range(3)]
    assert not np.array_equal(firsts[0], firsts[1]) and not np.array_equal(firsts[1], firsts[2])
    assert not np.array_equal(firsts[0], np.sort(firsts[0]))  # windows are shuffled
    # Documents are re-permuted each epoch: which document follows which changes.
    starts = np.cumsum([0, *LENGTHS])

    def neighbours(epoch: int) -> set[tuple[int, int]]:
        pairs = set()
        for r in epoch_windows(ds, epoch):
            doc = np.searchsorted(starts, r["tokens"], side="right") - 1
            pairs |= {(int(a), int(b)) for a, b in zip(doc[:-1], doc[1:], strict=True) if a != b}
        return pairs

    assert neighbours(0) != neighbours(1) != neighbours(2)


def test_seq_len_one_and_documents_longer_than_windows(tmp_path: Path) -> None:
    for seq_len in (1, 4):
        ds = PackedDataset(
            write_token_folder(tmp_path / str(seq_len), unique_docs(LENGTHS)), "train", seq_len
        )
        check_epoch_coverage(ds, LENGTHS, 0)


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 60), min_size=1, max_size=25),
    seq_len=st.integers(1, 40),
    seed=st.integers(0, 2**32),
)
def test_packing_property(lengths: list[int], seq_len: int, seed: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_token_folder(Path(tmp), unique_docs(lengths))
        if sum(lengths) < seq_len + 1:
            with pytest.raises(DataError, match="fewer than one window"):
                PackedDataset(folder, "train", seq_len)
            return
        ds = PackedDataset(folder, "train", seq_len)
        check_epoch_coverage(ds, lengths, 0)
        batch = next(ds.batches(2, seed=seed))
        check_rows([{k: v[i] for k, v in batch.items()} for i in range(2)], lengths)


def test_batches_are_pure_functions_of_seed_and_step(synthetic: Path) -> None:
    def take(ds: PackedDataset, n: int, **kw) -> list[dict]:
        it = ds.batches(4, seed=7, **kw)
        return [next(it) for _ in range(n)]

    a = take(PackedDataset(synthetic, "train", 15), 12)
    b = take(PackedDataset(synthetic, "train", 15, num_workers=2, prefetch=0), 12)
    resumed = take(PackedDataset(synthetic, "train", 15), 7, start_step=5)
    other_seed = next(PackedDataset(synthetic, "train", 15).batches(4, seed=8))
    for x, y in zip(a, b, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    for x, y in zip(a[5:], resumed, strict=True):
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
    assert a[0]["tokens"].shape == (4, 15) and a[0]["loss_mask"].shape == (4, 15)
    assert not np.array_equal(a[0]["tokens"], other_seed["tokens"])
    check_rows([{k: v[i] for k, v in x.items()} for x in a for i in range(4)], LENGTHS)


def test_process_slices_concatenate_to_global_batch(synthetic: Path) -> None:
    ds = PackedDataset(synthetic, "train", 15)
    full = [next(ds.batches(4, seed=3, start_step=s)) for s in range(3)]
    for count in (2, 4):
        for step in range(3):
            parts = [
                next(ds.batches(4, seed=3, start_step=step, process_index=p, process_count=count))
                for p in range(count)
            ]
            for k in full[step]:
                np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), full[step][k])
    with pytest.raises(DataError, match="not a positive multiple of the process count 3"):
        ds.batches(4, seed=0, process_count=3)


def test_num_epochs_and_eval_batches(synthetic: Path) -> None:
    ds = PackedDataset(synthetic, "train", 15)
    batches = list(ds.batches(3, seed=0, num_epochs=2))
    assert len(batches) == 2 * ds.windows_per_epoch // 3
    ev1 = list(ds.eval_batches(3, 4))
    ev2 = list(ds.eval_batches(3, 4))
    assert len(ev1) == 4
    for x, y in zip(ev1, ev2, strict=True):
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
    # Unshuffled: the first eval window is the start of the corpus in order.
    np.testing.assert_array_equal(ev1[0]["tokens"][0], np.arange(15))
    assert len(list(ds.eval_batches(3))) == ds.windows_per_epoch // 3


def test_small_corpus_and_bad_args(synthetic: Path) -> None:
    with pytest.raises(DataError, match="fewer than one window of seq_len\\+1=300"):
        PackedDataset(synthetic, "train", 299)
    with pytest.raises(DataError, match="split='test' is unknown"):
        PackedDataset(synthetic, "test", 8)


def test_prepared_text_round_trip(text_folder: Path, tmp_path: Path) -> None:
    cfg = DataConfig(source=str(text_folder), val_fraction=0.3)
    ds = PackedDataset(prepare(cfg, tmp_path / "out"), "validation", 64)
    from menagerie.data import iter_documents

    stream = "".join(t + "\0" for _, t in iter_documents(cfg, "validation")).encode()
    row = next(ds.eval_batches(1, 1))
    tokens = row["tokens"][0]
    expected = np.frombuffer(stream[:64], np.uint8).astype(np.int32)
    np.testing.assert_array_equal(np.where(tokens == 256, 0, tokens), expected)
    assert ds.token_bytes[row["targets"]].sum() == (row["targets"] != 256).sum()


def test_stdlib_throughput(tmp_path_factory: pytest.TempPathFactory) -> None:
    out = prepare(DataConfig(), tmp_path_factory.mktemp("stdlib"))
    result = measure_throughput(out, seq_len=1024, batch_size=4, num_batches=100)
    print(f"\nstdlib byte-level, seq 1024 x batch 4: {result['tokens_per_s'] / 1e6:.2f}M tokens/s")
    assert result["tokens_per_s"] > 1e5  # >> 10x a CPU trainer; a loose floor, not a benchmark


def test_a_record_that_disagrees_with_lengths_is_an_error(tmp_path: Path) -> None:
    folder = write_token_folder(tmp_path / "syn", unique_docs([5, 7, 9]))
    lengths = np.load(folder / "train" / "lengths.npy")
    np.save(folder / "train" / "lengths.npy", lengths[[1, 0, 2]])  # same count, same sum
    ds = PackedDataset(folder, "train", 4)
    match = "record 0 of .* has 20 bytes, but lengths.npy says 7 tokens; rerun `menagerie prepare`"
    with pytest.raises(DataError, match=match):
        ds.window(0, seed=0, shuffle=False)
    with pytest.raises(DataError, match="lengths.npy says"):  # through Grain's iterators too
        list(ds.batches(1, seed=0, num_epochs=1))
