"""`crucible plan`: parameter counts against transformers, the FLOPs arithmetic, the command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crucible.cli import main as crucible
from crucible.core.capacity import GPUS, estimate, llama_parameters
from crucible.trainer.config import ModelConfig, PretrainConfig


@pytest.mark.parametrize(
    "shape",
    [
        {"hiddenSize": 64, "numLayers": 2, "numHeads": 4},
        {"hiddenSize": 64, "numLayers": 3, "numHeads": 8, "numKvHeads": 2, "intermediateSize": 160},
        {"hiddenSize": 96, "numLayers": 1, "numHeads": 6, "tieWordEmbeddings": True},
    ],
)
def test_parameter_count_matches_transformers(shape: dict) -> None:
    from crucible.trainer.model import build_model

    cfg = ModelConfig.model_validate({**shape, "vocabSize": 300})
    total, _ = llama_parameters(cfg, 300)
    model = build_model(cfg, 300, seed=0)
    assert total == sum(p.numel() for p in model.parameters())


def _spec(**training: int) -> PretrainConfig:
    return PretrainConfig.model_validate({
        "model": {"hiddenSize": 512, "numLayers": 8, "numHeads": 8, "vocabSize": 32000},
        "data": {"uri": "/data"},
        "training": {"seqLen": 1024, "globalBatchTokens": 65536, **training},
    })


def test_flops_hours_energy_arithmetic() -> None:
    spec = _spec(maxSteps=1000)
    plan = estimate("r", spec, GPUS["h100"], gpus=8, mfu=0.5)
    tokens = 1000 * 65536
    assert plan.tokens == tokens
    _, n = llama_parameters(spec.model, 32000)
    per_token = 6 * n + 12 * 8 * 512 * 1024
    assert plan.flops == pytest.approx(per_token * tokens)
    assert plan.gpu_hours == pytest.approx(plan.flops / (989e12 * 0.5) / 3600)
    assert plan.wall_hours == pytest.approx(plan.gpu_hours / 8)
    assert plan.energy_kwh == pytest.approx(plan.gpu_hours * 0.7)
    assert plan.tokens_per_parameter == pytest.approx(tokens / plan.parameters)


def test_max_tokens_wins_and_mfu_is_checked() -> None:
    assert estimate("r", _spec(maxTokens=10**9), GPUS["a100"], 1, 0.4).tokens == 10**9
    with pytest.raises(ValueError, match="mfu"):
        estimate("r", _spec(maxSteps=1), GPUS["a100"], 1, 1.5)


def test_plan_command_text_and_json(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert crucible(["plan", str(repo / "examples" / "pretrainrun.yaml")]) == 0
    out = capsys.readouterr().out
    assert "tokens/parameter" in out and "Chinchilla" in out and "kWh" in out and "16 × H100" in out
    assert crucible(["plan", str(repo / "examples" / "pretrainrun.yaml"), "--json", "--gpu", "a100", "--mfu", "0.3"]) == 0
    plan = json.loads(capsys.readouterr().out)[0]
    assert plan["gpu"] == "A100" and plan["gpus"] == 16 and plan["mfu"] == 0.3


def test_plan_command_errors(repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert crucible(["plan", str(repo / "examples" / "quantizejob.yaml")]) == 2
    assert "no PretrainRun" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text((repo / "examples" / "pretrainrun.yaml").read_text().replace("numLayers: 22", "numLayers: 0"))
    assert crucible(["plan", str(bad)]) == 2
    assert "numLayers" in capsys.readouterr().err
