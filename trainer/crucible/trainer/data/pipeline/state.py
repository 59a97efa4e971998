"""What every stage of a DataPipeline reads: the spec, the storage, the workspace, and which parts are done.

A stage runs one part ``I`` of ``N`` and leaves ``<out>/_work/<stage>/part-IIIII/_DONE`` last;
a later stage :meth:`PipelineState.require` s every part of the one before it.
"""

from __future__ import annotations

from typing import Any

import xxhash

from crucible.trainer.config.data import DataPipelineConfig
from crucible.trainer.data.pipeline.workspace import Workspace
from crucible.trainer.data.readers import InputFile, Piece, list_inputs
from crucible.trainer.data.splits import plan_pieces
from crucible.trainer.stage_io import SpecError, finished
from crucible.trainer.storage import Storage

DONE = "_DONE"


class PipelineError(RuntimeError):
    """An ordering or state problem (a stage started before the one it needs finished)."""


class NothingLeftError(SpecError):
    """Every document was dropped: the receipt is written, ``_SUCCESS`` is not (exit 2)."""


def unit_hash(text: str, seed: int) -> float:
    """A reproducible number in [0, 1) for ``text`` under ``seed``."""
    return xxhash.xxh64_intdigest(text.encode("utf-8", "surrogatepass"), seed) / 2.0**64


def part_dir(stage: str, part: int) -> str:
    """The folder (relative to the output) of one part of one stage."""
    return f"_work/{stage}/part-{part:05d}"


class PipelineState:
    def __init__(
        self,
        config: DataPipelineConfig,
        output_uri: str,
        num_parts: int | None = None,
        storage: Storage | None = None,
    ) -> None:
        self.config = config
        self.storage = storage or Storage.from_config(config.storage)
        self.ws = Workspace(output_uri, self.storage)
        self.num_parts = num_parts or config.workers
        self._inputs: list[InputFile] | None = None
        self._pieces: list[list[Piece]] | None = None

    @property
    def inputs(self) -> list[InputFile]:
        if self._inputs is None:
            self._inputs = list_inputs(self.config.sources, self.storage)
        return self._inputs

    def pieces_of(self, part: int) -> list[Piece]:
        """What filter worker ``part`` reads: equal byte ranges of the whole input
        (:mod:`crucible.trainer.data.splits`), large files cut at line or row-group boundaries."""
        if self._pieces is None:
            self._pieces = plan_pieces(self.inputs, self.num_parts, self.storage)
        return self._pieces[part]

    def finished(self) -> bool:
        """True when the output holds this pipeline's ``_SUCCESS``; ForeignResultError when another's."""
        return finished(self.storage, self.ws.uri, self.config)

    def done(self, stage: str, part: int) -> bool:
        return self.ws.exists(f"{part_dir(stage, part)}/{DONE}")

    def missing(self, stage: str) -> list[int]:
        return [p for p in range(self.num_parts) if not self.done(stage, p)]

    def mark_done(self, stage: str, part: int, summary: dict[str, Any]) -> None:
        self.ws.write_json(f"{part_dir(stage, part)}/{DONE}", summary)

    def require(self, stage: str) -> None:
        missing = self.missing(stage)
        if missing:
            shown = ", ".join(str(p) for p in missing[:10])
            raise PipelineError(
                f"stage {stage!r} has not finished for parts {shown}{' ...' if len(missing) > 10 else ''} "
                f"of {self.num_parts}; run it first (--stage {stage})"
            )
