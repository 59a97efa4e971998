"""Decontamination against evaluation sets, and the learned classifiers."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import numpy as np
import pytest

from crucible.trainer.config.data import ClassifierStep, DecontaminationSet, DecontaminationStep, SourceConfig
from crucible.trainer.data.classifier import ClassifierError, ClassifierFilter, TrainedClassifier
from crucible.trainer.data.decontaminate import (
    Decontaminator,
    EvalSetError,
    gram_table,
    load_set,
    load_table,
    merge_tables,
    save_table,
    window_hashes,
    words_of,
)
from crucible.trainer.data.readers import list_inputs
from crucible.trainer.data.synthetic import english_document, toxic_document
from crucible.trainer.storage import Storage

from .conftest import make_doc, write_jsonl

QUESTION = "Which river flows through the ancient city of Baghdad and joins the Euphrates before the Gulf"


def _set(tmp_path: Path, records: list[dict[str, str]], name: str = "qa", fields: tuple[str, ...] = ("question", "answer")
         ) -> DecontaminationSet:
    write_jsonl(tmp_path / f"{name}.jsonl", records)
    return DecontaminationSet(name=name, uri=str(tmp_path / f"{name}.jsonl"), text_fields=list(fields))


def test_ngram_hits_drop_and_redact_with_the_set_named(tmp_path: Path) -> None:
    dset = _set(tmp_path, [{"question": QUESTION, "answer": "The Tigris."}, {"question": "too short", "answer": "x"}])
    loaded = load_set(dset, 0, 13, Storage())
    assert loaded is not None and loaded.counts["records"] == 2 and loaded.counts["tooShort"] == 1
    assert loaded.inputs[0]["sha256"] and loaded.receipt()["ngrams"] == 6  # 18 words: 6 windows of 13
    rng = random.Random(0)
    clean = english_document(rng)
    leaked = f"{clean}\n\nQuiz: {QUESTION.upper()}? the tigris! More text follows here."
    step = Decontaminator(DecontaminationStep(sets=[dset], ngram=13), [loaded])
    out = list(step.run([make_doc(clean, "a"), make_doc(leaked, "b"), make_doc(QUESTION[:40], "c")]))
    assert [d.id for d in out] == ["a", "c"]
    assert dict(step.stats.dropped) == {"contaminated:qa": 1}
    redactor = Decontaminator(DecontaminationStep(sets=[dset], ngram=13, action="redact"), [loaded])
    (doc,) = list(redactor.run([make_doc(leaked, "b")]))
    assert "Baghdad" not in doc.text and "tigris" not in doc.text.lower()
    assert doc.text.startswith(clean[:50]) and doc.text.endswith("More text follows here.")
    assert redactor.stats.changes["redacted:qa"] == 1 and redactor.summary() == {"qa": 1}


def test_short_records_match_as_whole_sequences_and_tables_merge(tmp_path: Path) -> None:
    table, counts = gram_table(["alpha beta gamma delta epsilon", "one two"], 13)
    assert set(table) == {5} and counts["tooShort"] == 1
    words, _ = words_of("x alpha, BETA gamma delta epsilon y")
    assert np.isin(window_hashes(words, 5), table[5]).sum() == 1
    save_table(tmp_path / "t.npz", table)
    again = load_table(tmp_path / "t.npz")
    merged = merge_tables([again, gram_table(["a b c d e f g h i j k l m n"], 13)[0]])
    assert set(merged) == {5, 13} and np.array_equal(merged[5], table[5])


def test_bad_sets_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(EvalSetError, match=r"steps.decontamination.sets\[2\].uri: .*matches no readable file"):
        load_set(DecontaminationSet(name="x", uri=str(tmp_path / "none")), 2, 13, Storage())
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(EvalSetError, match=r"sets\[0\]: the set 'e' has no records"):
        load_set(DecontaminationSet(name="e", uri=str(tmp_path / "empty.jsonl")), 0, 13, Storage())
    with pytest.raises(ValueError, match="exactly one of uri, harnessTask or validation"):
        DecontaminationSet(name="y", uri="a", validation=True)


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="needs the eval extra (lm-eval)")
def test_harness_task_documents_are_a_set(tmp_path: Path) -> None:
    data = tmp_path / "trivia.jsonl"
    data.write_text(json.dumps({"question": QUESTION, "choices": ["The Nile", "The Tigris"], "answer": 1}) + "\n")
    (tmp_path / "trivia.yaml").write_text(
        "task: crucible_trivia\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    dset = DecontaminationSet(name="trivia", harness_task="crucible_trivia", harness_task_dir=str(tmp_path))
    loaded = load_set(dset, 0, 13, Storage())
    assert loaded is not None and loaded.kind == "harness" and loaded.counts["records"] == 1
    step = Decontaminator(DecontaminationStep(sets=[dset]), [loaded])
    assert step.check(f"Blah blah. {QUESTION} The Tigris is the answer.")[0] == "trivia"


def test_quality_classifier_learns_reference_against_raw_sample(tmp_path: Path) -> None:
    rng = random.Random(1)
    write_jsonl(tmp_path / "ref" / "good.jsonl", [{"text": english_document(rng)} for _ in range(80)])
    spam = ["buy cheap pills now click here best price " * 6 + str(i) for i in range(60)]
    write_jsonl(tmp_path / "raw" / "a.jsonl", [{"text": t} for t in spam] + [{"text": english_document(rng)} for _ in range(10)])
    inputs = list_inputs([SourceConfig(name="web", uri=str(tmp_path / "raw"))], Storage())
    config = ClassifierStep(name="quality", positive=[{"uri": str(tmp_path / "ref")}], negativeSample=50)
    first = TrainedClassifier(config, 0, inputs, Storage())
    again = TrainedClassifier(config, 0, inputs, Storage())
    assert first.training == again.training  # the same model on every worker
    assert first.training["negative"]["sampledFromInput"] and first.training["positive"]["files"][0]["sha256"]
    step = ClassifierFilter(first)
    docs = [make_doc(english_document(rng), f"g{i}") for i in range(20)] + [make_doc(spam[0] + " extra", "s")]
    kept = list(step.run(docs))
    assert [d.id for d in kept] == [f"g{i}" for i in range(20)]
    assert dict(step.stats.dropped) == {"below_threshold": 1}
    assert int(step.histogram.sum()) == 21 and step.histogram[-5:].sum() >= 18
    weighted = ClassifierFilter(TrainedClassifier(config.model_copy(update={"action": "weight"}), 0, inputs, Storage()))
    kept = list(weighted.run([make_doc(english_document(rng), "g"), make_doc(spam[1], "s")]))
    assert len(kept) == 2 and kept[0].meta["weight"] > 1.0 > kept[1].meta["weight"] >= 0


def test_toxicity_classifier_scores_the_positive_class(tmp_path: Path) -> None:
    rng = random.Random(2)
    write_jsonl(tmp_path / "toxic.jsonl", [{"text": toxic_document(rng)} for _ in range(60)])
    write_jsonl(tmp_path / "clean.jsonl", [{"text": english_document(rng)} for _ in range(60)])
    config = ClassifierStep(name="toxicity", positive=[{"uri": str(tmp_path / "toxic.jsonl")}],
                            negative=[{"uri": str(tmp_path / "clean.jsonl")}], drop="above", threshold=0.5)
    step = ClassifierFilter(TrainedClassifier(config, 0, [], Storage()))
    kept = list(step.run([make_doc(toxic_document(rng), "t"), make_doc(english_document(rng), "c")]))
    assert [d.id for d in kept] == ["c"] and dict(step.stats.dropped) == {"above_threshold": 1}
    with pytest.raises(ClassifierError, match=r"steps.classifiers\[3\]: 0 positive"):
        (tmp_path / "none.jsonl").write_text('{"other": 1}\n')
        TrainedClassifier(config.model_copy(update={"positive": [config.positive[0].model_copy(
            update={"uri": str(tmp_path / "none.jsonl")})]}), 3, [], Storage())


def test_evaluating_stages_see_whether_their_training_data_was_decontaminated(tmp_path: Path) -> None:
    from crucible.trainer.data.decontaminate import harness_decontamination

    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"format": "crucible-data-manifest", "decontamination": {
        "sets": {"trivia": {"kind": "harness", "harnessTask": "crucible_trivia"}}}}))
    (tmp_path / "pretrained").mkdir()
    (tmp_path / "pretrained" / "_SUCCESS").write_text(json.dumps({"inputs": {"data": str(data), "dataManifestSha256": "x"}}))
    (tmp_path / "tuned").mkdir()
    (tmp_path / "tuned" / "_SUCCESS").write_text(json.dumps({"inputs": {"model": {"uri": str(tmp_path / "pretrained")}}}))
    status = harness_decontamination(["crucible_trivia", "hellaswag"], [str(tmp_path / "tuned"), str(tmp_path / "none")],
                                     Storage())
    assert status["crucible_trivia"] == {"decontaminated": True, "dataPipelines": [str(data)], "decontaminatedIn": [str(data)]}
    assert status["hellaswag"]["decontaminated"] is False and status["hellaswag"]["dataPipelines"] == [str(data)]
    assert harness_decontamination(["x"], [str(tmp_path / "none")], Storage())["x"]["decontaminated"] is False
