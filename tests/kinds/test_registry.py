"""The registry of kinds itself: the chart lists what it registers, clashes and bad plug-ins are named."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from crucible.api.common import Resource
from crucible.api.registry import Kind, kind_of, kinds, one_role, register

REPO = Path(__file__).resolve().parents[2]


def test_the_chart_lists_every_built_in_kind() -> None:
    meta = yaml.safe_load((REPO / "charts" / "crucible" / "Chart.yaml").read_text())
    listed = [k["kind"] for k in yaml.safe_load(meta["annotations"]["artifacthub.io/crds"])]
    assert listed == [k.name for k in kinds() if k.model.__module__.startswith("crucible.")]


def test_a_second_model_for_a_registered_kind_is_refused() -> None:
    class Impostor(Resource):
        KIND = "PretrainRun"
        PLURAL = "impostors"

    roles, names = one_role("trainer")
    with pytest.raises(ValueError, match=r"already registered by crucible\.api\.pretrainrun"):
        register(Kind(Impostor, entry=("-m", "x"), roles=roles, role_names=names))
    assert kind_of("PretrainRun").model.__module__ == "crucible.api.pretrainrun"


def test_a_kind_module_that_does_not_import_is_named() -> None:
    env = {**os.environ, "CRUCIBLE_KINDS": "no_such_kind_module"}
    out = subprocess.run([sys.executable, "-c", "import crucible.api"], env=env, capture_output=True, text=True)
    assert out.returncode != 0
    assert "CRUCIBLE_KINDS: cannot import kind module 'no_such_kind_module'" in out.stderr
