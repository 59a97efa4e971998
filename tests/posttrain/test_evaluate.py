from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from crucible.trainer.config.training import PromptsConfig
from crucible.trainer.data.shards import ShardWriter
from crucible.trainer.evaluate import (
    EvalDataError,
    answer_prompts,
    check_harness,
    load_eval_tokens,
    load_model,
    main,
    perplexity,
    run_harness_tasks,
    write_side_by_side,
)
from crucible.trainer.faults import SpecError


def test_perplexity_matches_transformers_own_loss(tiny_model_dir: Path) -> None:
    model, _ = load_model(tiny_model_dir)
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, 4 * 17).astype(np.int64)
    result = perplexity(model, tokens, seq_len=16, max_batches=1, batch_size=4)
    ids = torch.as_tensor(tokens.reshape(4, 17))
    with torch.no_grad():
        expected = model(input_ids=ids, labels=ids).loss.item()
    assert result.tokens == 4 * 16 and result.windows == 4
    assert result.loss == pytest.approx(expected, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-5)
    # An untrained model is close to uniform over the vocabulary.
    assert 0.5 * model.config.vocab_size < result.perplexity < 2 * model.config.vocab_size


def test_windows_are_spread_and_capped(tiny_model_dir: Path) -> None:
    model, _ = load_model(tiny_model_dir)
    tokens = np.arange(1000, dtype=np.int64) % model.config.vocab_size
    result = perplexity(model, tokens, seq_len=8, max_batches=2, batch_size=3)
    assert result.windows == 6 and result.tokens == 48


def test_too_little_data_names_the_fix(tiny_model_dir: Path) -> None:
    model, _ = load_model(tiny_model_dir)
    with pytest.raises(EvalDataError, match="smaller seqLen"):
        perplexity(model, np.zeros(10, dtype=np.int64), seq_len=16, max_batches=1)


def test_sources_shards_pipeline_output_jsonl_and_text(tiny_model_dir: Path, tmp_path: Path) -> None:
    _, tokenizer = load_model(tiny_model_dir)
    docs = [tokenizer("the quick brown fox")["input_ids"], tokenizer("one two three")["input_ids"]]
    writer = ShardWriter(tmp_path / "pipeline" / "validation", vocab_size=len(tokenizer), eos_id=tokenizer.eos_token_id)
    writer.add_documents(docs)
    writer.close()
    from_pipeline = load_eval_tokens(str(tmp_path / "pipeline"))
    from_split = load_eval_tokens(str(tmp_path / "pipeline" / "validation"))
    eos = tokenizer.eos_token_id
    expected = [*docs[0], eos, *docs[1], eos]
    assert from_pipeline.tolist() == expected == from_split.tolist()

    jsonl = tmp_path / "eval.jsonl"
    jsonl.write_text(json.dumps({"text": "the quick brown fox"}) + "\n\n" + json.dumps({"prompt": "one two", "response": " three"}) + "\n")
    assert load_eval_tokens(str(jsonl), tokenizer).tolist() == expected
    text = tmp_path / "eval.txt"
    text.write_text("the quick brown fox\n\none two three\n")
    assert load_eval_tokens(str(text), tokenizer).tolist() == expected


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.jsonl", '{"text": "ok"}\nnot json\n', "bad.jsonl:2: not valid JSON"),
        ("shape.jsonl", '{"body": "x"}\n', "shape.jsonl:1: expected an object with a string 'text'"),
        ("empty.txt", "\n\n", "holds no text"),
        ("data.parquet", "x", "unknown evaluation file type"),
    ],
)
def test_bad_sources_say_where(tiny_model_dir: Path, tmp_path: Path, name: str, content: str, message: str) -> None:
    _, tokenizer = load_model(tiny_model_dir)
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(EvalDataError, match=message):
        load_eval_tokens(str(path), tokenizer)


def test_directory_without_shards_and_missing_path(tmp_path: Path) -> None:
    with pytest.raises(EvalDataError, match="neither a DataPipeline output"):
        load_eval_tokens(str(tmp_path))
    with pytest.raises(EvalDataError, match="no such file"):
        load_eval_tokens(str(tmp_path / "nope.jsonl"))


def test_answers_are_deterministic_and_exclude_the_prompt(tiny_model_dir: Path) -> None:
    model, tokenizer = load_model(tiny_model_dir)
    first = answer_prompts(model, tokenizer, ["the quick", "one two"], max_new_tokens=5)
    second = answer_prompts(model, tokenizer, ["the quick", "one two"], max_new_tokens=5)
    assert first == second and len(first) == 2
    ids = tokenizer("the quick", return_tensors="pt")["input_ids"]
    out = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert first[0] == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_side_by_side_markdown_and_json(tmp_path: Path) -> None:
    paths = write_side_by_side(tmp_path, ["a|b", "q"], ["x\ny", "same"], ["z", "same"], labels=("base", "tuned"))
    data = json.loads(Path(paths["json"]).read_text())
    assert data["labels"] == ["base", "tuned"]
    assert data["prompts"][0] == {"prompt": "a|b", "base": "x\ny", "tuned": "z", "changed": True}
    assert data["prompts"][1]["changed"] is False
    markdown = Path(paths["markdown"]).read_text()
    assert "| a\\|b | x<br>y | z |" in markdown
    with pytest.raises(ValueError, match="2 prompts but 1"):
        write_side_by_side(tmp_path, ["a", "b"], ["x"], ["y", "z"])


def test_harness_without_lm_eval_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # CI has the eval extra: hide lm-eval the way an image without it looks (import fails).
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)
    with pytest.raises(SpecError, match=r"pip install 'crucible\[eval\]'"):
        run_harness_tasks(str(tmp_path), ["hellaswag"])


def _counting_task(folder: Path) -> Path:
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    data = folder / "counting.jsonl"
    data.write_text("".join(
        json.dumps({"question": f"{words[a]} {words[a + 1]}", "choices": [f" {words[a + 2]}", f" {words[(a + 5) % 10]}"],
                    "answer": 0}) + "\n" for a in range(8)))
    (folder / "counting.yaml").write_text(
        "task: crucible_counting\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    return folder


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="needs the eval extra (lm-eval)")
def test_harness_runs_a_task_over_local_data(trained_model_dir: Path, tmp_path: Path) -> None:
    tasks = _counting_task(tmp_path)
    results = run_harness_tasks(str(trained_model_dir), ["crucible_counting"], task_dir=str(tasks))
    assert set(results) == {"crucible_counting"}
    assert 0.0 <= results["crucible_counting"]["acc"] <= 1.0 and "acc_stderr" in results["crucible_counting"]
    with pytest.raises(SpecError, match=r"eval.harnessTasks: \['no_such_task'\] are not lm-evaluation-harness tasks"):
        check_harness(PromptsConfig(harness_tasks=["no_such_task"], harness_task_dir=str(tasks)))
    with pytest.raises(SpecError, match=r"eval.harnessTaskDir: .* is not a folder"):
        check_harness(PromptsConfig(harness_tasks=["x"], harness_task_dir=str(tmp_path / "none")))


def test_cli_prints_perplexity(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "eval.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n\n" * 20)
    assert main(["--model", str(tiny_model_dir), "--data", str(text), "--seq-len", "16", "--max-batches", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["windows"] == 8
    assert main(["--model", str(tiny_model_dir), "--data", str(tmp_path / "none.jsonl")]) == 2
