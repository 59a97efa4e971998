"""The quickstart, shortened, end to end with the real stages: SIGKILL during pretraining, rerun, report.

Same YAML files as examples/quickstart/ with fewer steps and a smaller model, so it fits the
CI budget on two cores. The runner and its pretraining process are SIGKILLed once a
checkpoint exists (a laptop losing power mid-run); the rerun skips the finished DataPipeline,
resumes the PretrainRun from that checkpoint, runs the rest, and writes the report.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from waits import scaled

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "quickstart"
CRUCIBLE = [sys.executable, "-m", "crucible.cli"]


def shorten(folder: Path) -> None:
    """Make every stage of the copied quickstart small and quick (shapes kept consistent)."""
    def edit(name: str, change: Any) -> None:
        path = folder / name
        doc = yaml.safe_load(path.read_text())
        change(doc["spec"])
        path.write_text(yaml.safe_dump(doc, sort_keys=False))

    def short_prompts(spec: dict[str, Any]) -> None:
        spec["eval"]["prompts"] = spec["eval"]["prompts"][:2]
        spec["eval"]["maxNewTokens"] = 6

    def pretrain(spec: dict[str, Any]) -> None:
        spec["model"] = {"hiddenSize": 64, "intermediateSize": 128, "numLayers": 2, "numHeads": 2,
                         "maxPositionEmbeddings": 256, "tieWordEmbeddings": True}
        spec["training"].update(seqLen=128, microBatchSize=4, globalBatchTokens=512, maxSteps=40,
                                evalEvery=20, evalBatches=2)
        spec["optimizer"]["warmupSteps"] = 4
        spec["checkpoint"]["interval"] = 10
        short_prompts(spec)

    def post(steps: int) -> Any:
        def change(spec: dict[str, Any]) -> None:
            spec["training"].update(seqLen=64, microBatchSize=4, globalBatchTokens=256, maxSteps=steps,
                                    evalEvery=steps, evalBatches=1)
            spec["optimizer"]["warmupSteps"] = 1
            spec["checkpoint"]["interval"] = steps
            short_prompts(spec)
        return change

    def quantize(spec: dict[str, Any]) -> None:
        spec["evaluation"].update(maxBatches=2, seqLen=64)
        spec["groupSize"] = 64  # the shortened model is 64 wide
        spec["maxPerplexityIncrease"] = 0.5  # a 100 k-parameter model is noisy; the real bar is in the demo
        short_prompts(spec)

    edit("02-pretrain.yaml", pretrain)
    edit("03-finetune.yaml", post(6))
    edit("04-preference.yaml", post(4))
    edit("05-quantize.yaml", quantize)

    def rl(spec: dict[str, Any]) -> None:
        spec["training"].update(seqLen=64, microBatchSize=4, globalBatchTokens=512, maxSteps=2)
        spec["rl"]["maxNewTokens"] = 8
        spec["checkpoint"]["interval"] = 2
        short_prompts(spec)

    edit("06-rl.yaml", rl)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def trainers_of(workdir: Path) -> list[int]:
    """Live processes whose command line names a spec under ``workdir``."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(workdir) in cmd and "crucible.trainer" in cmd and alive(int(proc.name)):
                found.append(int(proc.name))
    return found


def input_entries(inputs: Any) -> Any:
    if isinstance(inputs, dict) and "uri" in inputs:
        yield inputs
    elif isinstance(inputs, dict):
        for value in inputs.values():
            yield from input_entries(value)


@pytest.mark.slow
def test_shortened_quickstart_survives_sigkill_and_resumes(tmp_path: Path) -> None:
    folder = tmp_path / "quickstart"
    shutil.copytree(QUICKSTART, folder, ignore=shutil.ignore_patterns("__pycache__", "README.md"))
    shorten(folder)
    workdir = tmp_path / "work"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("CRUCIBLE_TRAINER_COMMAND", None)
    env.pop("CRUCIBLE_BASE_MODEL", None)
    argv = [*CRUCIBLE, "run", str(folder), "-w", str(workdir), "--plain", "--allow-prepare"]
    pre_dir = workdir / "default" / "pretrainrun" / "stdlib-lm"

    first = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + scaled(150)
        while not list((pre_dir / "checkpoints").glob("step-*/manifest.json")):
            assert first.poll() is None, first.communicate()[0]
            assert time.monotonic() < deadline, "no pretraining checkpoint in time"
            time.sleep(0.05)
        state_at_kill = json.loads((pre_dir / "state.json").read_text())
        first.kill()  # the runner dies first: its trainers must follow (PR_SET_PDEATHSIG)
    finally:
        if first.poll() is None:
            first.kill()
    first_output = first.communicate()[0]
    assert first.returncode == -signal.SIGKILL
    # A dying trainer loses its cmdline before it leaves /proc: wait for both views to clear
    # (tearing down torch takes a few seconds on a loaded machine).
    deadline = time.monotonic() + scaled(20)
    while (trainers_of(workdir) or any(alive(p) for p in state_at_kill["pids"])) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not trainers_of(workdir), "trainer processes outlived their runner"
    assert state_at_kill["pids"] and not any(alive(p) for p in state_at_kill["pids"])
    assert not (pre_dir / "output" / "_SUCCESS").exists(), "pretraining finished before it could be killed"
    killed_at = max(int(p.parent.name[5:]) for p in (pre_dir / "checkpoints").glob("step-*/manifest.json"))

    second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=scaled(400))
    out = second.stdout + second.stderr
    assert second.returncode == 0, out
    assert "DataPipeline stdlib-corpus: already succeeded" in out
    assert "6/6 run(s) succeeded" in out

    logs = {p.name: p.read_text()[-3000:] for p in (pre_dir / "logs").glob("*.log")}
    assert "attempt-1.log" in logs, (state_at_kill, first_output[-3000:], logs, out[-3000:])
    log = logs["attempt-1.log"]
    assert "resumed from" in log, log[-2000:]
    state = json.loads((pre_dir / "state.json").read_text())
    assert state["status"]["restarts"] == 1
    assert state["status"]["results"].get("resumedFromStep", killed_at) >= killed_at

    status = subprocess.run([*CRUCIBLE, "status", "-w", str(workdir), "-o", "json"], env=env,
                            capture_output=True, text=True, check=True)
    phases = {s["name"]: s["status"]["phase"] for s in json.loads(status.stdout)}
    assert phases == dict.fromkeys(
        ["stdlib-corpus", "stdlib-lm", "stdlib-sft", "stdlib-dpo", "stdlib-int8", "stdlib-grpo"], "Succeeded")

    report = (workdir / "report.md").read_text()
    for heading in ("Data pipeline", "Training loss", "Held-out perplexity", "The same questions", "Quantization",
                    "win rate after vs before", "GRPO raises the held-out reward"):
        assert heading in report
    assert "exact_duplicate" in report and "language_de" in report  # the planted noise was caught
    assert "Domain perplexity falls after pretraining" in report
    assert "data:image/png;base64," in (workdir / "report.html").read_text()

    # The final model walks back through every stage to the source, its licence and its raw file.
    lineage = subprocess.run([*CRUCIBLE, "lineage", "stdlib-int8", "-w", str(workdir), "--json"], env=env,
                             capture_output=True, text=True)
    assert lineage.returncode == 0, lineage.stdout[-3000:] + lineage.stderr
    node, stages = json.loads(lineage.stdout), []
    while node:
        stages.append(node["stage"])
        node = node["inputs"].get("inputs.model") or node["inputs"].get("inputs.data")  # the model's own line
    assert stages == ["quantize", "preference", "finetune", "pretrain", "data"]
    # every input of every stage is recorded by content: {uri, sha256, ...}
    receipts = sorted(workdir.glob("default/*/*/output/_SUCCESS"))
    assert len(receipts) == 6
    for path in receipts:
        entries = list(input_entries(json.loads(path.read_text())["inputs"]))
        assert entries and all(isinstance(e.get("sha256"), str) and len(e["sha256"]) == 64 for e in entries), path
    shard = next((workdir / "default" / "datapipeline" / "stdlib-corpus" / "output" / "train").glob("*.bin"))
    shard.write_bytes(shard.read_bytes()[::-1])  # tamper with the training data after the fact
    tampered = subprocess.run([*CRUCIBLE, "lineage", "stdlib-int8", "-w", str(workdir)], env=env,
                              capture_output=True, text=True)
    assert tampered.returncode == 1, tampered.stdout[-3000:]
    assert f"✗ shards/train/{shard.name}" in tampered.stdout and "licence PSF-2.0" in tampered.stdout
