from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from posttrain_helpers import (
    kill_at_step,
    launch,
    preference_records,
    preference_spec,
    step_losses,
    write_records,
    write_spec,
)
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from crucible.trainer.config.stages import LoraConfig, PreferenceDataset
from crucible.trainer.faults import SpecError
from crucible.trainer.lora import wrap
from crucible.trainer.preference import DpoObjective, Reference, main, pair_scores, precompute_reference
from crucible.trainer.preference_data import build_preference_data
from waits import scaled

LORA = {"r": 8, "alpha": 16}


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_records(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", preference_records(80))


def _run(spec: dict, tmp_path: Path) -> int:
    return main(["--spec", str(write_spec(tmp_path / "spec.json", spec))])


def _results(out: Path) -> dict:
    return json.loads((out / "_SUCCESS").read_text())["results"]


def test_lora_dpo_raises_held_out_preference_accuracy(tiny_model_dir: Path, pairs_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    spec = preference_spec(tiny_model_dir, pairs_file, out, lora=LORA,
                           eval={"prompts": ["one two", "four five"], "maxNewTokens": 2})
    assert _run(spec, tmp_path) == 0
    results = _results(out)
    assert results["dataValidationPairs"] == 20
    assert results["preferenceAccuracy"] >= 0.8, results  # chance is 0.5
    assert results["likelihoodAccuracy"] > results["likelihoodAccuracyBefore"]
    assert results["rewardMargin"] > 0 and results["rewardChosen"] > results["rewardRejected"]
    assert results["heldOutLoss"] < results["lossBefore"] == pytest.approx(0.6931, abs=1e-3)  # log 2 at start
    assert results["output"] == "merged model" and results["dpoLoss"] == "sigmoid"
    assert "perplexity" not in results
    assert (out / "eval" / "prompts.md").exists()
    records = [json.loads(line) for line in (out / "checkpoints" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "event" not in r]
    assert {"rewardChosen", "rewardRejected", "rewardMargin", "preferenceAccuracy"} <= steps[-1].keys()
    AutoModelForCausalLM.from_pretrained(out)


def test_reference_under_lora_is_the_base_with_the_adapter_disabled(tiny_model_dir: Path, pairs_file: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = build_preference_data(PreferenceDataset(uri=str(pairs_file)), tokenizer, 32, 0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    policy = wrap(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, alpha=8))
    with torch.no_grad():  # a trained adapter changes the policy...
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    batch = data.train.fetch([0, 1, 2])
    reference = Reference(adapter_model=policy)
    from crucible.trainer.preference import sequence_logps

    with torch.no_grad():
        expected, _ = sequence_logps(base, batch)
        trained, _ = sequence_logps(policy, batch)
    got, _ = reference.logps(batch)
    torch.testing.assert_close(got, expected)  # ...but the reference is still the base
    assert not torch.allclose(trained, expected)
    assert policy.training and all(m.active_adapters == ["default"] for m in [policy])


def test_precomputed_reference_equals_on_the_fly(tiny_model_dir: Path, pairs_file: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = build_preference_data(PreferenceDataset(uri=str(pairs_file)), tokenizer, 32, 0)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    frozen = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reference = Reference(frozen=frozen)
    assert not any(p.requires_grad for p in frozen.parameters())
    objective = DpoObjective(data, reference, beta=0.3, loss_type="sigmoid", label_smoothing=0.0)
    on_the_fly, metrics = objective.loss(policy, data.train.fetch([3, 4, 5]))
    precompute_reference(reference, data.train, 8, torch.device("cpu"), rank=0, world_size=1)
    reference.release()
    batch = data.train.fetch([3, 4, 5])
    assert "ref_chosen_logps" in batch
    precomputed, metrics2 = objective.loss(policy, batch)
    torch.testing.assert_close(precomputed, on_the_fly, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(metrics2["rewardMargin"], metrics["rewardMargin"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("loss", ["ipo", "hinge"])
def test_full_dpo_with_precomputed_reference_learns(
    loss: str, tiny_model_dir: Path, pairs_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    spec = preference_spec(tiny_model_dir, pairs_file, out, dpo={"beta": 0.5, "loss": loss, "precomputeReference": True},
                           training={"maxSteps": 15}, optimizer={"lr": 1e-3})
    assert _run(spec, tmp_path) == 0
    results = _results(out)
    assert results["referencePrecomputed"] is True and results["trainableParameters"] == results["parameters"]
    assert results["preferenceAccuracy"] > 0.6, results


def test_reward_model_learns_and_scores_held_out_pairs(tiny_model_dir: Path, pairs_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    spec = preference_spec(tiny_model_dir, pairs_file, out, method="reward-model", dpo=None, lora=LORA,
                           training={"maxSteps": 20})
    assert _run(spec, tmp_path) == 0
    results = _results(out)
    assert results["preferenceAccuracy"] >= 0.8 > results["preferenceAccuracyBefore"] - 0.3, results
    # The output is a plain sequence-classification model that reproduces the held-out score.
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1
    tokenizer = AutoTokenizer.from_pretrained(out)
    data = build_preference_data(PreferenceDataset(uri=str(pairs_file), validation_fraction=0.25), tokenizer, 32, 1234)
    assert data.validation is not None
    with torch.no_grad():
        chosen, rejected = pair_scores(model.eval(), data.validation.fetch(list(range(data.validation.num_items))))
    assert float((chosen > rejected).float().mean()) == pytest.approx(results["preferenceAccuracy"])


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([{"prompt": "a", "chosen": "b"}], "pairs.jsonl:2: expected string fields 'chosen' and 'rejected'"),
        ([{"chosen": "b", "rejected": "c"}], "pairs.jsonl:2: missing field 'prompt'"),
        ([{"prompt": 3, "chosen": "b", "rejected": "c"}], "pairs.jsonl:2: field 'prompt' must be a string or a list"),
    ],
)
def test_bad_pairs_name_the_line(tiny_model_dir: Path, tmp_path: Path, records: list, message: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    path = write_records(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}, *records])
    with pytest.raises(SpecError, match=message):
        build_preference_data(PreferenceDataset(uri=str(path)), tokenizer, 32, 0)


def test_identical_and_overlong_pairs_are_dropped_and_counted(tiny_model_dir: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    records = [{"prompt": "one", "chosen": " two", "rejected": " two"},
               {"prompt": "one two three " * 20, "chosen": " a", "rejected": " b"},
               {"prompt": "one", "chosen": " two three four five six seven", "rejected": " b"},
               *preference_records(4)]
    data = build_preference_data(PreferenceDataset(uri=str(write_records(tmp_path / "p.jsonl", records))),
                                 tokenizer, 12, 0)
    stats = data.stats.to_json()
    assert stats["droppedIdentical"] == 1 and stats["droppedLongPrompt"] == 1 and stats["truncated"] >= 1
    assert stats["trainPairs"] + stats["validationPairs"] == 5


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"reference": {"uri": "/nonexistent/ref"}}, "spec.reference.uri"),
        ({"dpo": {"loss": "kto"}}, "spec.dpo.loss: Input should be 'sigmoid', 'ipo' or 'hinge'"),
        ({"dataset": {"uri": "/nonexistent.jsonl"}}, "spec.dataset.uri: /nonexistent.jsonl: no such file"),
    ],
)
def test_bad_specs_exit_2(overrides: dict, message: str, tiny_model_dir: Path, pairs_file: Path, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(preference_spec(tiny_model_dir, pairs_file, tmp_path / "out", **overrides), tmp_path) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path
) -> None:
    common = {"lora": LORA, "training": {"maxSteps": 40}, "checkpoint": {"interval": 5, "keep": 2}}
    reference = preference_spec(tiny_model_dir, pairs_file, tmp_path / "ref", **common)
    assert launch("preference", reference, tmp_path / "ref-job").wait(timeout=scaled(300)) == 0
    expected = step_losses(tmp_path / "ref" / "checkpoints")

    spec = preference_spec(tiny_model_dir, pairs_file, tmp_path / "run", **common)
    proc = launch("preference", spec, tmp_path / "job")
    kill_at_step(proc, tmp_path / "run" / "checkpoints", step=13, committed=10)
    assert proc.returncode != 0 and not (tmp_path / "run" / "_SUCCESS").exists()
    assert launch("preference", spec, tmp_path / "job").wait(timeout=scaled(300)) == 0
    assert "resumed from" in (tmp_path / "job" / "log.txt").read_text()
    assert 10 <= _results(tmp_path / "run")["resumedFromStep"] < 40
    assert step_losses(tmp_path / "run" / "checkpoints") == expected  # bit for bit
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == (tmp_path / "ref" / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_two_ranks_fsdp_lora_dpo_with_reference_precomputed_across_ranks(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path
) -> None:
    spec = preference_spec(tiny_model_dir, pairs_file, tmp_path / "out", lora=LORA,
                           dpo={"beta": 0.5, "precomputeReference": True},
                           training={"maxSteps": 8, "globalBatchTokens": 512, "strategy": "fsdp"})
    rc = launch("preference", spec, tmp_path / "job", nproc=2).wait(timeout=scaled(600))
    assert rc == 0, (tmp_path / "job" / "log.txt").read_text()[-3000:]
    results = _results(tmp_path / "out")
    assert results["referencePrecomputed"] is True and results["steps"] == 8
    assert results["preferenceAccuracy"] > 0.6, results
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_conversational_pairs_match_their_string_form(tiny_model_dir: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    plain = {"prompt": "one two", "chosen": " three", "rejected": " nine"}
    chat = {"prompt": [{"role": "user", "content": "one two"}],
            "chosen": [{"role": "assistant", "content": " three"}],
            "rejected": [{"role": "assistant", "content": " nine"}]}
    spec = PreferenceDataset(uri="unused")
    from crucible.trainer.preference_data import tokenize_pair

    string_pair, _ = tokenize_pair(plain, "a:1", spec, tokenizer, 64)
    chat_pair, _ = tokenize_pair(chat, "a:2", spec, tokenizer, 64)
    assert string_pair is not None and chat_pair is not None
    assert chat_pair.chosen_ids == string_pair.chosen_ids and chat_pair.rejected_ids == string_pair.rejected_ids
    # A message-list prompt is rendered with the (default) chat template and a generation prompt.
    assert tokenizer.decode(chat_pair.prompt_ids) == "<|user|>\none two\n<|assistant|>\n"
