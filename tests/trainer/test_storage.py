"""Storage over local paths and S3 (moto server on loopback)."""

from __future__ import annotations

from pathlib import Path

import pytest

from crucible.trainer import storage as st
from crucible.trainer.config.common import S3Config


def _roundtrip(store: st.Storage, root: str, tmp_path: Path) -> None:
    store.write_bytes(st.join(root, "a/b.txt"), b"hello")
    assert store.read_bytes(st.join(root, "a/b.txt")) == b"hello"
    assert store.exists(st.join(root, "a/b.txt"))
    assert store.exists(st.join(root, "a"))  # a prefix with objects below it
    assert not store.exists(st.join(root, "nope"))
    with pytest.raises(st.StorageNotFound, match="nope"):
        store.read_bytes(st.join(root, "nope"))

    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * 3000 + b"y")
    store.upload_file(big, st.join(root, "a/c/big.bin"))
    store.download_file(st.join(root, "a/c/big.bin"), tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == big.read_bytes()

    listed = store.list(st.join(root, "a"))
    assert [u.rsplit("/", 1)[-1] for u in listed] == ["b.txt", "big.bin"]
    children = store.list(st.join(root, "a"), recursive=False)
    assert [u.rstrip("/").rsplit("/", 1)[-1] for u in children] == ["b.txt", "c"]

    local = store.download_prefix(st.join(root, "a"), tmp_path / "copy")
    assert (local / "c" / "big.bin").read_bytes() == big.read_bytes()

    store.upload_dir(tmp_path / "copy", st.join(root, "u"), last=("b.txt",))
    assert store.read_bytes(st.join(root, "u/b.txt")) == b"hello"

    store.delete(st.join(root, "u/b.txt"))
    assert not store.exists(st.join(root, "u/b.txt"))
    store.delete_prefix(st.join(root, "a"))
    assert store.list(st.join(root, "a")) == []


def test_local_roundtrip(tmp_path: Path) -> None:
    _roundtrip(st.Storage(), str(tmp_path / "store"), tmp_path)


def test_s3_roundtrip(s3_server: str, s3_bucket: str, tmp_path: Path) -> None:
    store = st.Storage(S3Config(endpoint_url=s3_server, addressing_style="path"))
    _roundtrip(store, f"s3://{s3_bucket}/prefix", tmp_path)


def test_s3_multipart_upload(s3_server: str, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(st, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)
    monkeypatch.setattr(st, "MULTIPART_CHUNK", 5 * 1024 * 1024)
    store = st.Storage(S3Config(endpoint_url=s3_server, addressing_style="path"))
    data = bytes(range(256)) * (11 * 1024 * 1024 // 256)
    (tmp_path / "f").write_bytes(data)
    store.upload_file(tmp_path / "f", f"s3://{s3_bucket}/big")
    head = store.client.head_object(Bucket=s3_bucket, Key="big")
    assert "-" in head["ETag"], "a multipart upload has an ETag with a part count"
    assert store.read_bytes(f"s3://{s3_bucket}/big") == data


def test_unreachable_endpoint_is_unavailable() -> None:
    store = st.Storage(S3Config(endpoint_url="http://127.0.0.1:9", addressing_style="path"))
    store.client.meta.config.retries = {"max_attempts": 1}
    with pytest.raises(st.StorageUnavailable, match="cannot reach"):
        store.read_bytes("s3://bucket/key")


def test_bad_uri() -> None:
    with pytest.raises(st.StorageError, match="needs a bucket"):
        st.Storage().read_bytes("s3:///key")


def test_local_write_is_atomic(tmp_path: Path) -> None:
    target = tmp_path / "f"
    st.Storage().write_bytes(str(target), b"one")
    st.Storage().write_bytes(str(target), b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]
