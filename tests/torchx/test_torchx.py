"""crucible.torchx: every stage as a torchx AppDef, derived from the same plan and render as the
Job, and a real DataPipeline run (two workers) on torchx's local scheduler.

torchx 0.7 pins urllib3<1.27, so it lives in its own environment, ``.venv-torchx``, which the
Makefile's test path creates (``make torchx-env``); this test drives it as a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from crucible.operator.render import POD_FILESYSTEM_ENV
from waits import scaled

REPO = Path(__file__).resolve().parents[2]
TORCHX_PYTHON = REPO / ".venv-torchx" / "bin" / "python"
API = "crucible.dev/v1alpha1"


def _pipeline(folder: Path, corpus: Path) -> None:
    from crucible.trainer.data.synthetic import generate_corpus

    corpus.mkdir(parents=True)
    records = generate_corpus(80, seed=3)
    for i in range(2):  # a file per worker
        (corpus / f"part-{i}.jsonl").write_text("".join(json.dumps({"id": r["id"], "text": r["text"]}) + "\n"
                                                        for r in records[i::2]))
    resources = [
        {"apiVersion": API, "kind": "DataPipeline", "metadata": {"name": "corpus"},
         "spec": {"workers": 2, "sources": [{"name": "web", "uri": str(corpus), "idField": "id"}],
                  "tokenizer": {"vocabSize": 512}, "shards": {"validationFraction": 0.1}}},
        {"apiVersion": API, "kind": "PretrainRun", "metadata": {"name": "base"},
         "spec": {"data": {"fromRun": {"kind": "DataPipeline", "name": "corpus"}},
                  "model": {"hiddenSize": 32, "numLayers": 1, "numHeads": 2},
                  "resources": {"nodes": 2, "processesPerNode": 2, "cpu": "500m", "memory": "3Gi"},
                  "training": {"seqLen": 16, "globalBatchTokens": 256, "microBatchSize": 4, "maxSteps": 4}}},
    ]
    folder.mkdir()
    (folder / "pipeline.yaml").write_text(yaml.safe_dump_all(resources))


@pytest.mark.skipif(not TORCHX_PYTHON.exists(), reason="no .venv-torchx: `make torchx-env` creates it (make test does)")
def test_stages_as_torchx_apps_and_a_real_run_on_the_local_scheduler(tmp_path: Path) -> None:
    folder, root = tmp_path / "pipeline", tmp_path / "storage"
    _pipeline(folder, tmp_path / "in")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "operator"), str(REPO / "trainer")]),
           "TMPDIR": str(tmp_path)}
    proc = subprocess.run([str(TORCHX_PYTHON), str(Path(__file__).with_name("driver.py")), str(folder), str(root),
                           sys.executable], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=scaled(600))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = json.loads(lines[-1].removeprefix("RESULT "))
    assert found["components"] == ["DataPipeline", "FinetuneRun", "PreferenceRun", "PretrainRun", "QuantizeJob"]

    # One torchx role per node group, with the Job's command and environment.
    base = found["base"]
    assert base["roles"] == [["trainer", 2, 0]] and base["job_replicas"] == [2]
    job = base["job_command"]
    assert job[0] == "torchrun" and "--nnodes=2" in job and "--nproc-per-node=2" in job
    for flag in job:
        if flag.startswith(("--node-rank", "--master-addr")):
            continue  # the replica id and the scheduler's rank-0 host stand in for the Job's index and DNS name
        assert flag.replace("/etc/crucible/spec.json", "") in base["script"], flag
    assert "--node-rank=${replica_id}" in base["script"]
    # The pod's own paths (termination log, caches on its emptyDirs) stay with the Job; the rest is the role's.
    pod_only = {"CRUCIBLE_TERMINATION_LOG", *POD_FILESYSTEM_ENV}
    job_env = {k: v for k, v in base["job_env"].items() if k not in pod_only}
    assert job_env and {k: base["env"].get(k) for k in job_env} == job_env
    assert not pod_only & set(base["env"]), "a torchx role must not inherit the pod's HOME and cache paths"
    spec = json.loads(base["env"]["CRUCIBLE_SPEC_JSON"])
    assert spec["data"] == {"uri": f"{root}/default/datapipeline/corpus/output"}  # fromRun resolved as `crucible render` does

    # The sharded DataPipeline is one role of two workers running every stage with barriers.
    corpus = found["corpus"]
    assert corpus["roles"] == [["data", 2, 0]] and corpus["job_replicas"] == [2, 2, 2]
    assert "--stage all --shard '${replica_id}' --num-shards 2" in corpus["script"]

    # ... and it ran for real: both workers exited 0 and the output is whole.
    assert found["succeeded"], found["state"]
    out = root / "default" / "datapipeline" / "corpus" / "output"
    success = json.loads((out / "_SUCCESS").read_text())
    assert success["stage"] == "data" and success["results"]["tokensTrain"] > 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert len({s["name"].split("-")[1] for s in manifest["splits"]["train"]["shards"]}) == 2  # both workers wrote
