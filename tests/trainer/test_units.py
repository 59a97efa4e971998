"""Pure pieces of the engine: schedules, sampler, spike detector, Young/Daly, FLOPs, faults, watchdog, metrics."""

from __future__ import annotations

import itertools
import math
import threading
import time
import urllib.request

import numpy as np
import pytest

from crucible.trainer.checkpoint import young_daly_interval
from crucible.trainer.config.common import EXIT_APPLICATION_ERROR, EXIT_BAD_INPUT, EXIT_RETRIABLE
from crucible.trainer.config.training import LossSpikeConfig, OptimizerConfig
from crucible.trainer.faults import RetriableError, SpecError, classify, run_guarded
from crucible.trainer.flops import flops_per_token, mfu, peak_flops
from crucible.trainer.loss_spike import LossSpikeDetector
from crucible.trainer.metrics import GAUGES, Metrics
from crucible.trainer.optim import lr_at
from crucible.trainer.sampler import GlobalSampler
from crucible.trainer.storage import StorageNotFound, StorageUnavailable
from crucible.trainer.watchdog import Watchdog
from waits import scaled

# -- learning-rate schedules ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("schedule", "step", "expected"),
    [
        ("cosine", 0, 0.1),  # warmup: (step+1)/(warmup+1) of peak
        ("cosine", 9, 1.0),
        ("cosine", 10, 1.0),  # decay starts at peak (within 0.01)
        ("cosine", 55, 0.55),  # halfway: midway between peak and floor
        ("cosine", 100, 0.1),  # the floor (minLrRatio)
        ("linear", 55, 0.55),
        ("linear", 100, 0.1),
        ("constant", 80, 1.0),
        ("wsd", 50, 1.0),  # stable phase
        ("wsd", 79, 1.0),
        ("wsd", 80, 1.0 - 0.9 / 20),  # first decay step (20% of 100 steps)
        ("wsd", 99, 0.1),  # ends at the floor
    ],
)
def test_schedules(schedule: str, step: int, expected: float) -> None:
    cfg = OptimizerConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=9, schedule=schedule, decay_fraction=0.2)
    total = 100
    got = lr_at(step, total, cfg)
    if schedule in ("cosine", "linear") and step not in (0, 9, 100):
        assert got == pytest.approx(expected, abs=0.01)
    else:
        assert got == pytest.approx(expected, abs=1e-9)


def test_cosine_is_monotone_after_warmup() -> None:
    cfg = OptimizerConfig(lr=1e-3, warmup_steps=5, schedule="cosine")
    lrs = [lr_at(s, 50, cfg) for s in range(5, 50)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


# -- sampler --------------------------------------------------------------------------------


def _draw(sampler: GlobalSampler, n: int) -> list[list[int]]:
    return [sampler.next_indices() for _ in range(n)]


def test_sampler_ranks_partition_each_global_batch_and_epochs_cover_everything() -> None:
    ranks = [GlobalSampler(40, 5, r, 2, seed=3) for r in range(2)]
    seen = []
    for _ in range(4):  # 4 micro-steps × 10 = one epoch
        a, b = (s.next_indices() for s in ranks)
        assert not set(a) & set(b)
        seen += a + b
    assert sorted(seen) == list(range(40))
    assert ranks[0].position == 40


def test_sampler_resume_and_world_size_independence() -> None:
    one = GlobalSampler(50, 4, 0, 1, seed=9)
    reference = [i for _ in range(12) for i in one.next_indices()]
    # two ranks see the same global order, interleaved by rank within each micro-step
    r0, r1 = GlobalSampler(50, 2, 0, 2, seed=9), GlobalSampler(50, 2, 1, 2, seed=9)
    two = [i for _ in range(12) for i in r0.next_indices() + r1.next_indices()]
    assert two == reference
    # resume from a state dict continues exactly
    a = GlobalSampler(50, 4, 0, 1, seed=9)
    _draw(a, 5)
    b = GlobalSampler(50, 4, 0, 1, seed=9)
    b.load_state_dict(a.state_dict())
    assert _draw(a, 7) == _draw(b, 7)


def test_sampler_skip_windows() -> None:
    s = GlobalSampler(100, 4, 0, 1, seed=0, shuffle=False)
    s.skip(4, 12)
    assert s.next_indices() == [0, 1, 2, 3]
    assert s.next_indices() == [12, 13, 14, 15]
    restored = GlobalSampler(100, 4, 0, 1, seed=0, shuffle=False)
    restored.load_state_dict({**s.state_dict(), "position": 0})
    assert _draw(restored, 2) == [[0, 1, 2, 3], [12, 13, 14, 15]]


def test_sampler_refuses_other_data_or_seed() -> None:
    s = GlobalSampler(100, 4, 0, 1, seed=0)
    with pytest.raises(ValueError, match="data now has 90"):
        GlobalSampler(90, 4, 0, 1, seed=0).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match=r"training\.seed"):
        GlobalSampler(100, 4, 0, 1, seed=1).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="microBatchSize"):
        GlobalSampler(3, 4, 0, 1, seed=0)


# -- loss spikes ----------------------------------------------------------------------------


def test_spike_detector_catches_a_spike_and_not_noise() -> None:
    rng = np.random.default_rng(0)
    det = LossSpikeDetector(LossSpikeConfig(window=20, z_threshold=6, min_delta=0.1))
    losses = 3.0 * np.exp(-np.arange(300) / 150) + 1.0 + rng.normal(0, 0.01, 300)
    assert [s for s in (det.observe(i, float(x)) for i, x in enumerate(losses)) if s] == []
    spike = det.observe(300, float(losses[-1]) + 1.0)
    assert spike is not None and spike.z > 6 and det.spikes == 1
    assert det.observe(301, math.nan) is not None  # non-finite is always a spike
    assert det.observe(302, float(losses[-1])) is None  # spikes never entered the window


def test_spike_detector_min_delta_guards_flat_losses() -> None:
    det = LossSpikeDetector(LossSpikeConfig(window=5, z_threshold=2, min_delta=0.5))
    for i in range(5):
        det.observe(i, 2.0 + 1e-4 * (i % 2))
    assert det.observe(5, 2.05) is None  # huge z, tiny delta
    assert det.observe(6, 3.0) is not None


def test_spike_detector_state_round_trip() -> None:
    cfg = LossSpikeConfig(window=5)
    a = LossSpikeDetector(cfg)
    for i in range(7):
        a.observe(i, 1.0 + 0.01 * i)
    b = LossSpikeDetector(cfg)
    b.load_state_dict(a.state_dict())
    assert list(b.window) == list(a.window)


# -- Young/Daly, FLOPs ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("save_s", "rate", "step_s", "expected"),
    [
        (10.0, 1.0, 1.0, round(math.sqrt(2 * 10 * 3600))),  # 268 steps
        (10.0, 4.0, 1.0, round(math.sqrt(2 * 10 * 900))),  # 4× the failure rate: half the interval
        (0.5, 1 / 24, 0.1, round(math.sqrt(2 * 0.5 * 86400) / 0.1)),
        (1.0, 1e6, 10.0, 1),  # never below one step
    ],
)
def test_young_daly(save_s: float, rate: float, step_s: float, expected: int) -> None:
    assert young_daly_interval(save_s, rate, step_s) == expected


def test_flops_and_mfu() -> None:
    assert flops_per_token(1_000_000, 2, 64, 256) == 6e6 + 12 * 2 * 64 * 256
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("cpu") is None
    assert mfu(1000.0, 1e12, 1e15, 1) == pytest.approx(1.0)
    assert mfu(1000.0, 1e12, None, 1) is None


# -- fault classification --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (RuntimeError("[../third_party/gloo/transport/tcp/pair.cc:534] Connection closed by peer"), EXIT_RETRIABLE),
        (RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled system error"), EXIT_RETRIABLE),
        (RuntimeError("Watchdog caught collective operation timeout: WorkNCCL(SeqNum=5) ran for 600000 ms"),
         EXIT_RETRIABLE),
        (RuntimeError("CUDA error: uncorrectable ECC error encountered"), EXIT_RETRIABLE),
        (RuntimeError("CUDA error: unspecified launch failure"), EXIT_RETRIABLE),
        (StorageUnavailable("s3://b/k: cannot reach the S3 endpoint"), EXIT_RETRIABLE),
        (RetriableError("hang"), EXIT_RETRIABLE),
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), EXIT_APPLICATION_ERROR),
        (SpecError("spec.json: spec.training.seqLen: too small"), EXIT_BAD_INPUT),
        (StorageNotFound("/data/train/index.json: no such file"), EXIT_BAD_INPUT),
        (ValueError("shape mismatch"), EXIT_APPLICATION_ERROR),
        (KeyError("loss"), EXIT_APPLICATION_ERROR),
        # "Timeout" or "EOF" alone is not a communication fault (issue #11): a restart would repeat it
        (RuntimeError("Timeout waiting for the tokenizer lock"), EXIT_APPLICATION_ERROR),
        (RuntimeError("unexpected EOF in /data/train/shard-00001.bin"), EXIT_APPLICATION_ERROR),
        (RuntimeError("The read operation timed out"), EXIT_APPLICATION_ERROR),
        (RuntimeError("eof reached before the header"), EXIT_APPLICATION_ERROR),
        (RuntimeError("[c10d] The client socket has timed out after 600s while trying to connect"), EXIT_RETRIABLE),
        (ConnectionResetError(104, "Connection reset by peer"), EXIT_RETRIABLE),
    ],
)
def test_classify(exc: BaseException, code: int) -> None:
    assert classify(exc)[0] == code


def test_run_guarded_maps_exceptions(capsys: pytest.CaptureFixture[str]) -> None:
    def boom() -> int:
        raise StorageUnavailable("s3://b: cannot reach")

    assert run_guarded(boom) == EXIT_RETRIABLE
    assert "retriable (exit 75)" in capsys.readouterr().err
    assert run_guarded(lambda: 0) == 0


# -- watchdog, metrics -----------------------------------------------------------------------


def test_watchdog_fires_without_beats_and_not_with_them() -> None:
    fired: list[str] = []
    dog = Watchdog(0.3, on_hang=fired.append, poll_s=0.02).start()
    for _ in range(10):
        time.sleep(0.05)
        dog.beat("step")
    assert fired == []
    time.sleep(0.6)
    assert fired and "no progress" in fired[0]
    dog.stop()


def test_metrics_server_serves_the_contract_names() -> None:
    metrics = Metrics(port=0, enabled=True)
    assert metrics.port == 0  # port 0: no server
    metrics.close()
    import os

    os.environ["CRUCIBLE_METRICS_PORT"] = "0"
    try:
        from trainlib import free_port

        port = free_port()
        os.environ["CRUCIBLE_METRICS_PORT"] = str(port)
        metrics = Metrics(port=1, enabled=True)
        metrics.set(train_loss=2.5, train_step=7, checkpoint_last_step=5)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=scaled(5)).read().decode()
        metrics.close()
    finally:
        del os.environ["CRUCIBLE_METRICS_PORT"]
    for name in GAUGES:
        assert f"\n{name} " in body or body.startswith(f"{name} "), name
    assert "crucible_train_loss 2.5" in body and "crucible_train_step 7.0" in body
    assert threading.active_count() >= 1
