"""`python -m crucible.trainer pretrain` end to end on one process: artefacts, receipt, errors, S3, kills."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
from trainlib import launch, run_stage, step_losses, tiny_spec

from crucible.trainer import storage as st
from crucible.trainer.checkpoint import MANIFEST, Checkpointer
from crucible.trainer.config.common import S3Config
from waits import scaled


def test_pretrain_writes_a_loadable_model_and_a_lineage_receipt(shards: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = tiny_spec(shards, tmp_path, training={"evalEvery": 5}, eval={"prompts": ["w5 w6 w7"], "maxNewTokens": 4})
    rc, log = run_stage(spec, tmp_path / "job")
    assert rc == 0, log[-3000:]
    out = tmp_path / "model"
    receipt = json.loads((out / "_SUCCESS").read_text())
    assert receipt["stage"] == "pretrain"
    assert receipt["inputs"]["data"]["uri"] == str(shards)
    assert receipt["inputs"]["data"]["sha256"] == hashlib.sha256((shards / "manifest.json").read_bytes()).hexdigest()
    assert receipt["inputs"]["tokenizer"]["files"].keys() >= {"tokenizer.json"}  # the data's tokenizer/, by content
    results = receipt["results"]
    assert results["steps"] == 12 and results["tokens"] == 12 * 256
    assert results["perplexity"] > 1 and results["finalLoss"] < 4.7 and results["parameters"] > 0
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("w5 w6 w7", return_tensors="pt")["input_ids"]
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == 6
    records = [json.loads(line) for line in (tmp_path / "checkpoints" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "event" not in r]
    assert {"step", "loss", "lr", "gradNorm", "tokens", "tokensPerSecond", "mfu", "time"} <= set(steps[0])
    assert [r["step"] for r in records if r.get("event") == "eval"] == [5, 10, 12]
    assert [r["step"] for r in records if r.get("event") == "checkpoint"] == [4, 8, 12]
    answered = json.loads((out / "eval" / "prompts.json").read_text())["prompts"]
    assert answered[0]["prompt"] == "w5 w6 w7" and answered[0]["after"]
    # a finished stage returns at once
    started = time.monotonic()
    rc, log = run_stage(spec, tmp_path / "job")
    assert rc == 0 and "nothing to do" in log and time.monotonic() - started < 30
    # killed after the last checkpoint but before _SUCCESS: the retry only exports again
    (out / "_SUCCESS").unlink()
    rc, log = run_stage(spec, tmp_path / "job")
    assert rc == 0, log[-2000:]
    again = json.loads((out / "_SUCCESS").read_text())["results"]
    assert again["finalLoss"] == results["finalLoss"] and again["resumedFromStep"] == 12


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"training": {"seqLen": 4}}, "spec.training.seqLen"),
        ({"training": {"globalBatchTokens": 300}}, "globalBatchTokens: 300 must be a multiple"),
        ({"data": {"uri": "/nonexistent/data"}}, "data.uri /nonexistent/data: no train/index.json"),
        ({"model": {"hiddenSize": 30, "numHeads": 4}}, "spec.model.hiddenSize: 30 must be divisible by numHeads (4)"),
    ],
)
def test_bad_spec_exits_2_naming_the_field(
    shards: Path, tmp_path: Path, change: dict, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from crucible.trainer.__main__ import main

    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(tiny_spec(shards, tmp_path, **change)))
    assert main(["pretrain", "--spec", str(spec_file)]) == 2
    err = capsys.readouterr().err
    assert message in err and "bad input (exit 2)" in err


def test_pretrain_on_s3(shards: Path, tmp_path: Path, s3_server: str, s3_bucket: str) -> None:
    from transformers import AutoModelForCausalLM

    store = st.Storage(S3Config(endpoint_url=s3_server, addressing_style="path"))
    store.upload_dir(shards, f"s3://{s3_bucket}/data")
    root = f"s3://{s3_bucket}/runs/tiny"
    spec = tiny_spec(shards, tmp_path, data={"uri": f"s3://{s3_bucket}/data"},
                     checkpoint={"uri": f"{root}/checkpoints", "interval": 6},
                     output={"uri": f"{root}/model"},
                     storage={"s3": {"endpointUrl": s3_server, "addressingStyle": "path"}})
    rc, log = run_stage(spec, tmp_path / "job")
    assert rc == 0, log[-3000:]
    receipt = json.loads(store.read_bytes(f"{root}/model/_SUCCESS"))
    assert receipt["inputs"]["data"]["sha256"] == hashlib.sha256((shards / "manifest.json").read_bytes()).hexdigest()
    assert store.exists(f"{root}/checkpoints/step-000000012/{MANIFEST}")
    local = store.download_prefix(f"{root}/model", tmp_path / "downloaded")
    assert AutoModelForCausalLM.from_pretrained(local).config.vocab_size == 128


@pytest.mark.slow
def test_sigkill_at_random_points_never_resumes_from_a_partial_checkpoint(shards: Path, tmp_path: Path) -> None:
    """Checkpoint every step (most of the time is spent saving), SIGKILL at random moments, resume."""
    common = {"training": {"maxSteps": 20}, "checkpoint": {"interval": 1, "keep": 3, "asyncSave": True}}
    rc, log = run_stage(tiny_spec(shards, tmp_path / "ref", **common), tmp_path / "ref" / "job")
    assert rc == 0, log[-2000:]
    expected = step_losses(tmp_path / "ref" / "checkpoints")
    spec = tiny_spec(shards, tmp_path / "run", **common)
    ckpts = tmp_path / "run" / "checkpoints"
    rng = random.Random(4)
    for target in (4, 9, 14):
        proc = launch(spec, tmp_path / "run" / "job")
        deadline = time.monotonic() + scaled(180)
        while max(step_losses(ckpts), default=0) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.05))  # somewhere inside the next step or save
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        checkpointer = Checkpointer(str(ckpts), st.Storage(), _one_rank(), 3, False, "", lambda m: None)
        found = checkpointer.latest_valid()
        assert found is not None  # the newest complete one verifies, whatever the kill tore
        steps = checkpointer.list_steps()
        complete = [s for s in steps if (ckpts / f"step-{s:09d}" / MANIFEST).exists()]
        for step in steps:
            if step not in complete:
                # a torn save is newer than the checkpoint resumed from; a kill inside the pruning of
                # an old one leaves it older than every checkpoint kept, and the next save prunes it
                assert step > found[0].step or step < min(complete[-3:]), (step, steps, complete)
    rc, log = run_stage(spec, tmp_path / "run" / "job")
    assert rc == 0, log[-2000:]
    assert step_losses(ckpts) == expected  # three kills later, still bit-exact
    done = Checkpointer(str(ckpts), st.Storage(), _one_rank(), 3, False, "", lambda m: None)
    assert all((ckpts / f"step-{s:09d}" / MANIFEST).exists() for s in done.list_steps())  # nothing torn is left


def _one_rank():
    import torch

    from crucible.trainer.distributed import DistEnv

    return DistEnv(0, 1, 0, 1, torch.device("cpu"))


def test_sigterm_saves_a_checkpoint_and_exits_retriable(shards: Path, tmp_path: Path) -> None:
    """Kubernetes eviction: SIGTERM → checkpoint at the current step → exit 75 → resume there."""
    spec = tiny_spec(shards, tmp_path, training={"maxSteps": 100000}, checkpoint={"interval": 100000})
    proc = launch(spec, tmp_path / "job")
    deadline = time.monotonic() + scaled(180)
    while max(step_losses(tmp_path / "checkpoints"), default=0) < 3 and time.monotonic() < deadline:
        assert proc.poll() is None
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=scaled(120)) == 75
    checkpointer = Checkpointer(str(tmp_path / "checkpoints"), st.Storage(), _one_rank(), 3, False, "", print)
    found = checkpointer.latest_valid()
    assert found is not None and found[0].step >= 3
