"""MoE vs dense step time on one GPU: the same active parameters, bf16 autocast, fused AdamW.

A dense Llama (~180M) and a Mixtral-style MoE with the same active parameters (8 experts of half
the MLP width, top-2; capacity factor 1.25) train on random tokens; prints and writes JSON with
the median step time, tokens/s and peak CUDA memory of each, and the ratio.

    python bench/gpu/moe_vs_dense.py --out $OUT/moe_vs_dense.json [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from crucible.trainer.config.training import ModelConfig
from crucible.trainer.model import build_model

SHAPE = {"hiddenSize": 1024, "numLayers": 12, "numHeads": 16, "intermediateSize": 2816, "vocabSize": 32000,
         "maxPositionEmbeddings": 2048}
MOE = {"architecture": "mixtral", "moe": {"numExperts": 8, "topK": 2, "expertIntermediateSize": 1408,
                                          "capacityFactor": 1.25}}


def measure(cfg: ModelConfig, steps: int, warmup: int, batch: int, seq: int) -> dict[str, float]:
    device = torch.device("cuda")
    model = build_model(cfg, 32000, seed=0).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, 32000, (batch, seq), device=device)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(steps + warmup):
        torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - started)
    step_s = statistics.median(times)
    return {"stepSeconds": step_s, "tokensPerSecond": batch * seq / step_s,
            "peakMemoryGiB": torch.cuda.max_memory_allocated() / 2**30,
            "parameters": sum(p.numel() for p in model.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    args = parser.parse_args()
    dense = measure(ModelConfig.model_validate(SHAPE), args.steps, args.warmup, args.batch, args.seq)
    torch.cuda.empty_cache()
    moe = measure(ModelConfig.model_validate({**SHAPE, **MOE}), args.steps, args.warmup, args.batch, args.seq)
    result = {"device": torch.cuda.get_device_name(), "dense": dense, "moe": moe,
              "moeOverDenseStepTime": moe["stepSeconds"] / dense["stepSeconds"]}
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
