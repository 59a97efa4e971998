"""training.precision: never silently fp32; fp16 overflow steps skipped, counted, and resumed exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from trainlib import make_engine

from crucible.trainer.faults import SpecError
from crucible.trainer.precision import LossScaler, resolve


def test_auto_on_cpu_is_fp32_and_says_so() -> None:
    choice = resolve("auto", torch.device("cpu"), "ddp")
    assert choice.name == "fp32" and "auto on CPU" in choice.reason
    assert resolve("bf16", torch.device("cpu"), "fsdp").dtype == torch.bfloat16  # CPU autocast, not fp32


def test_bf16_on_a_gpu_without_it_is_an_error_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    with pytest.raises(SpecError, match=r"training.precision: bf16 .* Tesla V100 cannot run bf16; use fp16"):
        resolve("bf16", torch.device("cuda", 0), "ddp")
    auto = resolve("auto", torch.device("cuda", 0), "ddp")
    assert auto.name == "fp16" and auto.loss_scaling and "no bf16" in auto.reason
    with pytest.raises(SpecError, match="deepspeed needs a GPU"):
        resolve("bf16", torch.device("cpu"), "deepspeed")


def test_loss_scaler_halves_on_overflow_and_grows_after_clean_steps() -> None:
    scaler = LossScaler(init_scale=8.0, growth_interval=2)
    assert scaler.update(float("inf")) and scaler.scale == 4.0 and scaler.overflows == 1
    assert not scaler.update(1.0) and not scaler.update(1.0) and scaler.scale == 8.0
    again = LossScaler()
    again.load_state_dict(scaler.state_dict())
    assert (again.scale, again.good_steps, again.overflows) == (8.0, 0, 1)


class _InfGrad(torch.autograd.Function):
    """Identity forward; an infinite gradient backward (what an fp16 overflow looks like)."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def, override]
        return grad * float("inf")


class _Overflowing:
    """The pretraining objective, with the gradients of the steps in ``at`` overflowing."""

    def __init__(self, inner, engine_ref: list, at: set[int]) -> None:  # type: ignore[no-untyped-def]
        self.inner, self.engine_ref, self.at = inner, engine_ref, at

    def __getattr__(self, name):  # type: ignore[no-untyped-def]
        return getattr(self.inner, name)

    def loss(self, model, batch):  # type: ignore[no-untyped-def]
        loss, extra = self.inner.loss(model, batch)
        if self.engine_ref and self.engine_ref[0].step + 1 in self.at:
            loss = _InfGrad.apply(loss)
        return loss, extra


def _fp16_engine(shards: Path, out: Path, at: set[int]):  # type: ignore[no-untyped-def]
    from crucible.trainer.data.shards import ShardSet
    from crucible.trainer.pretrain import PretrainObjective

    ref: list = []
    objective = _Overflowing(PretrainObjective(ShardSet(shards / "train"), None), ref, at)
    engine = make_engine(shards, out, objective=objective, training={"precision": "fp16", "maxSteps": 8},
                         checkpoint={"interval": 4, "asyncSave": True})
    ref.append(engine)
    return engine


def test_fp16_overflow_is_skipped_counted_and_resumed_exactly(shards: Path, tmp_path: Path) -> None:
    import json

    engine = _fp16_engine(shards, tmp_path / "a", at={3})
    result = engine.fit()
    engine.close()
    assert result.results()["precision"] == "fp16" and result.results()["overflowSteps"] == 1
    records = [json.loads(line) for line in (tmp_path / "a" / "checkpoints" / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in records if "event" not in r}
    assert steps[3].get("overflowSkipped") is True and steps[3]["lossScale"] == 2.0**15
    assert steps[2]["lossScale"] == 2.0**16 and steps[8]["overflowSteps"] == 1

    # kill after the step-4 checkpoint: the resumed run has the same scale, counts and losses
    resumed_dir = tmp_path / "b"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    import shutil

    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-000000004", resumed_dir / "checkpoints" / "step-000000004")
    again = _fp16_engine(shards, resumed_dir, at={3})
    result_b = again.fit()
    again.close()
    assert result_b.resumed_from == 4 and result_b.results()["overflowSteps"] == 1
    records_b = [json.loads(line) for line in (resumed_dir / "checkpoints" / "metrics.jsonl").read_text().splitlines()]
    losses_b = {r["step"]: r["loss"] for r in records_b if "event" not in r}
    assert losses_b == {s: steps[s]["loss"] for s in (5, 6, 7, 8)}  # bit for bit
