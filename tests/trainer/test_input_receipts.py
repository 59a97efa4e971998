"""Every input of a stage is recorded by content in its ``_SUCCESS``, and `crucible lineage` names a swapped one."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from trainlib import VOCAB, run_stage, tiny_spec

from crucible.trainer import stage_io
from crucible.trainer import storage as st
from waits import scaled


def write_base_model(directory: Path) -> Path:
    """A Hugging Face model folder that no Crucible stage wrote (no _SUCCESS): hashed file by file."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def lineage(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "crucible.cli", "lineage", str(path)],
                          capture_output=True, text=True, timeout=scaled(120))


def test_a_swapped_base_model_or_tokenizer_file_is_named_by_lineage(shards: Path, tmp_path: Path) -> None:
    base = write_base_model(tmp_path / "base")
    spec = tiny_spec(shards, tmp_path, model={"source": {"uri": str(base)}}, tokenizer={"uri": str(shards / "tokenizer")},
                     training={"maxSteps": 2}, checkpoint={"interval": 2})
    rc, log = run_stage(spec, tmp_path / "job")
    assert rc == 0, log[-3000:]
    inputs = json.loads((tmp_path / "model" / "_SUCCESS").read_text())["inputs"]
    # every input by content: the shards by their manifest, the model and tokenizer folders file by file
    assert inputs["data"] == {"uri": str(shards), "field": "spec.data", "hashOf": "manifest.json",
                              "sha256": hashlib.sha256((shards / "manifest.json").read_bytes()).hexdigest()}
    source = inputs["modelSource"]
    assert source["hashOf"] == "files" and source["field"] == "spec.model.source"
    assert source["files"]["model.safetensors"] == hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest()
    assert source["sha256"] == stage_io.files_digest(source["files"])
    assert inputs["tokenizer"]["hashOf"] == "files" and "tokenizer.json" in inputs["tokenizer"]["files"]
    assert all(isinstance(entry["sha256"], str) and len(entry["sha256"]) == 64 for entry in inputs.values())

    out = lineage(tmp_path / "model")
    assert out.returncode == 0, out.stdout + out.stderr

    (base / "model.safetensors").write_bytes(b"someone else's weights")
    tok = shards / "tokenizer" / "tokenizer.json"
    tok.write_text(tok.read_text().replace('"w1"', '"w1x"'))
    out = lineage(tmp_path / "model")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "✗ inputs.modelSource model.safetensors (spec.model.source): recorded" in out.stdout
    assert "✗ inputs.tokenizer tokenizer.json (spec.tokenizer): recorded" in out.stdout
    assert "restore the input (spec.model.source) to what the run read" in out.stdout


def test_input_receipt_kinds_and_one_hash_per_file(tmp_path: Path) -> None:
    store = st.Storage()
    folder = tmp_path / "sft"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"prompt": "p", "completion": "c"}\n')
    one = stage_io.input_receipt(store, str(folder / "a.jsonl"), "spec.dataset")
    assert one["hashOf"] == "file" and one["sha256"] == hashlib.sha256((folder / "a.jsonl").read_bytes()).hexdigest()
    many = stage_io.input_receipt(store, str(folder), "spec.dataset")  # a folder of jsonl: never empty again
    assert many["hashOf"] == "files" and many["files"] == {"a.jsonl": one["sha256"]}
    missing = stage_io.input_receipt(store, str(tmp_path / "nothing"), "spec.dataset")
    assert missing["hashOf"] == "missing" and missing["sha256"] is None
    # a file is streamed once per (path, size, mtime): the second receipt reads nothing
    calls: list[str] = []
    real = stage_io.file_sha256.__globals__["_HASHED"]
    assert any(k[0] == str((folder / "a.jsonl").resolve()) for k in real)
    import crucible.trainer.data.shards as shards_module

    original = shards_module.sha256_file
    shards_module.sha256_file = lambda path, chunk=1 << 22: calls.append(str(path)) or original(path, chunk)
    try:
        stage_io.input_receipt(store, str(folder), "spec.dataset")
    finally:
        shards_module.sha256_file = original
    assert calls == []
