"""`crucible lineage`: a chain of receipts walked back to the sources, with every reachable hash re-checked."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from waits import scaled

CRUCIBLE = [sys.executable, "-m", "crucible.cli"]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write(path: Path, data: bytes | str) -> bytes:
    raw = data.encode() if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw)
    return raw


def chain(root: Path) -> dict[str, Path]:
    """raw file -> DataPipeline -> PretrainRun -> FinetuneRun, each with the receipts the stages write."""
    raw = write(root / "raw" / "docs.jsonl", '{"text": "hello"}\n')
    data = root / "data"
    shard = write(data / "train" / "part-00000-00000.bin", b"\x01\x00\x02\x00")
    manifest = write(data / "manifest.json", json.dumps({
        "documentsIn": 10, "documentsOut": 7,
        "funnel": [{"step": "read", "documentsIn": 10, "documentsOut": 10, "dropped": {}},
                   {"step": "dedup", "documentsIn": 10, "documentsOut": 7, "dropped": {"exact_duplicate": 3}}],
        "sources": {"docs": {"documentsIn": 10, "documentsOut": 7, "tokens": {"train": 40, "validation": 0},
                             "license": "CC-BY-4.0", "consent": "public-domain-ish", "origin": "test",
                             "rawFiles": [{"uri": str(root / "raw" / "docs.jsonl"), "sha256": sha(raw), "size": len(raw)}]}},
        "splits": {"train": {"shards": [{"name": "part-00000-00000", "sha256": sha(shard)}]}},
    }))
    data_success = write(data / "_SUCCESS", json.dumps({
        "stage": "data", "run": "DataPipeline/default/corpus", "inputs": {"sources": {"docs": str(root / "raw")}},
        "results": {"manifestSha256": sha(manifest)}}))
    model = root / "pretrain"
    weights = write(model / "model.safetensors", b"weights")
    pre_success = write(model / "_SUCCESS", json.dumps({
        "stage": "pretrain", "run": "PretrainRun/default/lm", "results": {"steps": 3},
        "inputs": {"data": str(data), "dataManifestSha256": sha(manifest)},
        "outputs": {"model.safetensors": sha(weights)}}))
    sft = root / "sft"
    sft_weights = write(sft / "model.safetensors", b"tuned")
    write(sft / "_SUCCESS", json.dumps({
        "stage": "finetune", "run": "FinetuneRun/default/sft", "results": {},
        "inputs": {"model": {"uri": str(model), "sha256": sha(pre_success)},
                   "dataset": {"uri": str(root / "raw" / "docs.jsonl"), "sha256": sha(raw)}},
        "outputs": {"model.safetensors": sha(sft_weights)}}))
    del data_success
    return {"raw": root / "raw" / "docs.jsonl", "data": data, "shard": data / "train" / "part-00000-00000.bin",
            "pretrain": model, "sft": sft}


def lineage(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CRUCIBLE, "lineage", *args], capture_output=True, text=True, timeout=scaled(120))


def test_lineage_walks_to_the_sources_and_verifies_every_hash(tmp_path: Path) -> None:
    paths = chain(tmp_path)
    out = lineage(str(paths["sft"]))
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert text.index("finetune") < text.index("pretrain") < text.index("data")
    assert "licence CC-BY-4.0" in text and "consent public-domain-ish" in text and "100.0% of training tokens" in text
    assert "dedup: -3" in text
    assert ", 0 changed" in text.splitlines()[-1]

    doc = json.loads(lineage(str(paths["sft"]), "--json").stdout)
    pre = doc["inputs"]["inputs.model"]
    data = pre["inputs"]["inputs.data"]
    assert (doc["stage"], pre["stage"], data["stage"]) == ("finetune", "pretrain", "data")
    assert data["data"]["sources"]["docs"]["license"] == "CC-BY-4.0"
    statuses = {c["what"]: c["status"] for c in data["checks"]}
    assert statuses["manifest.json"] == "ok" and statuses["sources.docs raw file"] == "ok"
    assert statuses["shards/train/part-00000-00000.bin"] == "ok"


def test_a_tampered_file_is_named_and_fails_the_command(tmp_path: Path) -> None:
    paths = chain(tmp_path)
    paths["shard"].write_bytes(b"\x09\x09")  # someone edited the training data after the run
    (paths["pretrain"] / "model.safetensors").write_bytes(b"swapped")
    out = lineage(str(paths["sft"]))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "✗ shards/train/part-00000-00000.bin: recorded" in out.stdout
    assert "✗ outputs/model.safetensors" in out.stdout
    assert ", 2 changed" in out.stdout.splitlines()[-1]


def test_unreachable_inputs_are_listed_as_not_checked(tmp_path: Path) -> None:
    paths = chain(tmp_path)
    paths["raw"].unlink()
    out = lineage(str(paths["sft"]), "--json")
    assert out.returncode == 0
    text = lineage(str(paths["sft"])).stdout
    assert "? sources.docs raw file: unreachable" in text


def test_not_a_finished_output(tmp_path: Path) -> None:
    out = lineage(str(tmp_path))
    assert out.returncode == 2
    assert "no _SUCCESS" in out.stderr
    out = lineage("no-such-run", "-w", str(tmp_path))
    assert out.returncode == 2 and "crucible status lists them" in out.stderr
