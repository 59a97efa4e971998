"""Two ranks over gloo on CPU: every strategy trains; SIGKILL + resume is bit-exact; world-size changes."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from trainlib import children, launch, run_stage, step_losses, tiny_spec, write_shards


def _loads_as_hf(model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.num_hidden_layers == 2
    assert AutoTokenizer.from_pretrained(model_dir).eos_token == "<eos>"


@pytest.mark.parametrize(
    ("strategy", "zero"),
    [("ddp", 2), ("fsdp", 2), ("deepspeed", 1), ("deepspeed", 3)],
    ids=["ddp", "fsdp", "zero1", "zero3"],
)
def test_strategy_trains_on_two_ranks(tmp_path: Path, strategy: str, zero: int) -> None:
    data = write_shards(tmp_path / "data")
    spec = tiny_spec(data, tmp_path, training={"strategy": strategy, "zeroStage": zero, "maxSteps": 10})
    rc, log = run_stage(spec, tmp_path / "job", nproc=2)
    assert rc == 0, log[-3000:]
    losses = step_losses(tmp_path / "checkpoints")
    assert sorted(losses) == list(range(1, 11))
    assert losses[10] < losses[1] - 0.3, losses  # it learns
    receipt = json.loads((tmp_path / "model" / "_SUCCESS").read_text())
    assert receipt["results"]["steps"] == 10
    _loads_as_hf(tmp_path / "model")


def _kill_one_rank_at(proc, checkpoints: Path, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if max(step_losses(checkpoints), default=0) >= step:
            workers = children(proc.pid)
            assert workers, "torchrun has no workers"
            os.kill(workers[-1], signal.SIGKILL)
            proc.wait(timeout=120)
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before step {step}")
        time.sleep(0.02)
    raise AssertionError(f"step {step} never reached")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_sigkill_one_rank_then_resume_is_bit_exact(tmp_path: Path, strategy: str) -> None:
    data = write_shards(tmp_path / "data")
    common = {"training": {"strategy": strategy, "maxSteps": 24, "globalBatchTokens": 2048},
              "checkpoint": {"interval": 5, "asyncSave": True, "keep": 2}}
    ref = tiny_spec(data, tmp_path / "ref", **common)
    rc, log = run_stage(ref, tmp_path / "ref" / "job", nproc=2)
    assert rc == 0, log[-3000:]
    expected = step_losses(tmp_path / "ref" / "checkpoints")

    run = tiny_spec(data, tmp_path / "run", **common)
    proc = launch(run, tmp_path / "run" / "job", nproc=2)
    _kill_one_rank_at(proc, tmp_path / "run" / "checkpoints", step=13)
    assert proc.returncode != 0
    assert not (tmp_path / "run" / "model" / "_SUCCESS").exists()

    rc, log = run_stage(run, tmp_path / "run" / "job", nproc=2)
    assert rc == 0, log[-3000:]
    assert "resumed from" in log
    got = step_losses(tmp_path / "run" / "checkpoints")
    assert got == expected  # every step's loss, bit for bit (JSON floats round-trip exactly)
    ref_weights = (tmp_path / "ref" / "model" / "model.safetensors").read_bytes()
    assert (tmp_path / "run" / "model" / "model.safetensors").read_bytes() == ref_weights


@pytest.mark.slow
def test_resume_on_fewer_ranks_reshards(tmp_path: Path) -> None:
    data = write_shards(tmp_path / "data")
    first = tiny_spec(data, tmp_path, training={"maxSteps": 6}, checkpoint={"interval": 3})
    rc, log = run_stage(first, tmp_path / "job", nproc=2)
    assert rc == 0, log[-3000:]
    (tmp_path / "model" / "_SUCCESS").unlink()
    longer = tiny_spec(data, tmp_path, training={"maxSteps": 9}, checkpoint={"interval": 3})
    rc, log = run_stage(longer, tmp_path / "job", nproc=1)
    assert rc == 0, log[-3000:]
    assert "resharding" in log and "written by 2 ranks, resuming on 1" in log
    assert "resumed from" in log and "step 6" in log
    losses = step_losses(tmp_path / "checkpoints")
    assert sorted(losses) == list(range(1, 10))


@pytest.mark.slow
def test_deepspeed_refuses_another_world_size(tmp_path: Path) -> None:
    data = write_shards(tmp_path / "data")
    spec = tiny_spec(data, tmp_path, training={"strategy": "deepspeed", "zeroStage": 2, "maxSteps": 4},
                     checkpoint={"interval": 2})
    rc, log = run_stage(spec, tmp_path / "job", nproc=2)
    assert rc == 0, log[-3000:]
    (tmp_path / "model" / "_SUCCESS").unlink()
    spec["training"]["maxSteps"] = 6
    rc, log = run_stage(spec, tmp_path / "job", nproc=1)
    assert rc == 1
    assert "written by 2 ranks with strategy deepspeed" in log and "ds_to_universal" in log
