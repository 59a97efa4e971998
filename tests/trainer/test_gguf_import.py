"""GGUF as a model source: converted once into a Hugging Face folder, cached by sha256, logits kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")

from gguf_writer import write_tiny_llama_gguf  # noqa: E402

from crucible.trainer import gguf_import  # noqa: E402
from crucible.trainer import storage as st  # noqa: E402
from crucible.trainer.faults import SpecError  # noqa: E402


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("CRUCIBLE_CACHE_DIR", str(root))
    return root


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, object]:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    model, tok = write_tiny_llama_gguf(path)
    return path, model, tok


def test_gguf_round_trips_logits_and_tokenizer(tiny_gguf, cache: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, original, tok = tiny_gguf
    out = st.Storage().local_path(str(path), tmp_path / "dl", field="model.source.uri")
    assert out.parent == cache / "gguf"
    record = gguf_import.source_record(out)
    assert record is not None
    assert record["sha256"] == gguf_import.sha256_file(path)
    assert record["size"] == path.stat().st_size and record["architecture"] == "llama"
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    text = "json dumps turns a python object"
    ids = torch.tensor([tok.encode(text).ids])
    loaded_tok = AutoTokenizer.from_pretrained(str(out))
    assert loaded_tok(text)["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        want = original(ids).logits
        got = model(ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()


def test_second_use_reads_the_cache_and_a_torn_conversion_is_redone(tiny_gguf, cache: Path, tmp_path: Path) -> None:
    path, _, _ = tiny_gguf
    first = gguf_import.materialize(str(path), st.Storage(), tmp_path)
    stamp = (first / "config.json").stat().st_mtime_ns
    again = gguf_import.materialize(str(path), st.Storage(), tmp_path)
    assert again == first and (first / "config.json").stat().st_mtime_ns == stamp
    (first / gguf_import.SOURCE_RECORD).unlink()  # as if the converter died before its record
    redone = gguf_import.materialize(str(path), st.Storage(), tmp_path)
    assert gguf_import.source_record(redone) is not None
    assert not [p for p in (cache / "gguf").iterdir() if p.name.startswith(".") and p.is_dir()]


def test_gguf_from_s3(tiny_gguf, cache: Path, tmp_path: Path, s3_server: str, s3_bucket: str) -> None:
    from crucible.trainer.config.common import S3Config

    path, _, _ = tiny_gguf
    store = st.Storage(S3Config(endpoint_url=s3_server, addressing_style="path"))
    uri = f"s3://{s3_bucket}/models/tiny.gguf"
    store.upload_file(path, uri)
    out = store.local_path(uri, tmp_path / "dl")
    record = gguf_import.source_record(out)
    assert record is not None and record["uri"] == uri
    assert record["sha256"] == gguf_import.sha256_file(path)


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        ("missing", "no such file"),
        ("not-gguf", "is not a GGUF file"),
        ("torn", "cannot be read as GGUF"),
        ("unsupported", "transformers cannot load from GGUF"),
    ],
)
def test_bad_gguf_sources_get_clear_errors(setup: str, expected: str, tiny_gguf, cache: Path,
                                           tmp_path: Path) -> None:
    target = tmp_path / "model.gguf"
    if setup == "not-gguf":
        target.write_text('{"this": "is json"}')
    elif setup == "torn":
        target.write_bytes(tiny_gguf[0].read_bytes()[:200])
    elif setup == "unsupported":
        writer = gguf.GGUFWriter(str(target), "rwkv6")
        writer.add_block_count(1)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    with pytest.raises(SpecError) as err:
        st.Storage().local_path(str(target), tmp_path / "dl", field="model.source.uri")
    message = str(err.value)
    assert message.startswith("model.source.uri: ") and expected in message
    assert str(target) in message
    assert not (cache / "gguf").exists() or not any((cache / "gguf").glob("[0-9a-f]*"))


def test_a_datapipeline_adopts_the_tokenizer_of_a_gguf_file(tiny_gguf, cache: Path, tmp_path: Path) -> None:
    from crucible.trainer.data import tokenizer as tokenizer_lib

    path, _, tok = tiny_gguf
    local = st.Storage().local_path(str(path), tmp_path / "dl", field="tokenizer.source.uri")
    info = tokenizer_lib.adopt(local, tmp_path / "tokenizer", origin=str(path))
    assert info.vocab_size == tok.get_vocab_size()
    assert info.eos_id == 0
