"""The DataPipeline at web scale, end to end: balanced byte ranges, bounded dedup across workers,
decontamination (a file and the validation split), a learned quality classifier as mixture
weight, kept ids after the split and mixture, and SIGKILL-and-rerun of the new stages."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from crucible.trainer.data.pipeline import run_pipeline
from crucible.trainer.data.pipeline.state import unit_hash
from crucible.trainer.data.synthetic import english_document

from .conftest import make_config, write_jsonl

REPO = Path(__file__).resolve().parents[2]
VALIDATION = 0.1


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.relative_to(root).parts[0] not in ("_SUCCESS", "_work")}


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory, corpus_records: list[dict[str, Any]]) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("web")
    records = [{"id": r["id"], "text": r["text"]} for r in corpus_records]
    clean = [r for r in corpus_records if r["kind"] == "clean"]
    train_clean = [r for r in clean if unit_hash(r["id"], 0) >= VALIDATION]
    held_clean = [r for r in clean if unit_hash(r["id"], 0) < VALIDATION]
    # an evaluation set quoting 4 training documents, and a training document quoting a held-out one
    quoted = train_clean[:4]
    write_jsonl(root / "eval" / "qa.jsonl", [{"question": " ".join(r["text"].split()[5:25])} for r in quoted])
    rng = random.Random(11)
    leak = {"id": "leak-1", "text": english_document(rng) + "\n\n" + " ".join(held_clean[0]["text"].split()[:40]) + "."}
    assert unit_hash(leak["id"], 0) >= VALIDATION  # it lands in train
    records.insert(50, leak)
    write_jsonl(root / "src" / "a-huge.jsonl", records[:320])  # one large file beside many small ones
    for i in range(9):
        write_jsonl(root / "src" / f"b-{i}.jsonl", records[320 + 9 * i : 329 + 9 * i])
    write_jsonl(root / "src" / "c-rest.jsonl.zst", records[401:], "zstd")
    write_jsonl(root / "ref" / "good.jsonl", [{"text": english_document(rng)} for _ in range(60)])
    config = make_config(
        [{"name": "web", "uri": str(root / "src"), "idField": "id"}],
        workers=3,
        shards={"validationFraction": VALIDATION},
        steps={
            "decontamination": {"sets": [{"name": "qa", "uri": str(root / "eval"), "textFields": ["question"]},
                                         {"name": "heldout", "validation": True}], "ngram": 13},
            "classifiers": [{"name": "quality", "positive": [{"uri": str(root / "ref")}], "negativeSample": 60,
                             "action": "weight"}],
        },
    )
    out = root / "out"
    manifest = run_pipeline(config, out)
    copies = sum(1 for r in corpus_records if r.get("of") in {q["id"] for q in quoted})
    return {"root": root, "config": config, "out": out, "manifest": manifest, "quoted": quoted, "leak": leak,
            "copies": copies}


def test_decontamination_and_classifier_receipts(web: dict[str, Any]) -> None:
    data = web["manifest"].data
    steps = [row["step"] for row in data["funnel"]]
    assert steps[-6:] == ["toxicity", "classifier_quality", "decontamination", "dedup",
                          "decontamination_validation", "mixture"]
    decon = data["funnel"][steps.index("decontamination")]
    hits = decon["dropped"]["contaminated:qa"]  # the quoted documents and copies of them (dedup comes later)
    assert list(decon["dropped"]) == ["contaminated:qa"] and 4 <= hits <= 4 + web["copies"]
    held = data["funnel"][steps.index("decontamination_validation")]
    # the planted leak, and loose copies (Jaccard < 0.85, kept by dedup) of held-out documents
    leaked = held["dropped"]["contaminated:heldout"]
    assert list(held["dropped"]) == ["contaminated:heldout"] and leaked >= 1
    assert data["sources"]["web"]["dropped"]["decontamination_validation:contaminated:heldout"] == leaked
    sets = data["decontamination"]["sets"]
    assert sets["qa"]["documents"] == hits and sets["qa"]["kind"] == "file" and sets["qa"]["records"] == 4
    assert sets["qa"]["files"][0]["sha256"] == hashlib.sha256((web["root"] / "eval" / "qa.jsonl").read_bytes()).hexdigest()
    assert sets["heldout"]["documents"] == leaked and sets["heldout"]["ngrams"] > 0
    quality = data["classifiers"]["quality"]
    scored = data["funnel"][steps.index("classifier_quality")]["documentsIn"]
    assert sum(quality["histogram"]["counts"]) == scored > 100
    assert quality["training"]["positive"]["files"][0]["sha256"] == hashlib.sha256(
        (web["root"] / "ref" / "good.jsonl").read_bytes()).hexdigest()
    assert quality["training"]["negative"]["sampledFromInput"] and quality["action"] == "weight"
    # weights from the classifier: some clean documents repeat, some low-scoring ones are dropped
    mixture = data["funnel"][-1]
    assert mixture["changes"]["repeats"] > 0


def test_kept_ids_are_what_each_split_saw(web: dict[str, Any]) -> None:
    data, out = web["manifest"].data, web["out"]
    rows = [json.loads(line) for p in sorted((out / "_work" / "tokenize").glob("part-*"))
            for line in (p / "kept_ids.jsonl").read_text().splitlines()]
    by_split = {s: [r for r in rows if r["split"] == s] for s in ("train", "validation")}
    assert sum(r["copies"] for r in by_split["train"]) == data["documentsWritten"]["train"]
    assert len(by_split["validation"]) == data["documentsWritten"]["validation"] > 0
    assert all(r["copies"] >= 1 for r in rows)
    assert data["keptDocuments"]["train"] == {"documents": len(by_split["train"]),
                                              "copies": data["documentsWritten"]["train"]}
    ids = {r["id"] for r in rows}
    assert web["leak"]["id"] not in ids and not ids & {r["id"] for r in web["quoted"]}


def test_one_worker_gives_the_same_receipt(web: dict[str, Any], tmp_path: Path) -> None:
    single = run_pipeline(web["config"], tmp_path / "one", num_parts=1).data
    three = web["manifest"].data
    for key in ("documentsIn", "documentsOut", "documentsWritten", "tokens", "funnel", "sources", "pii",
                "keptDocumentIdsSha256", "keptDocuments", "decontamination", "classifiers", "tokenizer"):
        assert single[key] == three[key], key


@pytest.mark.slow
def test_sigkill_in_the_new_stages_then_rerun_is_byte_identical(web: dict[str, Any], tmp_path: Path) -> None:
    spec = web["config"].to_wire()
    out = tmp_path / "out"
    spec.update(output={"uri": str(out)})
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "crucible.trainer", "data", "--spec", str(tmp_path / "spec.json")]
    # Killed once the clusters exist, inside tokenize (a kill inside filter, while the bucket runs
    # are written, is test_pipeline's SIGKILL test); the rerun reads the clusters back.
    marker = out / "_work" / "cluster" / "_DONE"
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "_SUCCESS").exists()
    assert subprocess.run(cmd, env=env, cwd=REPO, capture_output=True).returncode == 0
    assert _tree(out) == _tree(web["out"])
