"""Two ranks over gloo on CPU: every strategy trains; SIGKILL + resume is bit-exact; world-size changes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from trainlib import children, launch, run_stage, step_losses, tiny_spec, write_shards

from waits import scaled


def _check_output(root: Path, steps: int) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    losses = step_losses(root / "checkpoints")
    assert sorted(losses) == list(range(1, steps + 1))
    assert losses[steps] < losses[1] - 0.3, losses  # it learns
    receipt = json.loads((root / "model" / "_SUCCESS").read_text())
    assert receipt["stage"] == "pretrain" and receipt["results"]["steps"] == steps
    model = AutoModelForCausalLM.from_pretrained(root / "model")
    assert model.config.num_hidden_layers == 2
    assert AutoTokenizer.from_pretrained(root / "model").eos_token == "<eos>"


@pytest.mark.slow
@pytest.mark.parametrize("zero", [1, 3], ids=["zero1", "zero3"])
def test_deepspeed_trains_on_two_ranks(tmp_path: Path, zero: int) -> None:
    data = write_shards(tmp_path / "data")
    spec = tiny_spec(data, tmp_path, training={"strategy": "deepspeed", "zeroStage": zero, "maxSteps": 8},
                     checkpoint={"interval": 4})
    rc, log = run_stage(spec, tmp_path / "job", nproc=2)
    assert rc == 0, log[-3000:]
    _check_output(tmp_path, 8)
    if zero == 1:  # DeepSpeed's ZeRO files are per rank: another world size is refused, clearly
        (tmp_path / "model" / "_SUCCESS").unlink()
        spec["training"]["maxSteps"] = 10
        rc, log = run_stage(spec, tmp_path / "job", nproc=1)
        assert rc == 1, log[-3000:]
        assert "written by 2 ranks with strategy deepspeed" in log and "ds_to_universal" in log


def _kill_one_rank_at(proc: subprocess.Popen[str], checkpoints: Path, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + scaled(timeout)
    while time.monotonic() < deadline:
        if max(step_losses(checkpoints), default=0) >= step:
            workers = children(proc.pid)
            assert workers, "torchrun has no workers"
            os.kill(workers[-1], signal.SIGKILL)
            proc.wait(timeout=scaled(120))
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before step {step}")
        time.sleep(0.02)
    raise AssertionError(f"step {step} never reached")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_sigkill_one_rank_then_resume_is_bit_exact(tmp_path: Path, strategy: str) -> None:
    data = write_shards(tmp_path / "data")
    common: dict[str, Any] = {
        "training": {"strategy": strategy, "maxSteps": 16, "globalBatchTokens": 1024},
        "checkpoint": {"interval": 4, "asyncSave": True, "keep": 2},
    }
    ref = tiny_spec(data, tmp_path / "ref", **common)
    rc, log = run_stage(ref, tmp_path / "ref" / "job", nproc=2)
    assert rc == 0, log[-3000:]
    _check_output(tmp_path / "ref", 16)
    expected = step_losses(tmp_path / "ref" / "checkpoints")

    run = tiny_spec(data, tmp_path / "run", **common)
    proc = launch(run, tmp_path / "run" / "job", nproc=2)
    _kill_one_rank_at(proc, tmp_path / "run" / "checkpoints", step=10)
    assert proc.returncode != 0
    assert not (tmp_path / "run" / "model" / "_SUCCESS").exists()

    rc, log = run_stage(run, tmp_path / "run" / "job", nproc=2)
    assert rc == 0, log[-3000:]
    assert "resumed from" in log
    assert step_losses(tmp_path / "run" / "checkpoints") == expected  # bit for bit (JSON floats round-trip)
    ref_weights = (tmp_path / "ref" / "model" / "model.safetensors").read_bytes()
    assert (tmp_path / "run" / "model" / "model.safetensors").read_bytes() == ref_weights

    if strategy == "ddp":  # ddp/fsdp checkpoints reshard: continue the finished run on one rank
        (tmp_path / "ref" / "model" / "_SUCCESS").unlink()
        longer = tiny_spec(data, tmp_path / "ref", **{**common, "training": {**common["training"], "maxSteps": 18}})
        rc, log = run_stage(longer, tmp_path / "ref" / "job", nproc=1)
        assert rc == 0, log[-3000:]
        assert "written by 2 ranks, resuming on 1" in log and "resumed from" in log
        assert sorted(step_losses(tmp_path / "ref" / "checkpoints")) == list(range(1, 19))


@pytest.mark.slow
def test_hung_rank_makes_the_watchdog_exit_retriable(tmp_path: Path) -> None:
    """SIGSTOP one rank: the other blocks in a collective and its watchdog exits 75 after hangTimeout."""
    data = write_shards(tmp_path / "data")
    spec = tiny_spec(data, tmp_path, training={"maxSteps": 100000, "globalBatchTokens": 1024},
                     failurePolicy={"hangTimeout": "10s"}, checkpoint={"interval": 1000})
    proc = launch(spec, tmp_path / "job", nproc=2, CRUCIBLE_TERMINATION_LOG=str(tmp_path / "termination-log"))
    deadline = time.monotonic() + scaled(240)
    stopped = None
    try:
        while time.monotonic() < deadline and stopped is None:
            if max(step_losses(tmp_path / "checkpoints"), default=0) >= 3:
                stopped = sorted(children(proc.pid))[-1]
                os.kill(stopped, signal.SIGSTOP)
            time.sleep(0.05)
        assert stopped is not None, "step 3 never reached"
        log_file = next(iter(sorted((tmp_path / "job").glob("log-*.txt"))))
        while time.monotonic() < deadline and "watchdog: no progress" not in log_file.read_text():
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):  # let torchrun's SIGTERM reach the stopped rank
            os.kill(stopped, signal.SIGCONT)
        proc.wait(timeout=scaled(120))
    finally:
        if stopped is not None:
            with contextlib.suppress(ProcessLookupError):  # torchrun has usually killed it by now
                os.kill(stopped, signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
    log = next(iter(sorted((tmp_path / "job").glob("log-*.txt")))).read_text()
    assert "watchdog: no progress" in log, log[-3000:]
    assert "exitcode  : 75" in log  # torchrun's report of the rank that detected the hang
    assert "retriable" in (tmp_path / "termination-log").read_text()
