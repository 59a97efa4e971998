"""The one time factor of the test suite: every wait in tests/ is scaled by it.

``CRUCIBLE_TEST_TIME_FACTOR`` (default 4) multiplies every timeout a test waits on — a phase
reached, a process exited, a step written — so a busy machine (CI, or a workstation running
other jobs) passes the same tests as an idle one. A wait returns as soon as its condition holds,
so a larger factor costs nothing when things go well; only a test that is already failing
takes longer to say so. Durations a test *measures against* (a hang timeout it expects to fire)
are not scaled: the test waits for the event with a scaled timeout instead.

    from waits import scaled
    proc.wait(timeout=scaled(60))

``tests/stress.py`` runs the timing-sensitive tests with two CPU-bound processes beside them to
prove the factor is enough.
"""

from __future__ import annotations

import os

FACTOR_ENV = "CRUCIBLE_TEST_TIME_FACTOR"
DEFAULT_FACTOR = 4.0


def time_factor() -> float:
    raw = os.environ.get(FACTOR_ENV, "")
    if not raw:
        return DEFAULT_FACTOR
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{FACTOR_ENV}={raw!r}: expected a number such as 4 (1 = idle-machine timings)") from None
    if not value > 0:
        raise ValueError(f"{FACTOR_ENV}={raw!r}: must be positive")
    return value


FACTOR = time_factor()


def scaled(seconds: float) -> float:
    """``seconds`` × the suite's time factor: the timeout of a wait."""
    return seconds * FACTOR
