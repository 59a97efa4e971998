"""Fixtures of the trainer-engine tests: a moto S3 server on loopback, tiny token shards, tiny specs."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from crucible.trainer.data.shards import ShardWriter

VOCAB = 128


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Endpoint URL of a moto S3 server (server mode, loopback), with fake credentials in env."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ["AWS_ACCESS_KEY_ID"] = "testing"
    os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_server: str, request: pytest.FixtureRequest) -> str:
    import boto3

    name = "b-" + request.node.name.lower().replace("_", "-")[:40].strip("-[]")
    name = "".join(c if c.isalnum() or c == "-" else "-" for c in name)
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name


def write_shards(root: Path, documents: int = 400, seed: int = 0, vocab: int = VOCAB) -> Path:
    """A DataPipeline-shaped output: train/ and validation/ splits of random documents."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", documents), ("validation", max(documents // 8, 8))):
        writer = ShardWriter(root / split, vocab_size=vocab, eos_id=0, tokens_per_shard=4000)
        for _ in range(n):
            length = int(rng.integers(20, 120))
            # a learnable pattern: runs of increasing ids mod vocab, random start
            start = int(rng.integers(1, vocab))
            writer.add_document([(start + i) % (vocab - 1) + 1 for i in range(length)])
        writer.close()
    write_tokenizer(root / "tokenizer", vocab)
    manifest = {"stage": "data", "tokens": 0}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def write_tokenizer(directory: Path, vocab: int = VOCAB) -> None:
    """A word-level tokenizer over the ids of the generated data ("<eos>", "w1" ... "wN")."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<eos>": 0, **{f"w{i}": i for i in range(1, vocab)}}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    fast.save_pretrained(directory)


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    return write_shards(tmp_path / "data")


def tiny_spec(data: Path, out: Path, **overrides: Any) -> dict[str, Any]:
    """A PretrainRun spec (camelCase) for a tiny Llama that trains in seconds on CPU."""
    spec: dict[str, Any] = {
        "model": {"hiddenSize": 32, "numLayers": 2, "numHeads": 4, "intermediateSize": 64,
                  "vocabSize": VOCAB, "maxPositionEmbeddings": 64},
        "data": {"uri": str(data)},
        "training": {"seqLen": 32, "globalBatchTokens": 256, "microBatchSize": 4, "maxSteps": 12,
                     "evalEvery": 0, "evalBatches": 2, "seed": 7},
        "optimizer": {"lr": 3e-3, "warmupSteps": 2},
        "checkpoint": {"uri": str(out / "checkpoints"), "interval": 4, "keep": 2, "asyncSave": False},
        "metrics": {"port": 0, "logEvery": 1},
        "output": {"uri": str(out / "model")},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec
