"""Loss spikes in the engine: an injected bad batch is caught within 5 steps and rolled back past."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from trainlib import make_engine

from crucible.trainer.data.shards import ShardSet
from crucible.trainer.metrics import read_step_log
from crucible.trainer.pretrain import PretrainObjective
from crucible.trainer.sampler import BatchIterator

BAD_STEP = 30  # the step (1-based) whose data is garbage
ITEMS_PER_STEP = 8  # 256 tokens / 32 per sequence
SPIKE = {"window": 10, "zThreshold": 6, "minDelta": 0.5}
COMMON: dict[str, Any] = {
    "training": {"maxSteps": 40},
    "optimizer": {"lr": 1e-2, "warmupSteps": 2},
    "checkpoint": {"interval": 5},
}


class PoisonedIterator(BatchIterator):
    """Serves random tokens instead of the data at positions [start, end) — a corrupt stretch of corpus."""

    def __init__(self, inner: BatchIterator, start: int, end: int, vocab: int) -> None:
        super().__init__(inner.sampler, inner.fetch)
        self.start, self.end, self.vocab = start, end, vocab

    def __next__(self) -> dict[str, torch.Tensor]:
        position = self.position
        while (end := self.sampler._skipped(position)) is not None:  # where this batch really starts
            position = end
        batch = super().__next__()
        if self.start <= position < self.end:
            generator = torch.Generator().manual_seed(position)
            ids = torch.randint(1, self.vocab, batch["input_ids"].shape, generator=generator)
            batch = {"input_ids": ids, "labels": ids}
        return batch


class PoisonedObjective(PretrainObjective):
    def train_batches(self, ctx: Any) -> BatchIterator:
        start = (BAD_STEP - 1) * ITEMS_PER_STEP
        return PoisonedIterator(super().train_batches(ctx), start, start + ITEMS_PER_STEP, self.train.vocab_size)


def test_bad_batch_is_caught_and_rolled_back(shards: Path, tmp_path: Path) -> None:
    objective = PoisonedObjective(ShardSet(shards / "train"), None)
    engine = make_engine(shards, tmp_path, objective=objective, lossSpike={**SPIKE, "action": "rollback"}, **COMMON)
    result = engine.fit()
    engine.close()
    events = read_step_log(tmp_path / "checkpoints" / "metrics.jsonl")
    rollbacks = [e for e in events if e.get("event") == "rollback"]
    assert len(rollbacks) == 1, rollbacks
    assert BAD_STEP <= rollbacks[0]["step"] <= BAD_STEP + 4  # caught within 5 steps
    bad = [(BAD_STEP - 1) * ITEMS_PER_STEP, BAD_STEP * ITEMS_PER_STEP]
    assert rollbacks[0]["skip"] == bad
    assert rollbacks[0]["toStep"] == 25
    assert result.steps == 40 and result.rollbacks == 1 and result.loss_spikes == 1
    # the skipped window travels with later checkpoints and the run never trained on it
    trainer_state = json.loads((tmp_path / "checkpoints" / "step-000000040" / "trainer.json").read_text())
    assert bad in trainer_state["data"]["skips"]
    assert json.loads((tmp_path / "checkpoints" / "skip-windows.json").read_text()) == [bad]
    losses = {e["step"]: e["loss"] for e in events if "event" not in e}
    assert max(v for k, v in losses.items() if k > 25) < losses[1]


def test_clean_run_raises_no_alarm_and_alert_only_counts(shards: Path, tmp_path: Path) -> None:
    engine = make_engine(shards, tmp_path / "clean", lossSpike={**SPIKE, "action": "rollback"}, **COMMON)
    result = engine.fit()
    engine.close()
    assert result.loss_spikes == 0 and result.rollbacks == 0
    events = read_step_log(tmp_path / "clean" / "checkpoints" / "metrics.jsonl")
    assert not [e for e in events if e.get("event") in ("loss_spike", "rollback")]

    objective = PoisonedObjective(ShardSet(shards / "train"), None)
    engine = make_engine(shards, tmp_path / "alert", objective=objective,
                         lossSpike={**SPIKE, "action": "alert"}, **COMMON)
    result = engine.fit()
    engine.close()
    assert result.loss_spikes == 1 and result.rollbacks == 0 and result.steps == 40
    events = read_step_log(tmp_path / "alert" / "checkpoints" / "metrics.jsonl")
    assert [e["step"] for e in events if e.get("event") == "loss_spike"] == [BAD_STEP]


class NanObjective(PretrainObjective):
    """The loss turns NaN from the ``nan_from``-th micro-batch on (before the first checkpoint)."""

    def __init__(self, *args: Any, nan_from: int) -> None:
        super().__init__(*args)
        self.calls = 0
        self.nan_from = nan_from

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> Any:
        loss, extra = super().loss(model, batch)
        self.calls += 1
        return (loss * float("nan"), extra) if self.calls >= self.nan_from else (loss, extra)


def test_nan_for_good_before_the_first_checkpoint_rolls_back_to_the_start_until_maxrollbacks(
        shards: Path, tmp_path: Path) -> None:
    """Before: "no checkpoint to roll back to; continuing" on every later step, never counted (issue #11).
    Now each NaN before the first checkpoint rolls back to the initial state and counts; a loss that
    stays NaN fails as unstable once lossSpike.maxRollbacks is used up."""
    import pytest

    from crucible.trainer.engine import UnstableTrainingError
    from crucible.trainer.faults import EXIT_APPLICATION_ERROR, classify

    objective = NanObjective(ShardSet(shards / "train"), None, nan_from=3)
    engine = make_engine(shards, tmp_path, objective=objective,
                         lossSpike={**SPIKE, "action": "rollback", "maxRollbacks": 2},
                         training={"maxSteps": 40}, checkpoint={"interval": 20})
    try:
        with pytest.raises(UnstableTrainingError) as err:
            engine.fit()
    finally:
        engine.close()
    message = str(err.value)
    assert "non-finite loss (nan) at step" in message and "3 loss-spike rollbacks exceed lossSpike.maxRollbacks (2)" in message
    assert engine.detector.rollbacks == 2 and engine.step == 0
    assert classify(err.value)[0] == EXIT_APPLICATION_ERROR
    events = read_step_log(tmp_path / "checkpoints" / "metrics.jsonl")
    assert [e["toStep"] for e in events if e.get("event") == "rollback"] == [0, 0]


class NanAt(BatchIterator):
    """The batches of data positions [start, end) carry a marker that turns their loss NaN (a bad stretch)."""

    def __init__(self, inner: BatchIterator, start: int, end: int) -> None:
        super().__init__(inner.sampler, inner.fetch)
        self.start, self.end = start, end

    def __next__(self) -> dict[str, torch.Tensor]:
        position = self.position
        while (end := self.sampler._skipped(position)) is not None:
            position = end
        batch = super().__next__()
        return {**batch, "nan": torch.ones(())} if self.start <= position < self.end else batch


class NanWindowObjective(PretrainObjective):
    def __init__(self, *args: Any, window: tuple[int, int], pre_skip: bool = False) -> None:
        super().__init__(*args)
        self.window, self.pre_skip = window, pre_skip

    def train_batches(self, ctx: Any) -> BatchIterator:
        it = NanAt(super().train_batches(ctx), *self.window)
        if self.pre_skip:  # the twin: never sees the window at all
            it.skip(*self.window)
        return it

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> Any:
        poisoned = batch.pop("nan", None) is not None
        loss, extra = super().loss(model, batch)
        return (loss * float("nan"), extra) if poisoned else (loss, extra)


def test_nan_before_the_first_checkpoint_rolls_back_to_the_initial_state_exactly(shards: Path, tmp_path: Path) -> None:
    """A NaN at step 3 with the first checkpoint due at step 20: back to step 0 (weights, optimizer,
    RNG, data position), the bad window skipped, counted — and from there bit for bit the run that
    never saw the window."""
    bad = ((3 - 1) * ITEMS_PER_STEP, 3 * ITEMS_PER_STEP)
    spec: dict[str, Any] = {"lossSpike": {**SPIKE, "action": "rollback"}, "training": {"maxSteps": 8},
                            "optimizer": {"lr": 1e-2, "warmupSteps": 2}, "checkpoint": {"interval": 20}}
    runs = {}
    for name, pre_skip in (("rolled", False), ("twin", True)):
        objective = NanWindowObjective(ShardSet(shards / "train"), None, window=bad, pre_skip=pre_skip)
        engine = make_engine(shards, tmp_path / name, objective=objective, **spec)
        result = engine.fit()
        weights = {k: v.detach().clone() for k, v in engine.strategy.module.state_dict().items()}
        engine.close()
        events = read_step_log(tmp_path / name / "checkpoints" / "metrics.jsonl")
        runs[name] = (result, weights, events)
    result, weights, events = runs["rolled"]
    rollbacks = [e for e in events if e.get("event") == "rollback"]
    assert [(e["step"], e["toStep"], e["skip"]) for e in rollbacks] == [(3, 0, list(bad))]
    assert result.steps == 8 and result.rollbacks == 1 and result.loss_spikes == 1
    twin_result, twin_weights, twin_events = runs["twin"]
    assert twin_result.rollbacks == 0
    kept = {e["step"]: float(e["loss"]).hex() for e in events if "event" not in e and e["step"] > 0}
    assert kept == {e["step"]: float(e["loss"]).hex() for e in twin_events if "event" not in e}
    assert weights.keys() == twin_weights.keys() and all(torch.equal(weights[k], twin_weights[k]) for k in weights)
