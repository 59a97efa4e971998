"""Sources and output on S3 (moto server on loopback): the same pipeline, byte for byte."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import boto3
import pytest

from crucible.trainer.data.pipeline import run_pipeline
from crucible.trainer.storage import Storage, StorageError

from .conftest import make_config, write_jsonl


def _client(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def test_s3_sources_and_output_match_local(
    tmp_path: Path, s3_endpoint: str, corpus_records: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    s3 = _client(s3_endpoint)
    s3.create_bucket(Bucket="corpus")
    s3.create_bucket(Bucket="out")
    records = [{"id": r["id"], "text": r["text"]} for r in corpus_records[:150]]
    local = tmp_path / "local"
    for i in range(3):
        path = write_jsonl(local / f"part-{i}.jsonl.gz", records[i * 50 : (i + 1) * 50], "gzip")
        s3.upload_file(str(path), "corpus", f"raw/part-{i}.jsonl.gz")
    s3.put_object(Bucket="corpus", Key="raw/zz-denied.jsonl", Body=b'{"text": "never read"}\n')
    storage = {"s3": {"endpointUrl": s3_endpoint, "addressingStyle": "path"}}

    real_download = Storage.download_file

    def deny(self: Storage, uri: str, local_path: Any) -> None:
        if uri.endswith("zz-denied.jsonl"):
            raise StorageError(f"{uri}: access denied (AccessDenied)")
        real_download(self, uri, local_path)

    monkeypatch.setattr(Storage, "download_file", deny)
    config = make_config([{"name": "web", "uri": "s3://corpus/raw/", "idField": "id"}], storage=storage)
    remote = run_pipeline(config, "s3://out/run-1", num_parts=2)
    assert remote.data["funnel"][0]["dropped"] == {"unreadable_file": 1}  # counted, the rest went on
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="out", Prefix="run-1/")["Contents"]}
    assert {"run-1/_SUCCESS", "run-1/manifest.json", "run-1/tokenizer/tokenizer.json", "run-1/train/index.json",
            "run-1/validation/index.json"} <= keys
    assert not any(k.endswith("docs.jsonl.zst") for k in keys)
    success = json.loads(s3.get_object(Bucket="out", Key="run-1/_SUCCESS")["Body"].read())
    assert success["results"]["manifestSha256"] == remote.sha256

    local_config = make_config([{"name": "web", "uri": str(local), "idField": "id"}])
    here = run_pipeline(local_config, tmp_path / "out", num_parts=2)
    # (the shard layout differs: the unreadable object took a place in the split of files over workers)
    for key in ("documentsIn", "documentsOut", "tokens", "keptDocumentIdsSha256", "tokenizer", "pii"):
        assert remote.data[key] == here.data[key], key


def test_unreachable_store_is_retriable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from crucible.trainer.config.common import EXIT_RETRIABLE
    from crucible.trainer.data.pipeline import main

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({
        "sources": [{"name": "web", "uri": "s3://corpus/raw/"}],
        "output": {"uri": str(tmp_path / "out")},
        "storage": {"s3": {"endpointUrl": "http://127.0.0.1:9", "addressingStyle": "path"}},  # nothing listens
    }))
    assert main(["--spec", str(spec)]) == EXIT_RETRIABLE
