from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from posttrain_helpers import write_spec
from transformers import AutoModelForCausalLM

from crucible.trainer.quantize import main


def _spec(model: Path, data: Path, out: Path, **extra) -> dict:
    spec = {
        "model": {"uri": str(model)},
        "evaluation": {"data": {"uri": str(data)}, "seqLen": 32, "maxBatches": 2},
        "output": {"uri": str(out)},
        "maxPerplexityIncrease": 0.5,
        "groupSize": 32,
        "eval": {"prompts": ["the quick brown", "one two"], "maxNewTokens": 4},
    }
    spec.update(extra)
    return spec


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_model_shrinks_stays_within_threshold_and_loads(
    method: str, trained_model_dir: Path, eval_text: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    spec = write_spec(tmp_path / "spec.json", _spec(trained_model_dir, eval_text, out, method=method))
    assert main(["--spec", str(spec)]) == 0
    receipt = json.loads((out / "_SUCCESS").read_text())
    results = receipt["results"]
    assert receipt["stage"] == "quantize" and receipt["inputs"]["model"]["sha256"]
    assert results["sizeBytesAfter"] < 0.75 * results["sizeBytesBefore"]
    assert results["quantizedLayers"] == 2 * 7  # every q/k/v/o/gate/up/down of 2 layers
    assert abs(results["perplexityIncrease"]) <= 0.5
    assert results["perplexityAfter"] == pytest.approx(results["perplexityBefore"] * (1 + results["perplexityIncrease"]))
    # The output is a plain transformers model whose weights really are quantized.
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    original = AutoModelForCausalLM.from_pretrained(trained_model_dir)
    quantized = AutoModelForCausalLM.from_pretrained(out)
    assert type(quantized.model.layers[0].mlp.up_proj.weight).__name__ == "IntxUnpackedToInt8Tensor"
    with torch.no_grad():
        delta = (quantized(ids).logits - original(ids).logits).abs().max().item()
    assert 0 < delta < 1.0
    side_by_side = json.loads((out / "eval" / "prompts.json").read_text())
    assert side_by_side["labels"] == ["original", method] and len(side_by_side["prompts"]) == 2
    # A rerun sees _SUCCESS and does nothing.
    stamp = (out / "_SUCCESS").stat().st_mtime_ns
    assert main(["--spec", str(spec)]) == 0
    assert (out / "_SUCCESS").stat().st_mtime_ns == stamp


def test_int4_is_coarser_than_int8(trained_model_dir: Path, eval_text: Path, tmp_path: Path) -> None:
    deltas = {}
    for method in ("int8", "int4"):
        out = tmp_path / method
        spec = write_spec(tmp_path / f"{method}.json", _spec(trained_model_dir, eval_text, out, method=method))
        assert main(["--spec", str(spec)]) == 0
        deltas[method] = json.loads((out / "_SUCCESS").read_text())["results"]["maxLogitDelta"]
    assert 0 < deltas["int8"] < deltas["int4"]


def test_perplexity_above_threshold_fails_naming_the_field(
    trained_model_dir: Path, eval_text: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    spec = _spec(trained_model_dir, eval_text, out, method="int4", groupSize=64, maxPerplexityIncrease=0.0)
    code = main(["--spec", str(write_spec(tmp_path / "spec.json", spec))])
    assert code == 1
    assert "spec.maxPerplexityIncrease" in capsys.readouterr().err
    assert not (out / "_SUCCESS").exists()
    assert json.loads((out / "eval" / "quantize.json").read_text())["perplexityIncrease"] > 0


@pytest.mark.parametrize(
    ("change", "code", "message"),
    [
        ({"groupSize": 48}, 2, "spec.groupSize: 48 does not divide"),
        ({"method": "gptq", "groupSize": 128}, 2, "spec.method: gptq needs a CUDA GPU"),
            ({"method": "awq"}, 2, "spec.groupSize: awq runs llm-compressor's W4A16 scheme, whose group size is 128"),
        ({"evaluation": {"seqLen": 32}}, 2, "spec.evaluation.data is empty"),
        ({"output": {}}, 2, "spec.output.uri is empty"),
        ({"groupSize": 3}, 2, "spec.groupSize: Input should be greater than or equal to 8"),
        ({"method": "fp3"}, 2, "spec.method: Input should be"),
    ],
)
def test_bad_specs_exit_2_naming_the_field(
    change: dict, code: int, message: str, trained_model_dir: Path, eval_text: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if change.get("method") == "gptq" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    spec = _spec(trained_model_dir, eval_text, tmp_path / "out")
    spec.update(change)
    assert main(["--spec", str(write_spec(tmp_path / "spec.json", spec))]) == code
    assert message in capsys.readouterr().err


def test_model_that_is_not_a_model_directory(eval_text: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = _spec(tmp_path, eval_text, tmp_path / "out")
    assert main(["--spec", str(write_spec(tmp_path / "spec.json", spec))]) == 2
    assert "spec.model.uri" in capsys.readouterr().err
    assert main(["--spec", str(tmp_path / "missing.json")]) == 2


def test_size_counts_the_model_not_the_checkpoints_beside_it(
    trained_model_dir: Path, eval_text: Path, tmp_path: Path
) -> None:
    import shutil

    model = tmp_path / "model"
    shutil.copytree(trained_model_dir, model)
    (model / "checkpoints" / "step-000000010").mkdir(parents=True)
    (model / "checkpoints" / "step-000000010" / "model.safetensors").write_bytes(b"\0" * 100_000)
    out = tmp_path / "out"
    assert main(["--spec", str(write_spec(tmp_path / "spec.json", _spec(model, eval_text, out)))]) == 0
    results = json.loads((out / "_SUCCESS").read_text())["results"]
    assert results["sizeBytesBefore"] == (model / "model.safetensors").stat().st_size
    assert results["sizeBytesAfter"] == (out / "model.safetensors").stat().st_size


def test_a_quantization_that_changes_nothing_fails(
    trained_model_dir: Path, eval_text: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import crucible.trainer.quantize as quantize

    every_linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    monkeypatch.setattr(quantize, "SKIP_MODULES", every_linear)
    out = tmp_path / "out"
    assert main(["--spec", str(write_spec(tmp_path / "spec.json", _spec(trained_model_dir, eval_text, out)))]) == 1
    assert "no linear layer was quantized" in capsys.readouterr().err
    assert not (out / "_SUCCESS").exists()


def test_evaluation_shards_of_another_tokenizer_are_refused(
    trained_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from crucible.trainer.data.shards import ShardWriter

    writer = ShardWriter(tmp_path / "pipeline" / "validation", vocab_size=50_000, eos_id=0)
    writer.add_documents([[1, 2, 40_000, 3] * 40])
    writer.close()
    spec = _spec(trained_model_dir, tmp_path / "pipeline", tmp_path / "out")
    assert main(["--spec", str(write_spec(tmp_path / "spec.json", spec))]) == 2
    assert "spec.evaluation.data holds token id 40000" in capsys.readouterr().err
