"""Shared pytest setup. Area-specific fixtures live in tests/<area>/conftest.py."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# tests/waits.py (the suite's one time factor) importable by every area's tests and helpers;
# appended, so no folder of tests/ shadows a module of the same name.
if str(REPO / "tests") not in sys.path:
    sys.path.append(str(REPO / "tests"))

# Keep torch and friends to the machine's two cores and off the network.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


def pytest_report_header(config: pytest.Config) -> str:
    from waits import FACTOR, FACTOR_ENV

    return f"waits scaled by {FACTOR_ENV}={FACTOR:g} (tests/waits.py)"
