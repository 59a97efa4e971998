"""EchoRun: a kind that lives entirely in the test suite (loaded via CRUCIBLE_KINDS=echokind).

It reads one input (a local path, or the output of a DataPipeline by ``fromRun``), counts the
words of ``spec.message`` and writes them to its output with ``_SUCCESS``; ``echo_stage`` is
its stage entry (``python -m echo_stage --spec FILE``).
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from crucible.api.common import PlacementMixin, Resource
from crucible.api.registry import Kind, one_role, register
from crucible.trainer.config.common import InputRef, OutputConfig, StorageConfig, StrictModel


class EchoConfig(StrictModel):
    """Counts the words of a message next to an input."""

    data: InputRef = Field(description="What to read: a path, or fromRun a DataPipeline.")
    message: str = Field(default="hello world", min_length=1, description="What to say.")
    output: OutputConfig = Field(default_factory=OutputConfig, description="Where the echo goes.")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Object storage settings.")


class EchoRunSpec(EchoConfig, PlacementMixin):
    """Spec of an EchoRun: EchoConfig plus placement."""


class EchoRun(Resource):
    """Counts the words of a message (the toy kind of the registry test)."""

    KIND: ClassVar[str] = "EchoRun"
    PLURAL: ClassVar[str] = "echoruns"
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("echo",)
    INPUTS: ClassVar[dict[str, tuple[str, ...]]] = {"data": ("DataPipeline",)}
    IMMUTABLE: ClassVar[tuple[str, ...]] = ("data",)
    EXTRA_CEL: ClassVar[list[dict[str, str]]] = []

    spec: EchoRunSpec = Field(description="What to echo.")


def report_section(states: list[Any]) -> dict[str, Any]:
    """The EchoRun section of the embedded report: what each run said."""
    rows = [[s.name, s.status.results.get("said", ""), s.status.results.get("words", "")]
            for s in states if s.kind == "EchoRun"]
    return {"title": "Echoes", "table": {"header": ["run", "said", "words"], "rows": rows}}


RBAC = {"apiGroups": ["echo.example"], "resources": ["megaphones"], "verbs": ["get"]}

_roles, _role_names = one_role("echo", distributed=False)
KIND = register(Kind(
    EchoRun,
    entry=("-m", "echo_stage"),
    roles=_roles,
    role_names=_role_names,
    printer_columns=({"name": "Words", "type": "integer", "jsonPath": ".status.results.words"},),
    results=(("words", "{} words"),),
    report_section="echokind:report_section",
    rbac=(RBAC,),
))
