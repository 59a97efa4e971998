"""crucible.core.status: metrics into progress, goodput, Prometheus parsing."""

from __future__ import annotations

import pytest

from crucible.api.common import Progress
from crucible.core.status import goodput, parse_prometheus, progress_from_metrics, rfc3339

PAGE = """# HELP crucible_train_loss Training loss
# TYPE crucible_train_loss gauge
crucible_train_loss 2.3456789
crucible_train_step 120.0
crucible_train_tokens_total 61440.0
crucible_train_tokens_per_second 2048.5
crucible_train_mfu_ratio 0.41234
crucible_checkpoint_last_step 100
python_info{implementation="CPython",major="3"} 1.0
garbage line
"""


def test_parse_prometheus() -> None:
    m = parse_prometheus(PAGE)
    assert m["crucible_train_step"] == 120
    assert m["crucible_checkpoint_last_step"] == 100
    assert m['python_info{implementation="CPython",major="3"}'] == 1.0
    assert "garbage" not in m


def test_progress_moves_updated_at_only_when_step_advances() -> None:
    m = parse_prometheus(PAGE)
    p1 = progress_from_metrics(m, previous=Progress(), total_steps=200, now=1000.0)
    assert (p1.step, p1.percent, p1.loss, p1.tokens, p1.mfu) == (120, 60.0, 2.3457, 61440, 0.4123)
    assert p1.updated_at == rfc3339(1000.0)
    same = progress_from_metrics(m, previous=p1, total_steps=200, now=1500.0)
    assert same == p1
    m["crucible_train_step"] = 121
    assert progress_from_metrics(m, previous=p1, total_steps=200, now=1500.0).updated_at == rfc3339(1500.0)
    empty = progress_from_metrics({}, previous=p1, total_steps=200, now=2000.0)
    assert empty.step == 120 and empty.updated_at == p1.updated_at


@pytest.mark.parametrize(("kept", "wall", "want"), [(50, 100, 0.5), (200, 100, 1.0), (0, 100, 0.0), (10, 0, None)])
def test_goodput(kept: float, wall: float, want: float | None) -> None:
    assert goodput(kept, wall) == want
