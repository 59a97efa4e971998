"""Sources in every format, and bad input counted and skipped with file:line, never a crash."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import pytest

from crucible.trainer.config.data import SourceConfig
from crucible.trainer.data.readers import DocumentReader, SourceError, list_inputs
from crucible.trainer.storage import Storage

from .conftest import write_jsonl

RECORDS = [{"text": f"document number {i}", "id": f"id-{i}", "meta": i} for i in range(5)]


def _read(*sources: SourceConfig, max_doc_chars: int = 1000) -> tuple[list, DocumentReader]:
    reader = DocumentReader(Storage(), max_doc_chars)
    docs = [d for item in list_inputs(list(sources), Storage()) for d in reader.read(item)]
    return docs, reader


@pytest.mark.parametrize("compress", [None, "gzip", "zstd"])
def test_jsonl_plain_and_compressed(tmp_path: Path, compress: str | None) -> None:
    suffix = {None: ".jsonl", "gzip": ".jsonl.gz", "zstd": ".jsonl.zst"}[compress]
    write_jsonl(tmp_path / f"part{suffix}", RECORDS, compress)
    docs, reader = _read(SourceConfig(name="web", uri=str(tmp_path), id_field="id", domain="news"))
    assert [d.text for d in docs] == [r["text"] for r in RECORDS]
    assert [d.id for d in docs] == [r["id"] for r in RECORDS]
    assert {d.domain for d in docs} == {"news"}
    assert reader.records["web"] == 5 and not reader.errors.counts


def test_parquet_text_folder_glob_and_custom_field(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["parquet one", "parquet two"], "key": ["p1", "p2"]}), tmp_path / "a.parquet")
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "b.txt").write_text("a whole text file")
    (tmp_path / "txt" / "c.md").write_text("markdown file")
    (tmp_path / "txt" / "skip.bin").write_bytes(b"\x00")
    write_jsonl(tmp_path / "g" / "x-1.jsonl", [{"text": "glob one"}])
    write_jsonl(tmp_path / "g" / "y-1.jsonl", [{"text": "not matched"}])
    docs, _reader = _read(
        SourceConfig(name="pq", uri=str(tmp_path / "a.parquet"), text_field="body", id_field="key"),
        SourceConfig(name="txt", uri=str(tmp_path / "txt")),
        SourceConfig(name="glob", uri=str(tmp_path / "g" / "x-*.jsonl")),
    )
    assert [(d.source, d.id, d.text) for d in docs] == [
        ("pq", "p1", "parquet one"),
        ("pq", "p2", "parquet two"),
        ("txt", "txt/b.txt", "a whole text file"),
        ("txt", "txt/c.md", "markdown file"),
        ("glob", "glob/x-1.jsonl:1", "glob one"),
    ]
    keys = [d.key for d in docs]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)


def test_bad_input_is_counted_with_location(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lines = [
        b'{"text": "good one"}',
        b'{"text": "bad \xff\xfe utf8"}',
        b"{not json",
        b"[1, 2, 3]",
        b'{"body": "no text field"}',
        b'{"text": 42}',
        b'{"text": "   "}',
        b'{"text": "' + b"x" * 50 + b'"}',
        b'{"text": "lone \\ud800 surrogate"}',
        b"",
        b'{"text": "good two"}',
    ]
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "empty.jsonl").write_bytes(b"")
    good = gzip.compress(b'{"text": "before damage"}\n' * 50, mtime=0)
    (tmp_path / "torn.jsonl.gz").write_bytes(good[: len(good) - 12])
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    caplog.set_level(logging.WARNING, logger="crucible.data")
    docs, reader = _read(SourceConfig(name="web", uri=str(tmp_path)), max_doc_chars=40)
    texts = [d.text for d in docs]
    assert texts[:2] == ["good one", "good two"]
    assert texts[2:] == ["before damage"] * len(texts[2:]) and texts[2:]
    assert dict(reader.errors.counts) == {
        "invalid_utf8": 2,
        "malformed_json": 1,
        "not_an_object": 1,
        "missing_text": 2,
        "empty_text": 1,
        "too_long": 1,
        "empty_file": 1,
        "truncated_file": 1,
        "unreadable_file": 1,
    }
    log = caplog.text
    assert f"{tmp_path / 'a.jsonl'}:2: invalid_utf8" in log
    assert f"{tmp_path / 'a.jsonl'}:3: malformed_json" in log
    assert f"{tmp_path / 'a.jsonl'}:8: too_long" in log
    assert "torn.jsonl.gz" in log and "truncated_file" in log


def test_source_matching_nothing_is_a_spec_error(tmp_path: Path) -> None:
    (tmp_path / "only.bin").write_bytes(b"x")
    with pytest.raises(SourceError, match=r"sources\[1\]\.uri: .*matches no readable file"):
        list_inputs(
            [SourceConfig(name="ok", uri=str(write_jsonl(tmp_path / "a.jsonl", RECORDS))),
             SourceConfig(name="bad", uri=str(tmp_path / "missing"))],
            Storage(),
        )


def test_declared_format_overrides_extension(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "data.log", RECORDS[:2])
    docs, _ = _read(SourceConfig(name="logs", uri=str(tmp_path), format="jsonl"))
    assert [d.text for d in docs] == ["document number 0", "document number 1"]
