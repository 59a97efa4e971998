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


def test_truncated_zstd_is_reported_and_keeps_what_came_before(tmp_path: Path) -> None:
    import zstandard

    big = b"".join(b'{"text": "record %d of a long zstd file with some words"}\n' % i for i in range(20000))
    raw = zstandard.ZstdCompressor(level=1).compress(big)
    (tmp_path / "big.jsonl.zst").write_bytes(raw[: len(raw) * 2 // 3])
    small = zstandard.ZstdCompressor().compress(b'{"text": "one"}\n{"text": "two"}\n')
    (tmp_path / "small.jsonl.zst").write_bytes(small[:-3])
    frames = zstandard.ZstdCompressor().compress(b'{"text": "a"}\n') + zstandard.ZstdCompressor().compress(b'{"text": "b"}\n')
    (tmp_path / "frames.jsonl.zst").write_bytes(frames)  # two whole frames: not truncated
    (tmp_path / "torn.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(b"some text " * 50)[:-4])
    docs, reader = _read(SourceConfig(name="web", uri=str(tmp_path)))
    assert reader.errors.counts["truncated_file"] == 3
    assert reader.errors.by_source[("web", "truncated_file")] == 3
    texts = [d.text for d in docs]
    assert texts[:2] == ["record 0 of a long zstd file with some words", "record 1 of a long zstd file with some words"]
    assert 1000 < len(texts) - 2 < 20000  # the records before the damage are kept
    assert texts[-2:] == ["a", "b"] or "a" in texts


def test_symlinked_subfolder_is_followed_and_loops_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    outside = tmp_path / "elsewhere"
    write_jsonl(outside / "linked.jsonl", RECORDS[:2])
    root = tmp_path / "src"
    write_jsonl(root / "a.jsonl", RECORDS[2:3])
    (root / "more").symlink_to(outside, target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)
    (root / "dangling").symlink_to(tmp_path / "gone")
    caplog.set_level(logging.INFO, logger="crucible.data")
    items = list_inputs([SourceConfig(name="web", uri=str(root))], Storage())
    assert [i.relpath for i in items] == ["a.jsonl", "more/linked.jsonl"]
    assert "following symlinked folder" in caplog.text and "symlink loop" in caplog.text
    assert "broken symlink" in caplog.text


def test_pieces_of_a_split_file_read_every_line_once_with_the_same_keys(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from crucible.trainer.data.splits import plan_pieces

    records = [{"text": f"line {i} " + "word " * (i % 17), "n": i} for i in range(3000)]
    write_jsonl(tmp_path / "src" / "a-huge.jsonl", records)
    (tmp_path / "src" / "a-huge.jsonl").write_bytes((tmp_path / "src" / "a-huge.jsonl").read_bytes() + b"\n\n")
    for i in range(12):
        write_jsonl(tmp_path / "src" / f"b-small-{i:02d}.jsonl", records[:5])
    write_jsonl(tmp_path / "src" / "c.jsonl.gz", records[:300], "gzip")
    pq.write_table(pa.table({"text": [r["text"] for r in records]}), tmp_path / "src" / "d.parquet", row_group_size=250,
                   compression="none", use_dictionary=False)  # bytes ~ text: the plan balances bytes
    source = SourceConfig(name="web", uri=str(tmp_path / "src"))
    inputs = list_inputs([source], Storage())
    whole_reader = DocumentReader(Storage(), 10**6)
    whole = [(d.key, d.id, d.text) for f in inputs for d in whole_reader.read(f)]
    for parts in (1, 4, 7):
        plan = plan_pieces(inputs, parts, Storage())
        reader = DocumentReader(Storage(), 10**6)
        per_part = [[(d.key, d.id, d.text) for piece in pieces for d in reader.read(piece)] for pieces in plan]
        assert [x for part in per_part for x in part] == whole, parts
        assert reader.records == whole_reader.records
    assert any(not p.whole and p.file.format == "parquet" for part in plan_pieces(inputs, 7, Storage()) for p in part)


def test_one_huge_file_beside_many_small_ones_is_balanced(tmp_path: Path) -> None:
    from crucible.trainer.data.splits import plan_pieces

    records = [{"text": f"line {i} " + "word " * (i % 17)} for i in range(4000)]
    write_jsonl(tmp_path / "a-huge.jsonl", records)
    for i in range(30):
        write_jsonl(tmp_path / f"b-small-{i:02d}.jsonl", records[i * 3 : i * 3 + 3])
    inputs = list_inputs([SourceConfig(name="web", uri=str(tmp_path))], Storage())
    for parts in (4, 16):
        reader = DocumentReader(Storage(), 10**6)
        work = [sum(len(d.text) for piece in pieces for d in reader.read(piece))
                for pieces in plan_pieces(inputs, parts, Storage())]
        assert max(work) < 1.1 * sum(work) / parts and min(work) > 0.9 * sum(work) / parts, work
