"""The plain progress lines of ``crucible run`` (CI logs, pipes): position, percentage and an ETA."""

from __future__ import annotations

import io

import pytest

from crucible.local import ui


def test_plain_progress_shows_position_and_eta_from_the_runs_own_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(ui.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    plain = ui.PlainUi(out)
    plain.start("pt", "PretrainRun pt", 100)
    plain.update("pt", None, None, "loading the model")  # no position yet: within PLAIN_EVERY, nothing printed
    clock[0] += ui.PLAIN_EVERY
    plain.update("pt", 0, 100, "step 0/100")
    clock[0] += 20
    plain.update("pt", 10, 100, "step 10/100  loss 3.1")
    lines = out.getvalue().splitlines()
    assert lines[-2].endswith("PretrainRun pt: 0% · step 0/100")
    assert lines[-1].endswith("PretrainRun pt: 10%, eta 3m00s · step 10/100  loss 3.1")  # 90 steps at 2 s

    plain.start("pt", "PretrainRun pt", 100)  # a restarted attempt measures its own rate
    clock[0] += ui.PLAIN_EVERY
    plain.update("pt", 10, 100, "step 10/100")
    assert out.getvalue().splitlines()[-1].endswith("PretrainRun pt: 10% · step 10/100")
