"""Expert parallelism on 4 gloo ranks: EP 2 and EP 4 match one process (losses, MoE counters, the Mixtral
export), and checkpoints move between EP degrees both ways (EP 2 → EP 1, one process → PP 2 × EP 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from expert_worker import EXPERT_MODEL, EXPERT_TRAINING, RESUME_STEP
from trainlib import VOCAB, make_engine, run_stage, run_worker_on_four_ranks, tiny_spec

HERE = Path(__file__).resolve().parent


def _records(checkpoints: Path) -> dict[int, dict]:
    lines = (checkpoints / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "event" not in r}


@pytest.mark.slow
def test_expert_parallel_matches_one_process_and_resumes_across_degrees(shards: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    # capacityFactor 1.0 drops assignments; capacity is per rank and micro-batch, and a rank's
    # micro-batch is the single process's micro-batch (data rank r of step j = micro-batch j·4 + r),
    # so the same assignments are dropped in every layout
    reference = make_engine(shards, tmp_path / "single", model=EXPERT_MODEL, training=dict(EXPERT_TRAINING),
                            checkpoint={"interval": RESUME_STEP})
    try:
        reference.fit()
        reference.export(str(tmp_path / "single" / "model"))
    finally:
        reference.close()
    expected = _records(tmp_path / "single" / "checkpoints")
    assert sorted(expected) == list(range(1, 11)) and expected[1]["moeDroppedTokens"] > 0

    cases = [
        # EP 2 × dataShard 4 (experts FSDP over 2), evaluating under EP at steps 5 and 10
        {"name": "ep2", "parallelism": {"expert": 2}, "training": {"evalEvery": 5}},
        # one expert per rank, not FSDP-sharded; activation checkpointing recomputes the all-to-alls
        {"name": "ep4", "parallelism": {"expert": 4}, "training": {"activationCheckpointing": True}},
        {"name": "ep2-to-ep1", "parallelism": {}, "training": {"evalEvery": 5},
         "resume": str(tmp_path / "ep2" / "checkpoints")},
        # and the other way, into pipeline 2 × EP 2 (each stage's experts split over its 2 data ranks)
        {"name": "one-to-pp2ep2", "parallelism": {"expert": 2, "pipeline": 2},
         "resume": str(tmp_path / "single" / "checkpoints")},
    ]
    run_worker_on_four_ranks(HERE / "expert_worker.py", shards, tmp_path, cases, timeout=400)

    for case in cases:
        name = case["name"]
        got = _records(tmp_path / name / "checkpoints")
        first = RESUME_STEP + 1 if "resume" in case else 1
        assert sorted(got) == list(range(first, 11)), name
        for step in got:
            assert abs(got[step]["loss"] - expected[step]["loss"]) <= 1e-4 * abs(expected[step]["loss"]), (name, step)
            # AdamW hides a wrong gradient scale from the loss; the norm does not (experts' share included)
            assert abs(got[step]["gradNorm"] - expected[step]["gradNorm"]) <= 1e-5 * expected[step]["gradNorm"], (
                name, step)
            assert got[step]["moeDroppedTokens"] == expected[step]["moeDroppedTokens"], (name, step)
            assert got[step]["moeExpertShare"] == pytest.approx(expected[step]["moeExpertShare"], abs=1e-4)
    assert expected[10]["loss"] < expected[1]["loss"] - 0.3  # and the model learns
    evals = {name: [json.loads(line) for line in (tmp_path / name / "checkpoints" / "metrics.jsonl").read_text()
                    .splitlines() if '"eval"' in line] for name in ("ep2", "ep2-to-ep1")}
    assert [e["step"] for e in evals["ep2"]] == [5, 10] and [e["step"] for e in evals["ep2-to-ep1"]] == [10]
    assert evals["ep2"][1]["loss"] == pytest.approx(evals["ep2-to-ep1"][0]["loss"], rel=1e-5)  # EP 2 = EP 1 (4 ranks)

    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "ep2" / "model", dtype=torch.float32).state_dict()
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "single" / "model", dtype=torch.float32).state_dict()
    key = "model.layers.0.mlp.experts.gate_up_proj"
    assert ours[key].shape == theirs[key].shape and ours[key].shape[0] == 4  # every expert, gathered
    assert max((ours[k] - theirs[k]).abs().max().item() for k in theirs) <= 1e-4


@pytest.mark.slow
def test_expert_degree_not_dividing_a_source_models_experts_is_refused_at_start(shards: Path, tmp_path: Path) -> None:
    """`crucible validate` cannot see a source model's experts; the trainer refuses at start, naming the field."""
    from crucible.trainer.config.training import ModelConfig
    from crucible.trainer.model import build_model
    from crucible.trainer.output import save_hf_model

    cfg = ModelConfig.model_validate({"architecture": "mixtral", "hiddenSize": 32, "numLayers": 2, "numHeads": 4,
                                      "intermediateSize": 64, "moe": {"numExperts": 3, "topK": 1}})
    model = build_model(cfg, VOCAB, seed=0)
    save_hf_model(model, model.state_dict(), tmp_path / "source", None)
    spec = tiny_spec(shards, tmp_path / "run", model={"architecture": "mixtral", "source": {"uri": str(tmp_path / "source")}},
                     training={"strategy": "fsdp", "parallelism": {"expert": 2}, "globalBatchTokens": 256,
                               "microBatchSize": 2, "maxSteps": 2})
    rc, log = run_stage(spec, tmp_path / "run" / "job", nproc=2)
    assert rc != 0, log[-3000:]  # torchrun ends 1 (ChildFailedError); each rank exits 2 (bad input)
    assert "bad input (exit 2): SpecError: training.parallelism.expert: 2 must divide the model's 3 experts" in log
