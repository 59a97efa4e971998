"""Post-training stages read their model and data from S3 and publish there (moto server on loopback)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from posttrain_helpers import counting_records, sft_spec, write_records, write_spec

from crucible.trainer.config.common import S3Config
from crucible.trainer.storage import Storage


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Storage]]:
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="posttrain")
    try:
        yield endpoint, Storage(S3Config(endpoint_url=endpoint, addressing_style="path"))
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _storage_spec(endpoint: str) -> dict:
    return {"s3": {"endpointUrl": endpoint, "addressingStyle": "path"}}


def test_finetune_from_and_to_s3(s3, tiny_model_dir: Path, tmp_path: Path) -> None:
    from crucible.trainer.finetune import main

    endpoint, store = s3
    store.upload_dir(tiny_model_dir, "s3://posttrain/base")
    data = write_records(tmp_path / "data.jsonl", counting_records(40))
    store.upload_file(data, "s3://posttrain/sft/data.jsonl")
    spec = sft_spec(Path("unused"), Path("unused"), Path("unused"), model={"uri": "s3://posttrain/base"},
                    dataset={"uri": "s3://posttrain/sft/data.jsonl"}, output={"uri": "s3://posttrain/out"},
                    checkpoint={"uri": str(tmp_path / "ckpt")}, training={"maxSteps": 4},
                    storage=_storage_spec(endpoint))
    assert main(["--spec", str(write_spec(tmp_path / "spec.json", spec))]) == 0
    receipt = json.loads(store.read_text("s3://posttrain/out/_SUCCESS"))
    assert receipt["inputs"]["model"]["uri"] == "s3://posttrain/base" and receipt["results"]["steps"] == 4
    local = store.download_prefix("s3://posttrain/out", tmp_path / "downloaded")
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(local)


def test_quantize_from_and_to_s3(s3, trained_model_dir: Path, eval_text: Path, tmp_path: Path) -> None:
    from crucible.trainer.quantize import main

    endpoint, store = s3
    store.upload_dir(trained_model_dir, "s3://posttrain/trained")
    store.upload_file(eval_text, "s3://posttrain/eval/eval.txt")
    spec = {
        "model": {"uri": "s3://posttrain/trained"},
        "method": "int8",
        "groupSize": 32,
        "evaluation": {"data": {"uri": "s3://posttrain/eval/eval.txt"}, "seqLen": 32, "maxBatches": 2},
        "maxPerplexityIncrease": 0.5,
        "output": {"uri": "s3://posttrain/int8"},
        "storage": _storage_spec(endpoint),
    }
    assert main(["--spec", str(write_spec(tmp_path / "spec.json", spec))]) == 0
    results = json.loads(store.read_text("s3://posttrain/int8/_SUCCESS"))["results"]
    assert results["sizeBytesAfter"] < results["sizeBytesBefore"]
    names = {uri.rsplit("/", 1)[-1] for uri in store.list("s3://posttrain/int8/")}
    assert {"model.safetensors", "config.json", "tokenizer.json", "_SUCCESS"} <= names
