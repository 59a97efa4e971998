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


# -- memory per GPU ------------------------------------------------------------------------------


def _training(**over: object) -> object:
    from crucible.trainer.config.training import TrainingConfig

    return TrainingConfig.model_validate({"seqLen": 64, "globalBatchTokens": 4096, "microBatchSize": 2,
                                          "maxSteps": 1, **over})


def test_model_state_bytes_match_a_real_adamw_step() -> None:
    """weights + gradients + AdamW moments of the estimate are what torch holds after a step (fp32, one rank)."""
    import torch

    from crucible.core.layout import GIB, memory_breakdown
    from crucible.trainer.config.training import OptimizerConfig
    from crucible.trainer.model import build_model
    from crucible.trainer.optim import build_adamw

    cfg = ModelConfig.model_validate({"hiddenSize": 64, "numLayers": 2, "numHeads": 4, "vocabSize": 300})
    model = build_model(cfg, 300, seed=0)
    optimizer = build_adamw(model, OptimizerConfig(), torch.device("cpu"))
    model(input_ids=torch.zeros(1, 8, dtype=torch.long), labels=torch.zeros(1, 8, dtype=torch.long)).loss.backward()
    optimizer.step()
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    params = nbytes(model.parameters())
    grads = nbytes(p.grad for p in model.parameters() if p.grad is not None)
    moments = nbytes(v for state in optimizer.state.values() for k, v in state.items() if k != "step")
    m = memory_breakdown(cfg, 300, _training(precision="fp32"), world=1)
    assert m.parameters_gib * GIB == pytest.approx(params)
    assert m.gradients_gib * GIB == pytest.approx(grads)
    assert m.optimizer_gib * GIB == pytest.approx(moments)


def test_memory_per_gpu_by_strategy() -> None:
    from crucible.core.layout import memory_breakdown

    cfg = ModelConfig.model_validate({"hiddenSize": 4096, "numLayers": 32, "numHeads": 32, "vocabSize": 32000})
    ddp = memory_breakdown(cfg, 32000, _training(), world=8)
    fsdp = memory_breakdown(cfg, 32000, _training(strategy="fsdp"), world=8)
    zero1 = memory_breakdown(cfg, 32000, _training(strategy="deepspeed", zeroStage=1), world=8)
    zero3 = memory_breakdown(cfg, 32000, _training(strategy="deepspeed", zeroStage=3), world=8)
    states = lambda m: m.parameters_gib + m.gradients_gib + m.optimizer_gib  # noqa: E731
    assert states(ddp) == pytest.approx(8 * states(fsdp))  # FSDP shards the 16 bytes over 8 ranks
    per_byte = ddp.parameters_gib / 4  # GiB per byte of every parameter (ddp's weights are fp32)
    # ZeRO under bf16: 16-bit weights and gradients, fp32 master weights + moments (12 bytes) sharded
    assert (zero1.parameters_gib, zero1.gradients_gib) == (pytest.approx(2 * per_byte), pytest.approx(2 * per_byte))
    assert zero1.optimizer_gib == pytest.approx(12 / 8 * per_byte)
    assert states(zero3) == pytest.approx((2 + 2 + 12) / 8 * per_byte)
    checkpointed = memory_breakdown(cfg, 32000, _training(strategy="fsdp", activationCheckpointing=True), world=8)
    assert checkpointed.activations_gib == pytest.approx(fsdp.activations_other_gib)
    assert checkpointed.activations_gib < fsdp.activations_gib / 5
    assert fsdp.staging_host_gib == pytest.approx(fsdp.parameters_gib * 3)  # fp32 weights + two moments


def test_plan_says_which_field_to_change_when_it_does_not_fit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "7b.yaml"
    path.write_text("""
apiVersion: crucible.dev/v1alpha1
kind: PretrainRun
metadata: {name: seven-b, namespace: ml}
spec:
  model: {hiddenSize: 4096, numLayers: 32, numHeads: 32, vocabSize: 32000, maxPositionEmbeddings: 4096}
  data: {uri: s3://corpus/tokens}
  training: {seqLen: 4096, globalBatchTokens: 4194304, microBatchSize: 4, maxSteps: 1000, strategy: ddp}
  checkpoint: {uri: s3://ckpt/seven-b}
  output: {uri: s3://models/seven-b}
  resources: {nodes: 1, gpusPerNode: 8, nodePool: h100}
""")
    assert crucible(["plan", str(path), "--json"]) == 0
    (plan,) = json.loads(capsys.readouterr().out)
    assert plan["memory"]["setup"].startswith("ddp") and plan["memory"]["total"] > 80
    assert plan["memory_advice"] and plan["memory_advice"].startswith("training.")
    assert crucible(["plan", str(path)]) == 0
    text = capsys.readouterr().out
    assert "memory per GPU" in text and "does not fit      change training." in text

    fits = path.read_text().replace("microBatchSize: 4, maxSteps: 1000, strategy: ddp",
                                    "microBatchSize: 1, maxSteps: 1000, strategy: fsdp, activationCheckpointing: true")
    path.write_text(fits)
    assert crucible(["plan", str(path), "--json"]) == 0
    (plan,) = json.loads(capsys.readouterr().out)
    assert plan["memory"]["total"] < 0.85 * 80 and plan["memory_advice"] is None


def test_expert_parallel_memory_gathers_only_own_experts() -> None:
    """EP keeps the (already FSDP-sharded) model states per GPU; FSDP gathers 1/EP of each block's experts."""
    from crucible.core.layout import GIB, expert_parameters, layout_memory, memory_breakdown, model_parameters

    cfg = ModelConfig.model_validate({"hiddenSize": 1024, "numLayers": 8, "numHeads": 16, "vocabSize": 32000,
                                      "architecture": "mixtral", "moe": {"numExperts": 8, "topK": 2}})
    plain = memory_breakdown(cfg, 32000, _training(strategy="fsdp", parallelism={}), world=16)
    ep = memory_breakdown(cfg, 32000, _training(strategy="fsdp", parallelism={"expert": 8}), world=16)
    states = lambda m: m.parameters_gib + m.gradients_gib + m.optimizer_gib  # noqa: E731
    assert states(ep) == pytest.approx(states(plain)) and "expert parallel 8" in ep.setup
    total, _, _ = model_parameters(cfg, 32000)
    experts = expert_parameters(cfg)
    assert experts == 8 * 8 * 3 * 1024 * 2752  # 8 blocks × 8 experts × SwiGLU of the dense width
    block = lambda e: (total - 2 * 32000 * 1024 - experts * (1 - 1 / e)) / 8  # noqa: E731
    assert plain.gathered_gib * GIB == pytest.approx(2 * 2 * block(1))  # bf16, two blocks
    assert ep.gathered_gib * GIB == pytest.approx(2 * 2 * block(8))
    spec = _training(strategy="fsdp", parallelism={"expert": 8})
    assert layout_memory(cfg, 32000, spec, (1, 16, 1, 1)).describe().endswith("(expert 8)")
