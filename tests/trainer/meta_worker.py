"""Run under torchrun (2 ranks, gloo): build on meta, shard, materialise, export; compare.

``python meta_worker.py OUT`` — for each case, the strategy's gathered weights (rank 0) must equal
``build_model``'s bit for bit, and the streamed export (small shard files + index) must load in
``transformers`` with the tensors of the old whole-state export; rank 0 writes ``OUT/<case>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

CASES = {
    "fsdp": ({}, {"strategy": "fsdp"}),
    "fsdp-tied-moe": ({"tieWordEmbeddings": True, "architecture": "mixtral",
                       "moe": {"numExperts": 4, "topK": 2, "everyNLayers": 2}}, {"strategy": "fsdp"}),
    "ddp": ({}, {"strategy": "ddp"}),
    "tp2": ({}, {"strategy": "fsdp", "parallelism": {"tensor": 2}}),
    "ep2": ({"architecture": "mixtral", "moe": {"numExperts": 4, "topK": 2}},
            {"strategy": "fsdp", "parallelism": {"expert": 2}}),
    "pp2": ({}, {"strategy": "fsdp", "parallelism": {"pipeline": 2}, "globalBatchTokens": 256,
                 "microBatchSize": 2}),
}

SHARD_BYTES = 20_000  # a 30k-parameter model in several files


def _losses(strategy: Any) -> list[str]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 96, (2, 32), generator=gen)
    out = []
    for _ in range(2):
        loss = strategy.model(input_ids=ids, labels=ids).loss
        strategy.backward(loss, last=True)
        strategy.optimizer_step(1e-2, 1.0)
        out.append(float(loss.detach()).hex())
    return out


def main() -> None:
    from transformers import AutoModelForCausalLM

    from crucible.trainer.config import parse_stage_spec
    from crucible.trainer.distributed import build_strategy, init_distributed, shutdown
    from crucible.trainer.engine import grad_accum_steps
    from crucible.trainer.model import build_meta_model, build_model
    from crucible.trainer.output import save_hf_model, write_hf_model

    out = Path(sys.argv[1])
    env = init_distributed()
    base = {"hiddenSize": 32, "numLayers": 2, "numHeads": 4, "numKvHeads": 2, "intermediateSize": 64,
            "vocabSize": 96, "maxPositionEmbeddings": 64}
    for name, (model_over, training_over) in CASES.items():
        spec = {"model": {**base, **model_over}, "data": {"uri": "/nonexistent"},
                "training": {"seqLen": 32, "globalBatchTokens": 128, "microBatchSize": 2, "maxSteps": 1,
                             "seed": 11, **training_over},
                "output": {"uri": str(out / name)}}
        config = parse_stage_spec("pretrain", spec)
        meta = build_meta_model(config.model, 96, config.training.seed)  # type: ignore[attr-defined]
        assert all(p.is_meta for p in meta.parameters())
        accum = grad_accum_steps(config, env.world_size)  # type: ignore[arg-type]
        strategy = build_strategy(meta, env, config.training, config.optimizer, accum)  # type: ignore[attr-defined]
        after_build = torch.random.get_rng_state()
        got = strategy.export_state()
        if env.is_main:
            assert got is not None
            want = build_model(config.model, 96, config.training.seed).state_dict()  # type: ignore[attr-defined]
            rng_same = torch.equal(after_build, torch.random.get_rng_state())
            differ = sorted(k for k in want if k not in got or not torch.equal(got[k], want[k]))
            old = out / name / "old"
            save_hf_model(strategy.module, got, old, None)  # the whole-state export this replaced
        specs, items = strategy.export_stream()
        stats = write_hf_model(strategy.module, specs, items, out / name / "new" if env.is_main else None, None,
                               shard_bytes=SHARD_BYTES)
        if env.is_main:
            a = AutoModelForCausalLM.from_pretrained(old).state_dict()
            b = AutoModelForCausalLM.from_pretrained(out / name / "new").state_dict()
            export_differ = sorted(k for k in a if k not in b or not torch.equal(a[k], b[k])) + sorted(set(b) - set(a))
            result = {"differ": differ, "rng": rng_same, "n": len(want), "exportDiffer": export_differ,
                      "files": stats["files"], "bytes": stats["bytes"], "peakGroupBytes": stats["peakGroupBytes"],
                      "oldFiles": sorted(p.name for p in old.iterdir()),
                      "newFiles": sorted(p.name for p in (out / name / "new").iterdir()),
                      "configSame": json.loads((old / "config.json").read_text())
                      == json.loads((out / name / "new" / "config.json").read_text())}
        if not getattr(strategy, "pipelined", False):  # the same 2 training steps from both builds
            cpu = build_strategy(build_model(config.model, 96, config.training.seed),  # type: ignore[attr-defined]
                                 env, config.training, config.optimizer, accum)  # type: ignore[attr-defined]
            same = _losses(strategy) == _losses(cpu)
        else:
            same = True
        if env.is_main:
            result["lossesEqual"] = same
            (out / f"{name}.json").write_text(json.dumps(result))
    if len(sys.argv) > 2:  # a Hugging Face source in several safetensors files: each rank reads its slices
        source = Path(sys.argv[2])
        from crucible.trainer.config.training import TrainingConfig
        from crucible.trainer.meta_init import pending_init
        from crucible.trainer.model import source_meta_model

        meta = source_meta_model(source, str(source))
        assert meta is not None
        reader = pending_init(meta)
        training = TrainingConfig.model_validate({"strategy": "fsdp", "seqLen": 32, "globalBatchTokens": 128,
                                                  "microBatchSize": 2, "maxSteps": 1})
        strategy = build_strategy(meta, env, training, config.optimizer, 1)  # type: ignore[attr-defined]
        got = strategy.export_state()
        from crucible.trainer.distributed import all_gather_object

        reads = all_gather_object(reader.bytes_read)  # type: ignore[union-attr]
        if env.is_main:
            assert got is not None
            want = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).state_dict()
            differ = sorted(k for k in want if k not in got or not torch.equal(got[k], want[k]))
            (out / "source.json").write_text(json.dumps({"differ": differ, "reads": reads,
                                                          "total": reader.bytes_total}))  # type: ignore[union-attr]
    shutdown()


if __name__ == "__main__":
    main()
