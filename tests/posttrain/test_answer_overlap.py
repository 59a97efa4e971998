"""eval.references: every answer scored against its reference answer (ROUGE-L F1 over words)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from crucible.trainer.config.training import PromptsConfig
from crucible.trainer.evaluate import answer_overlap, write_side_by_side


@pytest.mark.parametrize(
    ("answer", "reference", "expected"),
    [
        ("json.dumps serializes obj to a JSON str", "json.dumps serializes obj to a JSON str", 1.0),
        ("", "anything", 0.0),
        ("completely unrelated words", "json dumps serializes", 0.0),
        # LCS "serializes obj json" = 3 of 4 answer words and 3 of 5 reference words
        ("it serializes obj json", "serializes obj to json str", 2 * (3 / 4) * (3 / 5) / (3 / 4 + 3 / 5)),
        ("Serializes, OBJ!", "serializes obj", 1.0),  # case and punctuation do not count
    ],
)
def test_answer_overlap(answer: str, reference: str, expected: float) -> None:
    assert answer_overlap(answer, reference) == pytest.approx(expected)


def test_side_by_side_scores_each_side_against_the_references(tmp_path: Path) -> None:
    out = write_side_by_side(tmp_path, ["q1", "q2"], ["foo bar", "x"], ["the answer one", "answer two"],
                             labels=("base", "tuned"), references=["the answer one", "answer two"])
    assert out["answerOverlap"] == {"metric": "rouge-l-f1", "base": 0.0, "tuned": 1.0}
    payload = json.loads(Path(out["json"]).read_text())
    assert payload["prompts"][0]["overlap"] == {"base": 0.0, "tuned": 1.0}
    assert payload["prompts"][1]["reference"] == "answer two"
    assert "ROUGE-L F1" in Path(out["markdown"]).read_text()


def test_without_references_nothing_is_scored(tmp_path: Path) -> None:
    out = write_side_by_side(tmp_path, ["q"], ["a"], ["b"])
    assert "answerOverlap" not in out
    assert "overlap" not in json.loads(Path(out["json"]).read_text())["prompts"][0]


def test_references_must_match_the_prompts() -> None:
    with pytest.raises(ValidationError, match="references: 1 reference answers for 2 prompts"):
        PromptsConfig.model_validate({"prompts": ["a", "b"], "references": ["x"]})
