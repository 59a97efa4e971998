"""Paths that need CUDA (skipped elsewhere by the gpu marker): QLoRA, packed INT4, GPTQ."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from posttrain_helpers import build_tiny_model, counting_records, sft_spec, write_records, write_spec

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Hidden 256: CUDA int4 kernels want input widths that are multiples of their tile sizes."""
    return build_tiny_model(tmp_path_factory.mktemp("wide") / "model", hidden=256)


def test_qlora_trains_adapters_over_a_4bit_base(wide_model: Path, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    from crucible.trainer.finetune import main

    data = write_records(tmp_path / "data.jsonl", counting_records(60))
    spec = sft_spec(wide_model, data, tmp_path / "out", method="qlora", training={"maxSteps": 10})
    assert main(["--spec", str(write_spec(tmp_path / "spec.json", spec))]) == 0
    results = json.loads((tmp_path / "out" / "_SUCCESS").read_text())["results"]
    assert results["evalLossAfter"] < results["evalLossBefore"]


@pytest.mark.parametrize("method", ["int4", "gptq"])
def test_cuda_quantization_shrinks_below_int8(method: str, wide_model: Path, tmp_path: Path) -> None:
    if method == "gptq":
        pytest.importorskip("llmcompressor")
    from crucible.trainer.quantize import main

    text = tmp_path / "eval.txt"
    text.write_text("\n\n".join(["one two three four five six seven eight nine ten"] * 200))
    sizes = {}
    for m in ("int8", method):
        spec = {"model": {"uri": str(wide_model)}, "method": m, "groupSize": 64,
                "evaluation": {"data": {"uri": str(text)}, "seqLen": 64, "maxBatches": 2},
                "maxPerplexityIncrease": 1.0, "output": {"uri": str(tmp_path / m)}}
        assert main(["--spec", str(write_spec(tmp_path / f"{m}.json", spec))]) == 0
        sizes[m] = json.loads((tmp_path / m / "_SUCCESS").read_text())["results"]["sizeBytesAfter"]
    assert sizes[method] < sizes["int8"]
