"""A Mixtral-style MoE pretrains through the stage, exports as Mixtral, and continues from its own export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from trainlib import run_stage, step_losses, tiny_spec

MOE_MODEL = {"architecture": "mixtral", "moe": {"numExperts": 4, "topK": 2, "capacityFactor": 1.25, "everyNLayers": 1}}


@pytest.mark.slow
def test_moe_pretrains_exports_mixtral_and_continues_from_it(shards: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, MixtralForCausalLM

    first = tiny_spec(shards, tmp_path / "a", model=MOE_MODEL, training={"maxSteps": 6})
    rc, log = run_stage(first, tmp_path / "a" / "job")
    assert rc == 0, log[-3000:]
    records = [json.loads(line) for line in (tmp_path / "a" / "checkpoints" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "event" not in r]
    assert len(steps[-1]["moeExpertShare"]) == 4 and sum(steps[-1]["moeExpertShare"]) == pytest.approx(1, abs=1e-3)
    assert 0 <= steps[-1]["moeDroppedFraction"] < 1 and steps[-1]["moeAuxLoss"] > 0
    receipt = json.loads((tmp_path / "a" / "model" / "_SUCCESS").read_text())
    assert receipt["results"]["parameters"] > 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "model", dtype=torch.float32)
    assert isinstance(exported, MixtralForCausalLM) and exported.config.num_local_experts == 4

    source = {"architecture": "mixtral", "source": {"uri": str(tmp_path / "a" / "model")}, "moe": {"auxLossCoef": 0.02}}
    second = tiny_spec(shards, tmp_path / "b", model=source, training={"maxSteps": 3})
    rc, log = run_stage(second, tmp_path / "b" / "job")
    assert rc == 0, log[-3000:]
    before, after = step_losses(tmp_path / "a" / "checkpoints"), step_losses(tmp_path / "b" / "checkpoints")
    assert after[1] < before[1] - 0.2  # it continues from the trained experts, not from scratch
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "model"), MixtralForCausalLM)

    wrong = tiny_spec(shards, tmp_path / "c", model={"source": {"uri": str(tmp_path / "a" / "model")}})
    rc, log = run_stage(wrong, tmp_path / "c" / "job")
    assert rc == 2 and "model.architecture" in log and "architecture: mixtral" in log
