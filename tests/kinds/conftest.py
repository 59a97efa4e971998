"""Kind-registry tests: the toy kind's modules (toy/) importable in this process and in every
process the tests start (crucible validate / crds / run, the stage itself)."""

from __future__ import annotations

import sys
from pathlib import Path

TOY = str(Path(__file__).resolve().parent / "toy")
if TOY not in sys.path:
    sys.path.insert(0, TOY)
