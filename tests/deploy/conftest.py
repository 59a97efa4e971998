"""Fixtures of the deploy tests: the Prometheus binaries from Debian's `prometheus` package."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator

import pytest

# --import-mode=importlib: make the helper module `deploylib` importable by the test modules.
HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)


@pytest.fixture(scope="session")
def promtool() -> Iterator[str]:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`: apt-get install prometheus)")
    yield path


@pytest.fixture(scope="session")
def prometheus_bin() -> Iterator[str]:
    path = shutil.which("prometheus")
    if path is None:
        pytest.skip("prometheus is not installed (Debian package `prometheus`: apt-get install prometheus)")
    yield path
