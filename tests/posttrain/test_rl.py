"""GRPO, RLOO and PPO in a PreferenceRun: learning against a reward, exact resume, reward models, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from posttrain_helpers import (
    build_tokenizer,
    counting_records,
    kill_at_step,
    launch,
    merge,
    preference_records,
    preference_spec,
    write_records,
    write_spec,
)

from crucible.trainer.preference import main
from waits import scaled

LORA = {"r": 8, "alpha": 16}


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    records = [{"prompt": r["prompt"], "answer": r["response"].strip()} for r in counting_records(64)]
    return write_records(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", records)


def rl_spec(base: Path, prompts: Path, out: Path, /, **overrides) -> dict:
    spec = {
        "model": {"uri": str(base)},
        "method": "grpo",
        "prompts": {"uri": str(prompts), "validationFraction": 0.25},
        "reward": {"rules": [{"type": "regex", "pattern": "dog", "name": "dog"}]},
        "rl": {"groupSize": 4, "maxNewTokens": 6, "klCoef": 0.05},
        "training": {"seqLen": 32, "microBatchSize": 8, "globalBatchTokens": 512, "maxSteps": 12},
        "optimizer": {"lr": 3e-3, "warmupSteps": 0, "schedule": "constant", "weightDecay": 0.0},
        "metrics": {"port": 0},
        "output": {"uri": str(out)},
    }
    return merge(spec, overrides)


def _run(spec: dict, tmp_path: Path) -> int:
    return main(["--spec", str(write_spec(tmp_path / "spec.json", spec))])


def _results(out: Path) -> dict:
    return json.loads((out / "_SUCCESS").read_text())["results"]


def _records(out: Path) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(line) for line in (out / "checkpoints" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "event" not in r], [r for r in lines if r.get("event") == "samples"]


def test_grpo_against_a_rule_reward_raises_the_held_out_reward(trained_model_dir: Path, prompts_file: Path,
                                                                 tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _run(rl_spec(trained_model_dir, prompts_file, out, eval={"prompts": ["one two"], "maxNewTokens": 4}),
                tmp_path) == 0
    results = _results(out)
    assert results["method"] == "grpo" and results["steps"] == 12 and results["heldOutPrompts"] == 16
    assert results["rewardAfter"] > results["rewardBefore"] + 0.2, results
    assert results["winRate"] > 0.6 and results["winRateUnder"] == "reward"
    steps, samples = _records(out)
    assert {"rewardMean", "rewardStd", "kl", "entropy", "clipFraction", "responseLength", "generationSeconds",
            "generationShare", "reward_dog"} <= steps[-1].keys()
    assert 0 < steps[-1]["generationShare"] <= 1
    assert sum(r["rewardMean"] for r in steps[-4:]) > sum(r["rewardMean"] for r in steps[:4])
    assert len(samples) == 12 and len(samples[0]["completions"]) == 4  # one rollout per step (epochs 1)
    assert "| prompt | before |" in (out / "eval" / "rl.md").read_text()
    assert (out / "eval" / "prompts.md").exists()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


def test_step_metrics_become_prometheus_gauges() -> None:
    from crucible.trainer.metrics import GAUGES, Metrics
    from crucible.trainer.rl.loop import RlObjective

    more, gauges = RlObjective.step_metrics({"rewardMean": 0.5, "generationSeconds": 0.3, "kl": 0.1}, 1.2)
    assert more == {"generationShare": 0.25}
    metrics = Metrics(0, enabled=True)
    metrics.set(**gauges)
    from prometheus_client import generate_latest

    text = generate_latest(metrics.registry).decode()
    assert "crucible_rl_reward_mean 0.5" in text and "crucible_rl_generation_share 0.25" in text
    assert {f"crucible_{k}" for k in gauges} <= GAUGES.keys()


@pytest.mark.parametrize(("method", "overrides"), [
    ("grpo", {"rl": {"groupSize": 4, "maxNewTokens": 6, "klCoef": 0.05, "epochs": 2}}),
    ("rloo", {"lora": LORA}),
    ("ppo", {"rl": {"groupSize": 2, "maxNewTokens": 6, "klCoef": 0.05, "epochs": 2, "valueCoef": 0.5}}),
])
def test_sigkill_then_resume_repeats_samples_rewards_and_losses_bit_for_bit(
    method: str, overrides: dict, trained_model_dir: Path, prompts_file: Path, tmp_path: Path
) -> None:
    common = {"method": method, "training": {"maxSteps": 5},
              "checkpoint": {"interval": 3, "keep": 2, "asyncSave": False}, **overrides}
    assert _run(rl_spec(trained_model_dir, prompts_file, tmp_path / "ref", **json.loads(json.dumps(common))),
                tmp_path) == 0  # uninterrupted, in this process
    spec = rl_spec(trained_model_dir, prompts_file, tmp_path / "run", **json.loads(json.dumps(common)))
    proc = launch("preference", spec, tmp_path / "job")
    kill_at_step(proc, tmp_path / "run" / "checkpoints", step=4)  # step 3's checkpoint is inside a rollout (epochs 2)
    assert proc.returncode != 0 and not (tmp_path / "run" / "_SUCCESS").exists()
    assert launch("preference", spec, tmp_path / "job").wait(timeout=scaled(300)) == 0, (tmp_path / "job" / "log.txt").read_text()[-2000:]
    assert _results(tmp_path / "run")["resumedFromStep"] == 3

    def by_step(out: Path) -> dict[int, tuple[str, ...]]:
        steps, _ = _records(out)
        keys = ("loss", "rewardMean", "rewardStd", "kl", "entropy", "clipFraction", "gradNorm")
        return {r["step"]: tuple(float(r[k]).hex() for k in keys) for r in steps}

    def by_rollout(out: Path) -> dict[int, str]:
        return {s["rollout"]: s["sha256"] for s in _records(out)[1]}

    assert by_step(tmp_path / "run") == by_step(tmp_path / "ref")  # the last record of each step, by float.hex
    assert by_rollout(tmp_path / "run") == by_rollout(tmp_path / "ref")  # token ids and rewards of every sample
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == (tmp_path / "ref" / "model.safetensors").read_bytes()


def test_a_reward_model_run_is_the_reward(tiny_model_dir: Path, prompts_file: Path, tmp_path: Path) -> None:
    pairs = write_records(tmp_path / "pairs.jsonl", preference_records(40))
    reward_model = tmp_path / "rm"
    assert _run(preference_spec(tiny_model_dir, pairs, reward_model, method="reward-model", lora=LORA,
                                training={"maxSteps": 4}), tmp_path) == 0
    out = tmp_path / "out"
    spec = rl_spec(tiny_model_dir, prompts_file, out, method="rloo", lora=LORA, training={"maxSteps": 2},
                   reward={"model": {"uri": str(reward_model)}, "modelWeight": 2.0,
                           "rules": [{"type": "contains", "field": "answer", "weight": 0.5}]})
    assert _run(spec, tmp_path) == 0
    results = _results(out)
    assert results["winRateUnder"] == "reward model" and results["output"] == "merged model"
    steps, _ = _records(out)
    assert {"reward_model", "reward_contains0"} <= steps[0].keys()
    assert steps[0]["rewardMean"] == pytest.approx(2.0 * steps[0]["reward_model"] + 0.5 * steps[0]["reward_contains0"])


@pytest.fixture(scope="module")
def other_tokenizer_model(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    path = tmp_path_factory.mktemp("other") / "model"
    shutil.copytree(tiny_model_dir, path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (path / name).unlink(missing_ok=True)
    build_tokenizer(vocab_size=300).save_pretrained(path)
    return path


@pytest.mark.parametrize(("overrides", "message"), [
    ({"rl": {"groupSize": 1}}, "rl.groupSize: grpo normalises rewards within a group"),
    ({"reward": {"rules": [{"type": "regex", "pattern": "(["}]}}, "does not compile"),
    ({"reward": {"rules": [{"type": "length"}]}}, "targetTokens: a length rule needs targetTokens"),
    ({"prompts": {"promptField": "question"}}, "missing field 'question'"),
    ({"reward": {"rules": [{"type": "exact", "field": "solution"}]}}, "compares against field 'solution'"),
    ({"reward": {"model": {"uri": "TINY"}}}, "is not a reward model"),
    ({"reference": {"uri": "OTHER"}}, "the reference's tokenizer differs from the policy's"),
    ({"dataset": {"uri": "x.jsonl"}}, "dataset: method grpo does not use dataset"),
    ({"lossSpike": {"action": "rollback"}}, "lossSpike.action: rollback replays the same samples"),
])
def test_bad_rl_input_exits_2_naming_the_field(overrides: dict, message: str, tiny_model_dir: Path,
                                               other_tokenizer_model: Path, prompts_file: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    text = json.dumps(overrides).replace("TINY", str(tiny_model_dir)).replace("OTHER", str(other_tokenizer_model))
    spec = rl_spec(tiny_model_dir, prompts_file, tmp_path / "out", **json.loads(text))
    assert _run(spec, tmp_path) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "_SUCCESS").exists()


def test_critique_revision_pairs_feed_a_dpo_run_through_from_run(trained_model_dir: Path, prompts_file: Path,
                                                                 tmp_path: Path) -> None:
    from crucible.api.preferencerun import PreferenceRun
    from crucible.core.plan import resolve_spec

    pairs_out = tmp_path / "critique"
    spec = {"model": {"uri": str(trained_model_dir)}, "method": "critique-revision",
            "prompts": {"uri": str(prompts_file)},
            "critique": {"principles": ["be brief", "count on"], "maxNewTokens": 5, "temperature": 1.0},
            "training": {"seqLen": 512, "microBatchSize": 16}, "metrics": {"port": 0},
            "output": {"uri": str(pairs_out)}}
    assert _run(spec, tmp_path) == 0
    results = _results(pairs_out)
    records = [json.loads(line) for line in (pairs_out / "pairs.jsonl").read_text().splitlines()]
    assert results["pairs"] == len(records) > 40 and results["method"] == "critique-revision"
    assert {"prompt", "chosen", "rejected", "principle", "critique"} <= records[0].keys()
    assert {r["principle"] for r in records} == {"be brief", "count on"}
    assert all(r["chosen"] != r["rejected"] for r in records)

    dpo = PreferenceRun.model_validate({
        "apiVersion": "crucible.dev/v1alpha1", "kind": "PreferenceRun", "metadata": {"name": "dpo"},
        "spec": {**preference_spec(trained_model_dir, Path("unused"), tmp_path / "dpo", training={"maxSteps": 3}),
                 "dataset": {"fromRun": {"kind": "PreferenceRun", "name": "pairs"}, "validationFraction": 0.2}}})
    resolved = resolve_spec(dpo, {"dataset": str(pairs_out)})  # what both backends hand the trainer
    assert resolved["dataset"]["uri"] == str(pairs_out) and "fromRun" not in resolved["dataset"]
    assert resolved["dataset"]["validationFraction"] == 0.2  # the node keeps its other fields
    assert _run(resolved, tmp_path) == 0
    dpo_results = _results(tmp_path / "dpo")
    assert dpo_results["steps"] == 3 and dpo_results["dataRecords"] == len(records)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"training": {"seqLen": 128, "maxSteps": 3}}, "training.maxSteps: critique-revision trains nothing"),
    ({"lora": LORA}, "lora: critique-revision only generates pairs"),
    ({"critique": {"principles": []}}, "principles"),
    ({"critique": {"principles": ["x"], "critiquePrompt": "{who}"}}, "critiquePrompt: only {principle}"),
])
def test_bad_critique_specs_exit_2(overrides: dict, message: str, tiny_model_dir: Path, prompts_file: Path,
                                   tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = merge({"model": {"uri": str(tiny_model_dir)}, "method": "critique-revision",
                  "prompts": {"uri": str(prompts_file)}, "critique": {"principles": ["x"]},
                  "training": {"seqLen": 128}, "output": {"uri": str(tmp_path / "out")}}, overrides)
    assert _run(spec, tmp_path) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("method", ["grpo", "rloo", "ppo", "critique-revision"])
def test_a_resolved_spec_parses_again(method: str) -> None:
    """Both backends hand the trainer ``spec.to_wire()`` with every default filled in: it must still validate."""
    from crucible.trainer.config.stages import PreferenceConfig

    spec: dict = {"model": {"uri": "m"}, "method": method, "prompts": {"uri": "p.jsonl"},
                  "training": {"seqLen": 64, "globalBatchTokens": 512, "maxSteps": 3}}
    if method == "critique-revision":
        spec.update(critique={"principles": ["x"]}, training={"seqLen": 64})
    else:
        spec["reward"] = {"rules": [{"type": "regex", "pattern": "a"}, {"type": "length", "targetTokens": 3},
                                    {"type": "format", "format": "prefix", "value": "In short"}]}
    config = PreferenceConfig.model_validate(spec)
    assert PreferenceConfig.model_validate(config.to_wire()) == config
