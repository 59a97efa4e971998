"""3-D layouts on 4 gloo ranks match one process; SIGKILL + resume of TP2×DP2 is exact."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from layout_worker import LAYOUT_TRAINING
from trainlib import (
    children,
    launch,
    make_engine,
    run_stage,
    run_worker_on_four_ranks,
    step_losses,
    tiny_spec,
)

from waits import scaled

HERE = Path(__file__).resolve().parent
LAYOUTS = {"tp2dp2": {"tensor": 2}, "pp2dp2": {"pipeline": 2}, "tp2pp2": {"tensor": 2, "pipeline": 2}}


def _relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.mark.slow
def test_layouts_match_one_process(shards: Path, tmp_path: Path) -> None:
    reference = make_engine(shards, tmp_path / "single", training=dict(LAYOUT_TRAINING), checkpoint={"interval": 100})
    try:
        reference.fit()
    finally:
        reference.close()
    expected = step_losses(tmp_path / "single" / "checkpoints")
    assert sorted(expected) == list(range(1, 11))

    run_worker_on_four_ranks(HERE / "layout_worker.py", shards, tmp_path, LAYOUTS, timeout=300)
    for name in LAYOUTS:
        got = step_losses(tmp_path / name / "checkpoints")
        assert sorted(got) == sorted(expected), name
        worst = max(_relative(got[s], expected[s]) for s in expected)
        assert worst <= 1e-4, (name, worst, got, expected)
    assert expected[10] < expected[1] - 0.3  # and the model learns


@pytest.mark.slow
def test_tp2_dp2_sigkill_resume_is_exact(shards: Path, tmp_path: Path) -> None:
    training = {**LAYOUT_TRAINING, "maxSteps": 8, "strategy": "fsdp", "parallelism": {"tensor": 2}}
    straight = tiny_spec(shards, tmp_path / "straight", training=training, checkpoint={"interval": 3})
    rc, log = run_stage(straight, tmp_path / "straight" / "job", nproc=4)
    assert rc == 0, log[-4000:]
    expected = step_losses(tmp_path / "straight" / "checkpoints")

    spec = tiny_spec(shards, tmp_path / "killed", training=training, checkpoint={"interval": 3})
    proc = launch(spec, tmp_path / "killed" / "job", nproc=4)
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.monotonic() + scaled(200)
    while max(step_losses(checkpoints), default=0) < 4:  # past the step-3 checkpoint
        assert proc.poll() is None, f"ended early with {proc.returncode}"
        assert time.monotonic() < deadline, "step 4 never reached"
        time.sleep(0.05)
    os.kill(children(proc.pid)[-1], signal.SIGKILL)
    proc.wait(timeout=scaled(100))
    assert proc.returncode != 0
    rc, log = run_stage(spec, tmp_path / "killed" / "job", nproc=4)
    assert rc == 0, log[-4000:]
    assert "resumed from" in log
    assert step_losses(checkpoints) == expected  # bit-exact continuation

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "killed" / "model")
    assert model.config.num_attention_heads == 4  # the export is the whole (un-split) model
