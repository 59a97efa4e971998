from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from posttrain_helpers import (
    counting_records,
    kill_at_step,
    launch,
    sft_spec,
    step_losses,
    write_records,
    write_spec,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from crucible.trainer.config.stages import SftDataset
from crucible.trainer.finetune import held_out_loss, main
from crucible.trainer.sft_data import build_sft_data
from waits import scaled


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_records(tmp_path_factory.mktemp("sft") / "data.jsonl", counting_records(60))


def _run(spec: dict, tmp_path: Path) -> int:
    return main(["--spec", str(write_spec(tmp_path / "spec.json", spec))])


def _held_out(model, model_dir: Path, data: Path) -> float:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sft = build_sft_data(SftDataset(uri=str(data), validation_fraction=0.2), tokenizer, 64, True, 1234,
                         tokenizer.chat_template)
    loss = held_out_loss(model, sft.validation, 4)
    assert loss is not None
    return loss


def test_lora_sft_lowers_held_out_loss_and_exports_a_merged_model(
    tiny_model_dir: Path, sft_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    spec = sft_spec(tiny_model_dir, sft_data, out, eval={"prompts": ["one two", "five six"], "maxNewTokens": 3})
    assert _run(spec, tmp_path) == 0
    results = json.loads((out / "_SUCCESS").read_text())["results"]
    assert results["method"] == "lora" and results["output"] == "merged model"
    assert results["evalLossAfter"] < results["evalLossBefore"] - 0.3, results
    assert results["trainableParameters"] < results["parameters"] / 5
    assert results["dataValidationExamples"] == 12 and results["dataChatTemplate"] == "default"
    assert results["tokens"] > 5 * results["dataTrainedTokens"]  # tokens processed: prompts and template too
    # The merged model is a plain transformers model that reproduces the trained held-out loss.
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert _held_out(merged, out, sft_data) == pytest.approx(results["evalLossAfter"], rel=1e-4)
    # The chat template used in training ships with the tokenizer.
    assert "<|assistant|>" in AutoTokenizer.from_pretrained(out).chat_template
    prompts = json.loads((out / "eval" / "prompts.json").read_text())
    assert [p["prompt"] for p in prompts["prompts"]] == ["one two", "five six"]
    assert prompts["labels"] == ["base", "tuned"]
    losses = step_losses(out / "checkpoints")
    assert sorted(losses) == list(range(1, 31))
    # Done is done: a rerun returns at once.
    assert _run(spec, tmp_path) == 0


def test_adapter_output_loads_with_peft_and_matches(tiny_model_dir: Path, sft_data: Path, tmp_path: Path) -> None:
    from peft import AutoPeftModelForCausalLM

    out = tmp_path / "out"
    spec = sft_spec(tiny_model_dir, sft_data, out, mergeAdapter=False, training={"maxSteps": 10},
                    eval={"prompts": ["one two"], "maxNewTokens": 2})
    assert _run(spec, tmp_path) == 0
    results = json.loads((out / "_SUCCESS").read_text())["results"]
    assert results["output"] == "adapter"
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
    model = AutoPeftModelForCausalLM.from_pretrained(out)
    assert _held_out(model, out, sft_data) == pytest.approx(results["evalLossAfter"], rel=1e-4)
    assert json.loads((out / "eval" / "prompts.json").read_text())["prompts"][0]["prompt"] == "one two"


def test_full_fine_tuning_trains_every_weight(tiny_model_dir: Path, sft_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    spec = sft_spec(tiny_model_dir, sft_data, out, method="full", lora=None, packing=False,
                    training={"maxSteps": 8}, optimizer={"lr": 1e-3})
    assert _run(spec, tmp_path) == 0
    results = json.loads((out / "_SUCCESS").read_text())["results"]
    assert results["trainableParameters"] == results["parameters"]
    assert results["evalLossAfter"] < results["evalLossBefore"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tuned = AutoModelForCausalLM.from_pretrained(out)
    assert not torch.equal(base.model.embed_tokens.weight, tuned.model.embed_tokens.weight)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_qlora_without_cuda_says_so_before_anything_starts(
    tiny_model_dir: Path, sft_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert _run(sft_spec(tiny_model_dir, sft_data, out, method="qlora"), tmp_path) == 2
    assert "spec.method: qlora needs a CUDA GPU" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"method": "full"}, "spec.lora: adapter settings are set but method is full"),
        ({"lora": {"targetModules": ["c_attn"]}}, "spec.lora.targetModules: none of ['c_attn']"),
        ({"lora": {"targetModules": ["q_proj", "query"]}}, "spec.lora.targetModules: ['query'] are not modules"),
        ({"training": {"seqLen": 1024, "globalBatchTokens": 4096}}, "training.seqLen (1024) exceeds"),
        ({"dataset": {"uri": "/nonexistent/data.jsonl"}}, "spec.dataset.uri: /nonexistent/data.jsonl: no such file"),
        ({"model": {"uri": "/nonexistent/model"}}, "spec.model.uri"),
        ({"output": None}, "spec.output.uri is empty"),
        ({"training": {"globalBatchTokens": 300}}, "globalBatchTokens: 300 must be a multiple"),
    ],
)
def test_bad_specs_exit_2_with_the_field(
    overrides: dict, message: str, tiny_model_dir: Path, sft_data: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert _run(sft_spec(tiny_model_dir, sft_data, tmp_path / "out", **overrides), tmp_path) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(
    tiny_model_dir: Path, sft_data: Path, tmp_path: Path
) -> None:
    common = {"training": {"maxSteps": 40}, "checkpoint": {"interval": 5, "keep": 2}}
    reference = sft_spec(tiny_model_dir, sft_data, tmp_path / "ref", **common)
    assert launch("finetune", reference, tmp_path / "ref-job").wait(timeout=scaled(300)) == 0
    expected = step_losses(tmp_path / "ref" / "checkpoints")

    spec = sft_spec(tiny_model_dir, sft_data, tmp_path / "run", **common)
    proc = launch("finetune", spec, tmp_path / "job")
    kill_at_step(proc, tmp_path / "run" / "checkpoints", step=13, committed=10)
    assert proc.returncode != 0 and not (tmp_path / "run" / "_SUCCESS").exists()
    assert launch("finetune", spec, tmp_path / "job").wait(timeout=scaled(300)) == 0
    log = (tmp_path / "job" / "log.txt").read_text()
    assert "resumed from" in log, log[-2000:]
    results = json.loads((tmp_path / "run" / "_SUCCESS").read_text())["results"]
    assert 10 <= results["resumedFromStep"] < 40
    assert step_losses(tmp_path / "run" / "checkpoints") == expected  # bit for bit
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == (tmp_path / "ref" / "model.safetensors").read_bytes()
    # A LoRA checkpoint holds the adapter, not the frozen base again.
    newest = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[-1]
    # (Counted from the DCP metadata's tensors: on a model this tiny the pickled optimizer
    # hyper-parameters, one small entry per parameter, outweigh the tensors in the file.)
    from torch.distributed.checkpoint import FileSystemReader

    tensors = {key: meta for key, meta in FileSystemReader(str(newest / "state")).read_metadata().state_dict_metadata.items()
               if hasattr(meta, "size")}
    model_keys = [key for key in tensors if key.startswith("model.")]
    assert model_keys and all("lora_" in key for key in model_keys), [k for k in model_keys if "lora_" not in k][:5]
    state_bytes = sum(meta.size.numel() * meta.properties.dtype.itemsize for meta in tensors.values())
    assert state_bytes < (tiny_model_dir / "model.safetensors").stat().st_size / 2  # adapter + its optimizer state


def test_without_a_held_out_split(tiny_model_dir: Path, sft_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    spec = sft_spec(tiny_model_dir, sft_data, out, dataset={"uri": str(sft_data), "validationFraction": 0.0},
                    training={"maxSteps": 3})
    assert _run(spec, tmp_path) == 0
    results = json.loads((out / "_SUCCESS").read_text())["results"]
    assert "evalLossBefore" not in results and "evalLoss" not in results
    assert results["dataValidationExamples"] == 0 and results["steps"] == 3


def test_the_receipt_names_every_input_read_harness_tasks_included(tiny_model_dir: Path, sft_data: Path,
                                                                   tmp_path: Path) -> None:
    from crucible.trainer.config.stages import FinetuneConfig, PreferenceConfig
    from crucible.trainer.posttrain import Workspace, input_receipts
    from crucible.trainer.storage import Storage

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mine.yaml").write_text("task: mine\n")
    spec = sft_spec(str(tiny_model_dir), str(sft_data), str(tmp_path / "out"))
    spec["eval"] = {"harnessTasks": ["mine"], "harnessTaskDir": str(tasks)}
    ws = Workspace(Storage(), tmp_path, str(tmp_path / "out"), tiny_model_dir, str(tiny_model_dir),
                   FinetuneConfig.model_validate(spec))
    inputs = input_receipts(ws, model=ws.base_uri, dataset=str(sft_data))
    assert set(inputs) == {"model", "dataset", "evaluation"}
    assert inputs["evaluation"]["field"] == "spec.eval.harnessTaskDir" and inputs["evaluation"]["sha256"]
    pairs = {"model": {"uri": str(tiny_model_dir)}, "dataset": {"uri": str(sft_data)},
             "training": {"maxSteps": 1}, "output": {"uri": str(tmp_path / "dpo")}}
    ws.config = PreferenceConfig.model_validate(pairs)  # no harness tasks: no evaluation input
    assert set(input_receipts(ws, model=ws.base_uri, reference=None, dataset=str(sft_data))) == {"model", "dataset"}
