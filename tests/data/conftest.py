"""Builders for the DataPipeline tests."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from crucible.trainer.config.data import DataPipelineConfig
from crucible.trainer.data.document import Document

PROSE = (
    "The committee reviewed the annual budget of the city and the mayor explained each line to the press. "
    "Several members asked whether the new library would open before the winter, and the answer was yes. "
    "The report also covers the harbor bridge that has been closed to traffic since the storm in March. "
    "Engineers from the regional office expect the repairs to take another four months to finish. "
    "Residents of the north district have been asked to use the ferry with the extended schedule. "
    "A public meeting about the plans will be held at the school hall on Thursday evening at seven."
)


def make_doc(text: str, doc_id: str = "d", source: str = "web", **meta: Any) -> Document:
    return Document(text=text, id=doc_id, source=source, domain="web", meta=dict(meta))


def prose(paragraphs: int = 1) -> str:
    return "\n\n".join([PROSE] * 1 if paragraphs == 1 else [PROSE.replace("city", f"city {i}") for i in range(paragraphs)])


def write_jsonl(path: Path, records: Iterable[dict[str, Any]], compress: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    if compress == "gzip":
        data = gzip.compress(data, mtime=0)
    elif compress == "zstd":
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def make_config(sources: list[dict[str, Any]], **overrides: Any) -> DataPipelineConfig:
    """A small-corpus config: tiny vocabulary, everything else default unless overridden."""
    spec: dict[str, Any] = {
        "sources": sources,
        "tokenizer": {"vocabSize": 400, "minFrequency": 2},
        "shards": {"tokensPerShard": 4096, "validationFraction": 0.1},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return DataPipelineConfig.model_validate(spec)


@pytest.fixture(scope="session")
def corpus_records() -> list[dict[str, Any]]:
    from crucible.trainer.data.synthetic import generate_corpus

    return generate_corpus(400, seed=7)


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("RAYON_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def s3_endpoint() -> Any:
    """A moto S3 server on loopback (server mode), with fake credentials in the environment."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    yield f"http://{host}:{port}"
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
