"""Builders for embedded-runner tests: small pipelines of real resource YAML run by a stand-in trainer."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

FAKE_STAGE = Path(__file__).with_name("fake_stage.py")
API = "crucible.dev/v1alpha1"
FAST_POLICY = {"maxRestarts": 2, "backoffSeconds": 0, "maxBackoffSeconds": 0, "hangTimeout": "10s"}


def data_pipeline(name: str = "corpus", source: str = "inputs/docs.jsonl") -> dict[str, Any]:
    return {"apiVersion": API, "kind": "DataPipeline", "metadata": {"name": name},
            "spec": {"sources": [{"name": "docs", "uri": source}], "tokenizer": {"vocabSize": 512}}}


def pretrain_run(name: str = "base", data: str = "corpus", steps: int = 6, **training: Any) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "PretrainRun", "metadata": {"name": name},
            "spec": {"data": {"fromRun": {"kind": "DataPipeline", "name": data}},
                     "model": {"hiddenSize": 32, "numLayers": 1, "numHeads": 2},
                     "training": {"seqLen": 16, "globalBatchTokens": 64, "microBatchSize": 4,
                                  "maxSteps": steps, **training},
                     "checkpoint": {"interval": 2},
                     "failurePolicy": dict(FAST_POLICY)}}


def finetune_run(name: str = "sft", model: str = "base", dataset: str = "inputs/sft.jsonl") -> dict[str, Any]:
    return {"apiVersion": API, "kind": "FinetuneRun", "metadata": {"name": name},
            "spec": {"model": {"fromRun": {"kind": "PretrainRun", "name": model}},
                     "dataset": {"uri": dataset},
                     "training": {"seqLen": 16, "globalBatchTokens": 64, "microBatchSize": 4, "maxSteps": 4},
                     "failurePolicy": dict(FAST_POLICY)}}


def quantize_job(name: str = "int8", model: str = "sft", kind: str = "FinetuneRun") -> dict[str, Any]:
    return {"apiVersion": API, "kind": "QuantizeJob", "metadata": {"name": name},
            "spec": {"model": {"fromRun": {"kind": kind, "name": model}}}}


def chain() -> list[dict[str, Any]]:
    return [data_pipeline(), pretrain_run(), finetune_run(), quantize_job()]


class Pipeline:
    """A folder of YAML files plus a work directory with the local inputs in place."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.folder = root / "pipeline"
        self.workdir = root / "work"
        self.folder.mkdir()
        (self.workdir / "inputs").mkdir(parents=True)
        (self.workdir / "inputs" / "docs.jsonl").write_text('{"text": "hello"}\n')
        (self.workdir / "inputs" / "sft.jsonl").write_text('{"prompt": "q", "response": "a"}\n')

    def write(self, resources: list[dict[str, Any]], name: str = "pipeline.yaml") -> Path:
        path = self.folder / name
        path.write_text(yaml.safe_dump_all(copy.deepcopy(resources), sort_keys=False))
        return path

    def runner(self, **options: Any) -> Any:
        from crucible.local.runner import Runner, RunnerOptions
        from crucible.local.ui import PlainUi

        opts = RunnerOptions(workdir=self.workdir, trainer_command=[sys.executable, str(FAKE_STAGE)], **options)
        return Runner(opts, PlainUi())

    def run(self, **options: Any) -> dict[str, Any]:
        from crucible.local.load import load_resources

        outcomes = self.runner(**options).run(load_resources([self.folder]))
        return {o.key[2]: o for o in outcomes}

    def state(self, kind: str, name: str) -> Any:
        from crucible.local.workdir import WorkDir

        return WorkDir(self.workdir).load_state("default", kind, name)

    def run_dir(self, kind: str, name: str) -> Path:
        return self.workdir / "default" / kind.lower() / name

    def log(self, kind: str, name: str, attempt: int = 0) -> str:
        return (self.run_dir(kind, name) / "logs" / f"attempt-{attempt}.log").read_text()


@pytest.fixture
def pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Pipeline:
    monkeypatch.delenv("FAKE_BEHAVIOUR", raising=False)
    monkeypatch.delenv("CRUCIBLE_BASE_MODEL", raising=False)
    return Pipeline(tmp_path)


def behave(monkeypatch: pytest.MonkeyPatch, **runs: dict[str, Any]) -> None:
    monkeypatch.setenv("FAKE_BEHAVIOUR", json.dumps(runs))
