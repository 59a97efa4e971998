"""Whose result a ``_SUCCESS`` is: every stage records the hash of its spec and the run that wrote it.

A stage skips its work when its output already holds a ``_SUCCESS`` — but only a ``_SUCCESS``
of *this* spec and *this* run. One left behind by an edited spec, by another run sharing the
same ``output.uri``, or by a run whose output is its own input, is refused with
:class:`ForeignResultError` (exit 2) instead of being reported as this run's success. The
embedded runner checks the same thing before it skips a run.

The hash covers the spec as the stage parses it (``parse_stage_spec``, defaults filled in),
less the fields that change how a run is operated but not what it produces
(:data:`OPERATIONAL_FIELDS`). Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

SPEC_HASH = "specHash"
RUN = "run"
OPERATIONAL_FIELDS = ("failurePolicy", "metrics", "checkpoint", "suspend", "scheduling", "resources")
"""Top-level spec fields left out of the hash: restarts, metrics, checkpoint cadence and placement."""


class ForeignResultError(ValueError):
    """The output already holds a ``_SUCCESS`` that another spec or run wrote."""


def spec_hash(config: BaseModel | Mapping[str, Any], stage: str | None = None) -> str:
    """sha256 of the spec's result-deciding fields; a mapping is parsed as ``stage`` first."""
    if not isinstance(config, BaseModel):
        from crucible.trainer.config.stages import parse_stage_spec

        if stage is None:
            raise ValueError("spec_hash of a mapping needs its stage")
        config = parse_stage_spec(stage, dict(config))
    wire = config.model_dump(mode="json", by_alias=True, exclude_none=True)
    kept = {k: v for k, v in wire.items() if k not in OPERATIONAL_FIELDS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def current_run() -> str | None:
    """``Kind/name`` of the run this process belongs to (the backends' CRUCIBLE_KIND/CRUCIBLE_RUN)."""
    kind, name = os.environ.get("CRUCIBLE_KIND"), os.environ.get("CRUCIBLE_RUN")
    return f"{kind}/{name}" if kind and name else None


def identity(config: BaseModel) -> dict[str, Any]:
    """The fields every ``_SUCCESS`` carries so a later reader can tell whose it is."""
    out: dict[str, Any] = {SPEC_HASH: spec_hash(config)}
    run = current_run()
    if run:
        out[RUN] = run
    return out


def foreign_reason(receipt: Mapping[str, Any], expected_hash: str, run: str | None) -> str | None:
    """Why ``receipt`` is not this run's result, or None when it is."""
    recorded = receipt.get(SPEC_HASH)
    writer = receipt.get(RUN)
    if run and isinstance(writer, str) and writer != run:
        return f"it was written by {writer}, not {run}"
    if not isinstance(recorded, str):
        return "it records no spec hash (written by an older Crucible, by hand, or copied from elsewhere)"
    if recorded != expected_hash:
        return (f"it was written for a different spec (spec hash {recorded[:12]}, this spec {expected_hash[:12]}): "
                "the spec or its inputs changed since")
    return None


def check_existing(raw: bytes, config: BaseModel, where: str) -> None:
    """Raise :class:`ForeignResultError` unless the ``_SUCCESS`` bytes at ``where`` are this run's."""
    try:
        receipt = json.loads(raw)
    except ValueError:
        receipt = None
    if not isinstance(receipt, dict):
        raise ForeignResultError(
            f"{where} exists but is not a Crucible receipt (not a JSON object); delete it, or point "
            "spec.output.uri at a new folder"
        )
    reason = foreign_reason(receipt, spec_hash(config), current_run())
    if reason is not None:
        raise ForeignResultError(
            f"{where} is not this run's result: {reason}. Point spec.output.uri at a new folder, or "
            "delete the old output to train it again"
        )
