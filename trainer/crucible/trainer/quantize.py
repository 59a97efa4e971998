"""QuantizeJob: weight-only post-training quantization, measured before and after.

``python -m crucible.trainer quantize --spec FILE``

Methods
-------
``int8``  every ``nn.Linear`` weight (the LM head excluded: it is the layer most sensitive to
          rounding) as int8 with one scale per group of ``groupSize`` input channels.
``int4``  the same with 4-bit values: on CUDA torchao's packed ``Int4WeightOnlyConfig`` (two values
          per byte, tinygemm kernels); on CPU ``IntxWeightOnlyConfig(torch.int4, PerGroup(g))``,
          whose values are stored one per int8 byte (``IntxUnpackedToInt8Tensor``), so a CPU INT4
          file is about as large as INT8 with more scales — the accuracy of 4 bits, not their size.
``gptq``/``awq``  through llm-compressor (W4A16, calibrated on the evaluation data); CUDA only.

Why torchao and not optimum-quanto: torchao's tensor subclasses round-trip through
``save_pretrained``/``from_pretrained`` as safetensors (``TorchAoConfig`` in config.json), so the
output loads with plain ``transformers`` and nothing of Crucible; the same library carries the
CUDA INT4 kernels; it is maintained with PyTorch itself, whereas optimum-quanto's serialized
models need quanto's own loader to come back.

The model is quantized while transformers loads it (``quantization_config=TorchAoConfig``) into
a fresh object, never in place on one something else still holds. Then the job checks that the
quantization really happened (the logits of original and quantized model differ, and the
quantized layers are torchao tensors), saves, reloads the output with ``AutoModelForCausalLM``
and checks that the reloaded logits equal the in-memory ones. ``_SUCCESS`` records size and
perplexity before and after; a perplexity increase above ``spec.maxPerplexityIncrease`` fails the
job (exit 1) and leaves the model and ``eval/quantize.json`` without ``_SUCCESS``.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crucible.trainer.config import QuantizeConfig
from crucible.trainer.config.common import EXIT_APPLICATION_ERROR, EXIT_OK
from crucible.trainer.evaluate import (
    answer_prompts,
    check_harness,
    harness_results,
    load_eval_tokens,
    perplexity,
    write_side_by_side,
)
from crucible.trainer.faults import SpecError
from crucible.trainer.posttrain import local_model, model_size_bytes, staged_output
from crucible.trainer.stage_io import (
    SUCCESS,
    finished,
    input_receipt,
    require_uri,
    stage_main,
    write_success,
    write_termination_message,
)
from crucible.trainer.storage import Storage

STAGE = "quantize"
SKIP_MODULES = ["lm_head"]


class QuantizationError(RuntimeError):
    """Quantization did not do what it claims (nothing changed, or the saved model differs)."""


class ThresholdExceeded(RuntimeError):
    """The perplexity rose more than spec.maxPerplexityIncrease allows."""


@dataclass(frozen=True)
class QuantizeOutcome:
    results: dict[str, Any]
    passed: bool


def log(msg: str) -> None:
    print(f"[quantize] {msg}", file=sys.stderr, flush=True)


def _linear_layers(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] not in SKIP_MODULES
    }


def check_group_size(model: torch.nn.Module, group_size: int) -> None:
    """Every quantized layer's input width must be a multiple of the group size."""
    widths = {m.in_features for m in _linear_layers(model).values()}
    bad = sorted(w for w in widths if w % group_size)
    if bad:
        from math import gcd

        common = 0
        for w in widths:
            common = gcd(common, w)
        fits = [g for g in (256, 128, 64, 32, 16, 8) if common % g == 0]
        hint = f"use groupSize {fits[0]}" if fits else "this model cannot be quantized group-wise"
        raise SpecError(
            f"spec.groupSize: {group_size} does not divide the input width of every linear layer "
            f"(widths {bad} are not multiples of it); {hint}"
        )


def torchao_config(method: str, group_size: int, cuda: bool) -> Any:
    """The torchao config of ``method`` on this device (see the module docstring)."""
    from torchao.quantization import Int4WeightOnlyConfig, IntxWeightOnlyConfig, PerGroup

    if method == "int8":
        return IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerGroup(group_size))
    if method == "int4" and cuda:
        return Int4WeightOnlyConfig(group_size=group_size)
    if method == "int4":
        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))  # type: ignore[attr-defined]
    raise ValueError(f"{method} is not a torchao method")


def require_cuda_stack(method: str) -> None:
    """GPTQ/AWQ need CUDA and llm-compressor: say so before loading anything."""
    if not torch.cuda.is_available():
        raise SpecError(
            f"spec.method: {method} needs a CUDA GPU (calibration runs the model layer by layer) and "
            "this machine has none; use method int8 or int4, which run on CPU, or request a GPU "
            "in spec.resources"
        )
    try:
        import llmcompressor  # type: ignore[import-not-found]  # noqa: F401
    except ImportError as exc:
        raise SpecError(
            f"spec.method: {method} needs llm-compressor, which this image lacks: pip install "
            "llmcompressor (or use method int8 or int4)"
        ) from exc


def _quantize_with_llmcompressor(
    model_dir: Path, out_dir: Path, method: str, calibration: np.ndarray, seq_len: int, samples: int
) -> None:
    """W4A16 GPTQ/AWQ with llm-compressor, saved in compressed-tensors format (transformers loads it)."""
    from datasets import Dataset  # type: ignore[import-not-found]
    from llmcompressor import oneshot  # type: ignore[import-not-found]
    from transformers import AutoModelForCausalLM

    if method == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier  # type: ignore[import-not-found]

        recipe: Any = GPTQModifier(targets="Linear", scheme="W4A16", ignore=SKIP_MODULES)
    else:
        from llmcompressor.modifiers.awq import AWQModifier  # type: ignore[import-not-found]

        recipe = AWQModifier(targets="Linear", scheme="W4A16", ignore=SKIP_MODULES)
    n = max(1, min(samples, len(calibration) // seq_len))
    rows = [calibration[i * seq_len : (i + 1) * seq_len].tolist() for i in range(n)]
    dataset = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * seq_len for _ in rows]})
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="auto", device_map="cuda")
    oneshot(model=model, dataset=dataset, recipe=recipe, max_seq_length=seq_len, num_calibration_samples=n)
    model.save_pretrained(str(out_dir), save_compressed=True)


def _first_window(tokens: np.ndarray, seq_len: int) -> torch.Tensor:
    return torch.as_tensor(tokens[: min(len(tokens), seq_len)], dtype=torch.long)[None]  # (1, T)


@torch.no_grad()
def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device)).logits.float().cpu()


def _count_quantized(model: torch.nn.Module) -> int:
    return sum(
        1
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and type(m.weight).__module__.startswith("torchao")
    )


def quantize(config: QuantizeConfig, store: Storage, out_dir: Path, work: Path) -> QuantizeOutcome:
    """Quantize, verify, evaluate and save into ``out_dir``; results for ``_SUCCESS``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, TorchAoConfig

    model_uri = require_uri(config.model.uri, "spec.model.uri", "the model to quantize")
    if config.method in ("gptq", "awq"):
        require_cuda_stack(config.method)
    check_harness(config.eval)
    if config.evaluation.data is None or not config.evaluation.data.uri:
        raise SpecError(
            "spec.evaluation.data is empty: perplexity before/after needs held-out text; point it "
            "at a DataPipeline (fromRun) or a .jsonl/.txt uri"
        )
    model_dir = local_model(store, model_uri, "spec.model.uri", work)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokens = load_eval_tokens(config.evaluation.data.uri, tokenizer, store)
    seq_len, batches = config.evaluation.seq_len, config.evaluation.max_batches

    original = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, device_map=str(device))
    vocab = int(original.config.vocab_size)
    if len(tokens) and int(tokens.max()) >= vocab:
        raise SpecError(
            f"spec.evaluation.data holds token id {int(tokens.max())} but the model's vocabulary has {vocab}: "
            "the data was tokenized with another tokenizer; use the DataPipeline that fed this model, or a "
            ".jsonl/.txt file (tokenized with the model's own tokenizer)"
        )
    # Full module names: transformers matches modules_to_not_convert against parameter names from
    # the start, so a bare "q_proj" would not match "model.layers.0.self_attn.q_proj.weight".
    keep_full_precision = [
        name for name, module in original.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in SKIP_MODULES
    ]
    if config.method in ("int8", "int4"):
        check_group_size(original, config.group_size)
    before = perplexity(original, tokens, seq_len, batches)
    log(f"perplexity before: {before.perplexity:.4f} over {before.tokens} tokens")
    probe = _first_window(tokens, seq_len)
    original_logits = _logits(original, probe)
    prompts = config.eval.prompts
    # A chat model (a FinetuneRun output ships its template) is asked in the format it was trained on.
    template = getattr(tokenizer, "chat_template", None) or None
    answers_before = answer_prompts(original, tokenizer, prompts, config.eval.max_new_tokens, template) if prompts else []
    del original

    if config.method in ("int8", "int4"):
        quant_type = torchao_config(config.method, config.group_size, cuda)
        quantized = AutoModelForCausalLM.from_pretrained(
            str(model_dir),
            dtype=dtype,
            device_map=str(device),
            quantization_config=TorchAoConfig(quant_type=quant_type, modules_to_not_convert=keep_full_precision),
        )
        layers = _count_quantized(quantized)
        if layers == 0:
            raise QuantizationError("no linear layer was quantized; the model has no eligible nn.Linear weights")
        quantized_logits = _logits(quantized, probe)
        if torch.equal(quantized_logits, original_logits):
            raise QuantizationError(
                f"the {config.method} model's logits equal the original's exactly: the quantization "
                "changed nothing (was a model object quantized that something else still holds?)"
            )
        quantized.save_pretrained(str(out_dir))
        fmt = type(quant_type).__name__
    else:
        _quantize_with_llmcompressor(
            model_dir, out_dir, config.method, tokens, seq_len, batches * 4
        )
        layers, quantized_logits, fmt = None, None, "compressed-tensors W4A16"
    tokenizer.save_pretrained(str(out_dir))

    reloaded = AutoModelForCausalLM.from_pretrained(str(out_dir), device_map=str(device))
    reloaded_logits = _logits(reloaded, probe)
    if quantized_logits is not None and not torch.allclose(reloaded_logits, quantized_logits, atol=1e-4):
        diff = float((reloaded_logits - quantized_logits).abs().max())
        raise QuantizationError(f"the saved model's logits differ from the quantized model's by {diff:g}")
    if torch.equal(reloaded_logits, original_logits):
        raise QuantizationError("the saved model gives the original logits: the quantized weights were not saved")
    after = perplexity(reloaded, tokens, seq_len, batches)
    log(f"perplexity after: {after.perplexity:.4f}")
    if prompts:
        answers_after = answer_prompts(reloaded, tokenizer, prompts, config.eval.max_new_tokens, template)
        write_side_by_side(out_dir, prompts, answers_before, answers_after, ("original", config.method),
                           title=f"Prompts before and after {config.method} quantization",
                           references=config.eval.references)

    size_before, size_after = model_size_bytes(model_dir), model_size_bytes(out_dir)
    increase = after.perplexity / before.perplexity - 1.0
    results = {
        "method": config.method,
        "format": fmt,
        "groupSize": config.group_size,
        "quantizedLayers": layers,
        "sizeBytesBefore": size_before,
        "sizeBytesAfter": size_after,
        "compressionRatio": round(size_before / size_after, 4) if size_after else None,
        "perplexityBefore": before.perplexity,
        "perplexityAfter": after.perplexity,
        "perplexityIncrease": increase,
        "maxPerplexityIncrease": config.max_perplexity_increase,
        "evalTokens": after.tokens,
        "maxLogitDelta": float((reloaded_logits - original_logits).abs().max()),
        **harness_results(config.eval, out_dir, lineage=[str(config.model.uri or "")]),
    }
    (out_dir / "eval").mkdir(exist_ok=True)
    (out_dir / "eval" / "quantize.json").write_text(json.dumps(results, indent=2))
    return QuantizeOutcome(results=results, passed=increase <= config.max_perplexity_increase)


def run(config: QuantizeConfig) -> int:
    store = Storage.from_config(config.storage)
    out_uri = require_uri(config.output.uri, "spec.output.uri", "where the quantized model goes")
    if finished(store, out_uri, config):
        log(f"{out_uri} already has {SUCCESS}; nothing to do")
        return EXIT_OK
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="crucible-quantize-"))
    try:
        with staged_output(store, out_uri) as out_dir:
            outcome = quantize(config, store, out_dir, work)
            res = outcome.results
            log(
                f"size {res['sizeBytesBefore']} -> {res['sizeBytesAfter']} bytes, perplexity "
                f"{res['perplexityBefore']:.4f} -> {res['perplexityAfter']:.4f} ({res['perplexityIncrease']:+.2%})"
            )
            if not outcome.passed:
                raise ThresholdExceeded(
                    f"perplexity rose by {res['perplexityIncrease']:.2%} ({res['perplexityBefore']:.4f} -> "
                    f"{res['perplexityAfter']:.4f}), more than spec.maxPerplexityIncrease allows "
                    f"({config.max_perplexity_increase:.2%}); raise spec.maxPerplexityIncrease, use a smaller "
                    "spec.groupSize, or method int8"
                )
        assert config.evaluation.data is not None and config.evaluation.data.uri and config.model.uri
        inputs = {"model": input_receipt(store, config.model.uri, "spec.model"),
                  "evaluation": input_receipt(store, config.evaluation.data.uri, "spec.evaluation.data")}
        if config.eval.harness_task_dir:  # the harness tasks it evaluated the quantized model with
            inputs["harnessTaskDir"] = input_receipt(store, config.eval.harness_task_dir, "spec.eval.harnessTaskDir")
        write_success(store, out_uri, STAGE, inputs, res, config)
    except ThresholdExceeded as exc:
        log(f"failed: {exc}")
        write_termination_message(EXIT_APPLICATION_ERROR, f"ThresholdExceeded: {exc}")
        return EXIT_APPLICATION_ERROR
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    return stage_main(STAGE, QuantizeConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
