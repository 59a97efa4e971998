"""A revision of a DataPipeline keeps only documents no earlier revision kept (steps.dedup.earlierRevisions)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from crucible.trainer.data.pipeline import run_pipeline
from crucible.trainer.seen import SEEN
from crucible.trainer.stage_io import SpecError

from .conftest import make_config, write_jsonl

STEPS = {"quality": {"enabled": False}, "dedup": {"exact": True, "minhash": {"enabled": False}}}


def test_a_document_an_earlier_revision_kept_is_not_kept_again(tmp_path: Path,
                                                               corpus_records: list[dict[str, Any]]) -> None:
    clean = [{"id": r["id"], "text": r["text"]} for r in corpus_records if r["kind"] == "clean"][:90]
    write_jsonl(tmp_path / "src" / "a.jsonl", clean[:60])
    first = run_pipeline(make_config([{"name": "web", "uri": str(tmp_path / "src"), "idField": "id"}], steps=STEPS),
                         tmp_path / "rev1")
    kept_first = first.data["documentsOut"]
    # the source grows: the old documents (ids changed, same text) plus 30 new ones
    write_jsonl(tmp_path / "src" / "a.jsonl", [{**d, "id": f"again-{d['id']}"} for d in clean[:60]])
    write_jsonl(tmp_path / "src" / "b.jsonl", clean[60:])
    second = run_pipeline(make_config(
        [{"name": "web", "uri": str(tmp_path / "src"), "idField": "id"}],
        steps={**STEPS, "dedup": {**STEPS["dedup"], "earlierRevisions": [str(tmp_path / "rev1")]}},
        tokenizer={"source": {"uri": str(tmp_path / "rev1" / "tokenizer")}}), tmp_path / "rev2")
    dedup = next(row for row in second.data["funnel"] if row["step"] == "dedup")
    assert dedup["dropped"]["seen_in_earlier_revision"] == kept_first
    assert second.data["documentsOut"] == dedup["documentsIn"] - kept_first - sum(
        v for k, v in dedup["dropped"].items() if k != "seen_in_earlier_revision")
    assert second.data["revision"]["earlierRevisions"] == [str(tmp_path / "rev1")]
    assert second.data["sources"]["web"]["dropped"]["dedup:seen_in_earlier_revision"] == kept_first
    receipt = json.loads((tmp_path / "rev2" / "_SUCCESS").read_text())["inputs"]["earlierRevisions"]
    assert receipt == [{"uri": str(tmp_path / "rev1"), "field": "spec.steps.dedup.earlierRevisions[0]",
                        "hashOf": "manifest.json", "sha256": first.sha256}]
    # seen.npy is cumulative: the next revision needs only this one
    assert len(np.load(tmp_path / "rev2" / SEEN)) == kept_first + second.data["documentsOut"]


def test_an_earlier_revision_without_seen_keys_is_named(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "src" / "a.jsonl", [{"id": "1", "text": "a document of some length " * 5}])
    config = make_config([{"name": "web", "uri": str(tmp_path / "src"), "idField": "id"}],
                         steps={**STEPS, "dedup": {"earlierRevisions": [str(tmp_path / "nowhere")]}})
    with pytest.raises(SpecError, match=r"steps.dedup.earlierRevisions\[0\]: .*nowhere has no seen.npy"):
        run_pipeline(config, tmp_path / "out")
