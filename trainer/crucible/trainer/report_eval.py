"""Measure the models of a finished pipeline for its report (the control plane imports no torch).

    python -m crucible.trainer.report_eval < request.json > measurements.json

Request: ``{"tokens": <DataPipeline output>, "seqLen": 256, "batches": 4,
"untrained": {"spec": <PretrainRun spec.json>, "output": <its output>} | null,
"models": [{"label", "uri"}], "prompts": [...], "answerTokens": 16}``.

Answer: ``{"tokens": N, "seqLen": S, "batches": B, "perplexity": [{"label", "perplexity", "loss"}],
"untrainedAnswers": {prompt: answer}}``, or ``{"error": "..."}`` when nothing could be measured.
The untrained model is the PretrainRun's at step 0 (same shape and seed, or its ``model.source``);
every model is evaluated on the same validation windows with the stages' own evaluation code.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any


def _quiet() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("torchao", "torch", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _untrained(request: dict[str, Any]) -> tuple[Any, Any] | None:
    untrained = request.get("untrained")
    if not untrained:
        return None
    from crucible.trainer import evaluate
    from crucible.trainer.config.stages import PretrainConfig, parse_stage_spec
    from crucible.trainer.model import build_model

    with open(untrained["spec"]) as fh:
        config = parse_stage_spec("pretrain", json.load(fh))
    assert isinstance(config, PretrainConfig)
    if config.model.source is not None:
        # the stage's own resolution: an s3:// source or a .gguf (converted once, cached) becomes a
        # local Hugging Face folder, so the report measures exactly the model the run started from
        from crucible.trainer import storage as st

        store = st.Storage.from_config(config.storage)
        source = store.node_local_path(config.model.source.uri or "", field="spec.model.source.uri")
        return evaluate.load_model(str(source))
    trained, tokenizer = evaluate.load_model(untrained["output"])
    eos = getattr(trained.config, "eos_token_id", None)
    return build_model(config.model, int(trained.config.vocab_size), config.training.seed, eos_id=eos), tokenizer


def measure(request: dict[str, Any]) -> dict[str, Any]:
    _quiet()
    import torch

    from crucible.trainer import evaluate

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 1))  # small models; robust on a busy machine
    tokens = evaluate.load_eval_tokens(request["tokens"])
    batches = int(request.get("batches", 4))
    seq_len = min(int(request.get("seqLen", 256)), max(8, len(tokens) // 4 - 1))
    out: dict[str, Any] = {"tokens": len(tokens), "seqLen": seq_len, "batches": batches, "perplexity": [],
                           "untrainedAnswers": {}}
    with torch.no_grad():
        untrained = _untrained(request)
        if untrained is not None:
            result = evaluate.perplexity(untrained[0], tokens, seq_len, batches)
            out["perplexity"].append({"label": "untrained", "perplexity": result.perplexity, "loss": result.loss})
            prompts = list(request.get("prompts") or [])
            if prompts and untrained[1] is not None:
                answers = evaluate.answer_prompts(untrained[0], untrained[1], prompts,
                                                  int(request.get("answerTokens", 16)))
                out["untrainedAnswers"] = dict(zip(prompts, answers, strict=True))
        for model_ref in request.get("models") or []:
            model, _ = evaluate.load_model(model_ref["uri"])
            result = evaluate.perplexity(model, tokens, seq_len, batches)
            out["perplexity"].append({"label": model_ref["label"], "perplexity": result.perplexity,
                                      "loss": result.loss})
    return out


def main() -> int:
    request = json.load(sys.stdin)
    try:
        answer = measure(request)
    except Exception as exc:  # the report says what could not be measured instead of failing
        answer = {"error": f"{type(exc).__name__}: {exc}"}
    json.dump(answer, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
