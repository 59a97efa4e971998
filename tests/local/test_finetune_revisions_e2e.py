"""FinetuneRun revisions in embedded mode, with the real finetune stage: `crucible run` twice.

``tutor`` follows its dataset: when records are added, revision 2 continues from revision 1's model
on the new records only (the ones revision 1 trained on are dropped as seen). ``chat`` follows its
model (``model.fromRun: tutor``): it fine-tunes each new revision of ``tutor`` on its whole dataset.
Both log each revision in ``status.revisions``; `crucible lineage` shows the history and walks
chat's revision 2 back through tutor's revisions to the base model; the file added to tutor's dataset
folder for revision 2 is not a change to what revision 1 read.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "posttrain"))
from posttrain_helpers import build_tiny_model

from waits import scaled

CRUCIBLE = [sys.executable, "-m", "crucible.cli"]
API = "crucible.dev/v1alpha1"
TRAINING = {"seqLen": 32, "globalBatchTokens": 64, "microBatchSize": 2, "maxSteps": 2, "evalEvery": 0}


def finetune(name: str, model: dict[str, Any], dataset: str, revisions: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "FinetuneRun", "metadata": {"name": name},
            "spec": {"model": model, "dataset": {"uri": dataset, "validationFraction": 0.25}, "method": "full",
                     "training": TRAINING, "revisions": revisions}}


def records(prefix: str, n: int, start: int = 0) -> list[dict[str, str]]:
    return [{"prompt": f"{prefix} {i} plus one", "response": f" {i + 1}"} for i in range(start, start + n)]


def write(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def crucible(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CRUCIBLE, *args], capture_output=True, text=True, timeout=scaled(600))


def status(work: Path, name: str) -> dict[str, Any]:
    return json.loads((work / "default" / "finetunerun" / name / "state.json").read_text())["status"]


@pytest.mark.slow
def test_two_finetune_revisions_follow_the_dataset_and_the_model(tmp_path: Path) -> None:
    base = build_tiny_model(tmp_path / "base", hidden=32, layers=1)
    folder, work = tmp_path / "pipeline", tmp_path / "work"
    folder.mkdir()
    (folder / "runs.yaml").write_text(yaml.safe_dump_all([
        finetune("tutor", {"uri": str(base)}, "inputs/tutor", {}),
        finetune("chat", {"fromRun": {"kind": "FinetuneRun", "name": "tutor"}}, "inputs/chat.jsonl",
                 {"follow": "model", "maxRevisions": 5}),
    ], sort_keys=False))
    write(work / "inputs" / "tutor" / "week-1.jsonl", records("count", 8))
    write(work / "inputs" / "chat.jsonl", records("chat", 8))

    first = crucible("run", str(folder), "-w", str(work))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    (t1,) = status(work, "tutor")["revisions"]
    assert t1["modelURI"] == str(base) and t1["evalMetric"] == "loss" and t1["newTokens"] > 0

    # the next week: 4 new records, and 2 of last week's again
    write(work / "inputs" / "tutor" / "week-2.jsonl", records("count", 4, start=8) + records("count", 2))
    second = crucible("run", str(folder), "-w", str(work))
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "tutor: its inputs changed since revision 1; running revision 2" in second.stdout
    tutor = status(work, "tutor")
    t1, t2 = tutor["revisions"]
    assert t2["outputURI"].endswith("output-rev2") and tutor["outputURI"] == t2["outputURI"]
    assert t2["modelURI"] == t1["outputURI"]  # continued from revision 1, not from the base again
    assert t2["documentsSeenEarlier"] == 10 and 0 < t2["newTokens"] < t1["newTokens"]
    assert t2["dataManifestSha256"] != t1["dataManifestSha256"]
    assert t2["evalBefore"] > 0 and t2["evalAfter"] > 0
    assert len(np.load(Path(t2["outputURI"]) / "seen.npy")) == 12  # cumulative, for revision 3
    receipt = json.loads((Path(t2["outputURI"]) / "_SUCCESS").read_text())
    assert receipt["inputs"]["earlierRevisions"][0]["uri"] == t1["outputURI"]
    assert (Path(t1["outputURI"]) / "_SUCCESS").is_file()  # revision 1 stays, for the lineage of its models

    c1, c2 = status(work, "chat")["revisions"]
    assert (c1["modelURI"], c2["modelURI"]) == (t1["outputURI"], t2["outputURI"])  # each tutor revision
    assert c2.get("documentsSeenEarlier") is None and c2["newTokens"] == c1["newTokens"]  # the whole dataset again

    history = crucible("lineage", "chat", "-w", str(work))
    assert history.returncode == 0, history.stdout + history.stderr
    assert f"revision 2: {c2['outputURI']}" in history.stdout and "held-out loss" in history.stdout
    # chat rev 2 -> tutor rev 2 -> tutor rev 1 (whose base model is checked file by file)
    assert f"model: finetune FinetuneRun/tutor {t2['outputURI']}" in history.stdout
    assert f"model: finetune FinetuneRun/tutor {t1['outputURI']}" in history.stdout
    assert "earlierRevisions[0]" in history.stdout and "week-2.jsonl" in history.stdout  # added since revision 1
    assert "0 changed" in history.stdout
    tutor_history = crucible("lineage", "tutor", "-w", str(work), "--json")
    assert [r["revision"] for r in json.loads(tutor_history.stdout)["revisions"]] == [1, 2]

    again = crucible("run", str(folder), "-w", str(work))  # nothing new: no third revision of either
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert len(status(work, "tutor")["revisions"]) == 2 and len(status(work, "chat")["revisions"]) == 2
