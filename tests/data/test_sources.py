import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pydantic
import pytest
from menagerie.data import DataConfig, DataError, iter_documents
from menagerie.data.sources import SourceReport, split_of


@pytest.fixture(scope="module")
def stdlib_docs() -> list[tuple[str, str]]:
    return list(iter_documents(DataConfig()))


def test_config_defaults_and_extra_forbid() -> None:
    cfg = DataConfig()
    assert (cfg.source, cfg.tokenizer, cfg.val_fraction, cfg.num_workers) == (
        "stdlib",
        "byte",
        0.05,
        0,
    )
    with pytest.raises(pydantic.ValidationError):
        DataConfig(sorce="x")
    with pytest.raises(pydantic.ValidationError):
        DataConfig(val_fraction=1.5)


def test_stdlib_nonempty_sorted_no_site_packages(stdlib_docs: list[tuple[str, str]]) -> None:
    ids = [doc_id for doc_id, _ in stdlib_docs]
    assert len(ids) > 500
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(i.endswith(".py") and "site-packages" not in i for i in ids)
    assert "json/__init__.py" in ids
    assert all(text for _, text in stdlib_docs)


def test_stdlib_deterministic_and_split(stdlib_docs: list[tuple[str, str]]) -> None:
    cfg = DataConfig()
    train = [d for d, _ in iter_documents(cfg, "train")]
    val = [d for d, _ in iter_documents(cfg, "validation")]
    assert sorted(train + val) == [d for d, _ in stdlib_docs]
    assert not set(train) & set(val)
    assert 0.02 < len(val) / len(stdlib_docs) < 0.1


def test_split_is_stable_when_files_are_added(text_folder: Path) -> None:
    cfg = DataConfig(source=str(text_folder), val_fraction=0.3)
    before = {d: split_of(d, 0.3) for d, _ in iter_documents(cfg)}
    assert set(before.values()) == {"train", "validation"}
    for i in range(10):
        (text_folder / f"new{i}.txt").write_text(f"new document {i}")
    after = {d: split_of(d, 0.3) for d, _ in iter_documents(cfg)}
    assert len(after) == len(before) + 10
    assert all(after[d] == s for d, s in before.items())
    val = {d for d, _ in iter_documents(cfg, "validation")}
    assert val == {d for d, s in after.items() if s == "validation"}


def test_text_folder(text_folder: Path) -> None:
    (text_folder / "notes.md").write_text("ignored: unknown extension inside a folder")
    (text_folder / "sub").mkdir()
    (text_folder / "sub" / "inner.txt").write_text("nested ünï")
    docs = dict(iter_documents(DataConfig(source=str(text_folder))))
    assert len(docs) == 21 and docs["sub/inner.txt"] == "nested ünï"
    assert list(docs) == sorted(docs)


def test_jsonl_and_parquet(tmp_path: Path) -> None:
    rows = [{"text": f"doc {i} ü", "id": i} for i in range(5)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    pq.write_table(
        pa.table({"body": [f"row {i}" for i in range(4)] + [None]}), tmp_path / "b.parquet"
    )
    docs = list(iter_documents(DataConfig(source=str(tmp_path / "a.jsonl"))))
    assert docs[0] == ("a.jsonl:1", "doc 0 ü") and len(docs) == 5
    docs = list(iter_documents(DataConfig(source=str(tmp_path / "b.parquet"), text_field="body")))
    assert docs == [(f"b.parquet:{i}", f"row {i}") for i in range(4)]


def test_source_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"does not exist; pass a \.txt/\.jsonl/\.parquet"):
        iter_documents(DataConfig(source=str(tmp_path / "nope.jsonl")))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="unknown extension '.csv'"):
        iter_documents(DataConfig(source=str(tmp_path / "x.csv")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .txt/.jsonl/.parquet files"):
        iter_documents(DataConfig(source=str(tmp_path / "empty")))
    (tmp_path / "a.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(DataError, match=r"a.jsonl:1 has no field 'text' \(has \['content'\]\)"):
        list(iter_documents(DataConfig(source=str(tmp_path / "a.jsonl"))))
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n{oops\n')
    with pytest.raises(DataError, match="b.jsonl:2 is not valid JSON"):
        list(iter_documents(DataConfig(source=str(tmp_path / "b.jsonl"))))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "c.parquet")
    with pytest.raises(DataError, match="has no column 'text'"):
        list(iter_documents(DataConfig(source=str(tmp_path / "c.parquet"))))
    with pytest.raises(DataError, match="split='test' is unknown"):
        iter_documents(DataConfig(), "test")


def test_single_txt_file_is_cut_after_line_ends(tmp_path: Path) -> None:
    text = "".join(f"line {i} of a book\n" for i in range(1000))
    (tmp_path / "book.txt").write_text(text)
    docs = list(iter_documents(DataConfig(source=str(tmp_path / "book.txt"))))
    assert "".join(t for _, t in docs) == text and all(t.endswith("\n") for _, t in docs)
    assert 90 <= len(docs) <= 101
    lines = text.splitlines(keepends=True)
    for doc_id, doc in docs:  # "name:first_line"
        name, first = doc_id.split(":")
        assert name == "book.txt" and doc.startswith(lines[int(first) - 1])
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "book.txt").write_text(text)  # inside a folder: one document
    assert list(iter_documents(DataConfig(source=str(tmp_path / "folder")))) == [("book.txt", text)]


def test_rows_whose_text_is_not_a_string_are_skipped_and_counted_once(tmp_path: Path) -> None:
    rows = [{"text": "a"}, {"text": None}, {"text": 12345}, {"text": {"x": 1}}, {"text": "b"}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.table({"text": ["c", None]}), tmp_path / "b.parquet")
    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "c.parquet")
    cfg = DataConfig(source=str(tmp_path), val_fraction=0.5)
    report = SourceReport()
    for split in ("train", "validation", None):  # read three times, counted once
        list(iter_documents(cfg, split, report))
    assert sorted(t for _, t in iter_documents(cfg)) == ["a", "b", "c"]
    assert report.non_string == {"a.jsonl": 3, "b.parquet": 1, "c.parquet": 3}
    assert report.line("text") == (
        "skipped 7 of 10 rows whose 'text' is not a string (null, number or object; first in "
        "a.jsonl)"
    )


def test_binary_and_non_utf8_files_are_counted(tmp_path: Path) -> None:
    (tmp_path / "ok.txt").write_text("fine")
    (tmp_path / "latin1.txt").write_bytes("déjà".encode("latin-1"))
    (tmp_path / "blob.txt").write_bytes(b"\x00\x01\x02")
    (tmp_path / "rows.jsonl").write_text('{"text": "lone \\udc80"}\n')
    report = SourceReport()
    docs = dict(iter_documents(DataConfig(source=str(tmp_path)), report=report))
    assert docs == {"latin1.txt": "d\ufffdj\ufffd", "ok.txt": "fine", "rows.jsonl:1": "lone \ufffd"}
    assert (report.binary, report.not_utf8) == ({"blob.txt"}, {"latin1.txt", "rows.jsonl"})
    assert SourceReport().line("text") is None


def test_corrupt_parquet_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really parquet PAR1")
    with pytest.raises(DataError, match=r"bad.parquet' is not a readable Parquet file \(") as e:
        list(iter_documents(DataConfig(source=str(tmp_path / "bad.parquet"))))
    assert "\n" not in str(e.value)
