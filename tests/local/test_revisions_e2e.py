"""Logged revisions in embedded mode, with the real stages: `crucible run` twice on a growing source.

The second run finds the source changed: the DataPipeline writes revision 2 beside revision 1
(documents revision 1 kept are dropped as seen), and the PretrainRun trains revision 2 from its
revision-1 model on it. `status.revisions` of both log each revision; `crucible lineage` shows it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from waits import scaled

CRUCIBLE = [sys.executable, "-m", "crucible.cli"]
API = "crucible.dev/v1alpha1"

PIPELINE = [
    {"apiVersion": API, "kind": "DataPipeline", "metadata": {"name": "news"},
     "spec": {"sources": [{"name": "wire", "uri": "inputs/wire"}],
              "steps": {"quality": {"enabled": False}, "dedup": {"minhash": {"enabled": False}}},
              "tokenizer": {"vocabSize": 300}, "shards": {"validationFraction": 0.25},
              "revisions": {}}},
    {"apiVersion": API, "kind": "PretrainRun", "metadata": {"name": "lm"},
     "spec": {"data": {"fromRun": {"kind": "DataPipeline", "name": "news"}},
              "model": {"hiddenSize": 32, "numLayers": 1, "numHeads": 2, "intermediateSize": 64,
                        "maxPositionEmbeddings": 64},
              "training": {"seqLen": 32, "globalBatchTokens": 128, "microBatchSize": 4, "maxSteps": 3,
                           "evalEvery": 0, "evalBatches": 1},
              "checkpoint": {"interval": 3}, "revisions": {}}},
]


def write_docs(path: Path, docs: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))


def crucible(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CRUCIBLE, *args], capture_output=True, text=True, timeout=scaled(600))


def status(work: Path, kind: str, name: str) -> dict[str, Any]:
    return json.loads((work / "default" / kind.lower() / name / "state.json").read_text())["status"]


@pytest.mark.slow
def test_two_revisions_in_embedded_mode(tmp_path: Path) -> None:
    from crucible.trainer.data.synthetic import generate_corpus

    clean = [{"id": r["id"], "text": r["text"]} for r in generate_corpus(200, seed=3) if r["kind"] == "clean"]
    folder, work = tmp_path / "pipeline", tmp_path / "work"
    folder.mkdir()
    (folder / "pipeline.yaml").write_text(yaml.safe_dump_all(PIPELINE, sort_keys=False))
    write_docs(work / "inputs" / "wire" / "day-1.jsonl", clean[:50])

    first = crucible("run", str(folder), "-w", str(work))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    data1 = status(work, "DataPipeline", "news")
    assert [r["revision"] for r in data1["revisions"]] == [1]
    kept1 = data1["results"]["documentsOut"]

    # the next day: 30 new documents, and 10 of yesterday's again under new ids
    write_docs(work / "inputs" / "wire" / "day-2.jsonl",
               clean[50:80] + [{**d, "id": f"again-{d['id']}"} for d in clean[:10]])
    second = crucible("run", str(folder), "-w", str(work))
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "running revision 2" in second.stdout
    data = status(work, "DataPipeline", "news")
    rev1, rev2 = data["revisions"]
    assert rev2["revision"] == 2 and rev2["outputURI"].endswith("output-rev2") and data["outputURI"] == rev2["outputURI"]
    assert rev2["documentsSeenEarlier"] == kept1  # every text revision 1 kept is not kept again
    assert 0 < data["results"]["documentsOut"] <= 30 and rev2["newTokens"] == data["results"]["tokensTrain"]
    assert (Path(rev1["outputURI"]) / "_SUCCESS").is_file()  # revision 1 stays, for its models' lineage

    lm = status(work, "PretrainRun", "lm")
    m1, m2 = lm["revisions"]
    assert (m1["dataManifestSha256"], m2["dataManifestSha256"]) == (rev1["dataManifestSha256"], rev2["dataManifestSha256"])
    assert m2["evalBefore"] > 0 and m2["evalAfter"] > 0 and m1.get("evalBefore") is None
    receipt = json.loads((Path(m2["outputURI"]) / "_SUCCESS").read_text())
    assert receipt["inputs"]["modelSource"]["uri"] == m1["outputURI"]  # continued from revision 1

    history = crucible("lineage", "lm", "-w", str(work))
    assert history.returncode == 0, history.stdout + history.stderr
    assert "revision 2:" in history.stdout and "revision 1:" in history.stdout
    assert "earlierRevisions[0]: data DataPipeline/news" in history.stdout  # data revision 2 -> 1

    again = crucible("run", str(folder), "-w", str(work))  # nothing new: no third revision
    assert again.returncode == 0 and len(status(work, "PretrainRun", "lm")["revisions"]) == 2
