"""The one step contract: documents in, documents out.

A :class:`Filter` implements only ``filter(doc) -> str | None`` — ``None`` (:data:`KEEP`)
keeps the document, a string drops it with that reason. A :class:`Modifier` implements
``modify(doc) -> int`` (edits in place, returns how many changes it made). The base class
counts documents in and out, drops per reason and per source, times the step, and hands a
deterministic sample of dropped documents to a sink, so no step repeats that bookkeeping.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from crucible.trainer.data.document import Document

KEEP: None = None

DropSink = Callable[[Document, str, str], None]
"""Called with (document, step name, reason) for every dropped document."""


@dataclass
class StepStats:
    documents_in: int = 0
    documents_out: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    dropped_by_source: Counter[tuple[str, str]] = field(default_factory=Counter)
    changes: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "documentsIn": self.documents_in,
            "documentsOut": self.documents_out,
            "dropped": dict(sorted(self.dropped.items())),
        }
        if self.changes:
            out["changes"] = dict(sorted(self.changes.items()))
        return out

    def merge(self, other: dict[str, Any]) -> None:
        """Add a worker's :meth:`to_json` (plus ``droppedBySource``) into this one."""
        self.documents_in += other["documentsIn"]
        self.documents_out += other["documentsOut"]
        self.dropped.update(other["dropped"])
        self.changes.update(other.get("changes", {}))
        for src, reasons in other.get("droppedBySource", {}).items():
            for reason, n in reasons.items():
                self.dropped_by_source[(src, reason)] += n


class Step:
    """Base of every step. Subclasses set ``name`` and implement :meth:`process`."""

    name: ClassVar[str] = "step"

    def __init__(self) -> None:
        self.stats = StepStats()
        self.drop_sink: DropSink | None = None

    def run(self, docs: Iterable[Document]) -> Iterator[Document]:
        stats = self.stats
        for doc in docs:
            stats.documents_in += 1
            start = time.perf_counter()
            reason = self.process(doc)
            stats.seconds += time.perf_counter() - start
            if reason is None:
                stats.documents_out += 1
                yield doc
            else:
                stats.dropped[reason] += 1
                stats.dropped_by_source[(doc.source, reason)] += 1
                if self.drop_sink is not None:
                    self.drop_sink(doc, self.name, reason)

    def process(self, doc: Document) -> str | None:
        raise NotImplementedError

    def stats_json(self) -> dict[str, Any]:
        out = self.stats.to_json()
        by_source: dict[str, dict[str, int]] = {}
        for (src, reason), n in sorted(self.stats.dropped_by_source.items()):
            by_source.setdefault(src, {})[reason] = n
        out["droppedBySource"] = by_source
        return out


class Filter(Step):
    """Keeps or drops; implement :meth:`filter`."""

    def process(self, doc: Document) -> str | None:
        return self.filter(doc)

    def filter(self, doc: Document) -> str | None:
        raise NotImplementedError


class Modifier(Step):
    """Edits documents in place; implement :meth:`modify`. May still drop a document it empties."""

    def process(self, doc: Document) -> str | None:
        changed = self.modify(doc)
        if changed:
            self.stats.changes["documents"] += 1
        if not doc.text.strip():
            return "empty_after_" + self.name
        return KEEP

    def modify(self, doc: Document) -> int:
        raise NotImplementedError
