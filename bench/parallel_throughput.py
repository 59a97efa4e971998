"""Parallel layouts and MoE: tokens/s and per-rank memory of each layout beside DDP, in one run.

Every case trains the same Llama (same seed, same packed batches in the same order) through the
real engine under torchrun with 4 CPU ranks (gloo, one thread each):

* ``ddp`` (the baseline), ``fsdp`` (FSDP2 over 4), ``tp2-dp2``, ``pp2-dp2``, ``tp2-pp2``
  (``training.parallelism``);
* ``moe``: a Mixtral-style MoE with the same *active* parameters as the dense model (8 experts of
  half the MLP width, top-2; 4× the MLP parameters in total), under DDP on 4 ranks beside ``ddp``;
* ``moe-ep1`` / ``moe-ep2`` / ``moe-ep4``: that MoE under FSDP2 over the 4 ranks with expert
  parallelism 1 (every rank gathers every expert), 2 and 4 (``training.parallelism.expert``: a rank
  holds 8/EP experts, tokens move by all-to-all), each beside ``moe-ep1``.

Printed per case: median tokens/s over the timed steps (the first ``--warmup`` excluded), the
ratio to DDP (or to dense), the model-state bytes each rank holds (parameters + gradients +
AdamW moments of its local shards, 16 bytes per fp32 parameter) and the peak RSS of the largest
rank (includes the ~0.5 GB of the Python/torch runtime itself). On a 2-core machine four ranks
oversubscribe the CPU: tensor and pipeline parallelism pay communication without the
bandwidth they are built for, so these figures say what each layout costs here, not on GPUs.

    .venv/bin/python bench/parallel_throughput.py            # ~3-5 minutes on an idle 2-core machine
    .venv/bin/python bench/parallel_throughput.py --steps 6 --cases ddp,tp2-dp2
    .venv/bin/python bench/parallel_throughput.py --steps 8 --cases moe-ep1,moe-ep2,moe-ep4   # expert parallel
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MODEL = {"hiddenSize": 256, "numLayers": 4, "numHeads": 8, "numKvHeads": 4, "intermediateSize": 704,
         "vocabSize": 2048, "maxPositionEmbeddings": 256}
MOE = {**MODEL, "architecture": "mixtral",
       "moe": {"numExperts": 8, "topK": 2, "expertIntermediateSize": 352, "auxLossCoef": 0.01}}
CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {  # name: (model, training overrides)
    "ddp": (MODEL, {"strategy": "ddp"}),
    "fsdp": (MODEL, {"strategy": "fsdp"}),
    "tp2-dp2": (MODEL, {"strategy": "fsdp", "parallelism": {"tensor": 2}}),
    "pp2-dp2": (MODEL, {"strategy": "fsdp", "parallelism": {"pipeline": 2}}),
    "tp2-pp2": (MODEL, {"strategy": "fsdp", "parallelism": {"tensor": 2, "pipeline": 2}}),
    "moe": (MOE, {"strategy": "ddp"}),
    "moe-ep1": (MOE, {"strategy": "fsdp", "parallelism": {}}),  # FSDP2 over 4, every rank every expert
    "moe-ep2": (MOE, {"strategy": "fsdp", "parallelism": {"expert": 2}}),  # 4 experts per rank, all-to-all
    "moe-ep4": (MOE, {"strategy": "fsdp", "parallelism": {"expert": 4}}),  # 2 experts per rank
}
BASELINE = {"fsdp": "ddp", "tp2-dp2": "ddp", "pp2-dp2": "ddp", "tp2-pp2": "ddp", "moe": "ddp",
            "moe-ep1": "moe", "moe-ep2": "moe-ep1", "moe-ep4": "moe-ep1"}


def write_data(root: Path, tokens: int, vocab: int) -> Path:
    import numpy as np

    from crucible.trainer.data.shards import ShardWriter

    rng = np.random.default_rng(0)
    for split, n in (("train", tokens), ("validation", 4096)):
        writer = ShardWriter(root / split, vocab_size=vocab, eos_id=0, tokens_per_shard=1 << 18)
        written = 0
        while written < n:
            length = int(rng.integers(64, 512))
            start = int(rng.integers(1, vocab))
            writer.add_document([(start + 3 * i) % (vocab - 1) + 1 for i in range(length)])
            written += length + 1
        writer.close()
    return root


def spec_for(case: str, data: Path, out: Path, steps: int) -> dict[str, Any]:
    model, training = CASES[case]
    return {
        "model": model,
        "data": {"uri": str(data)},
        "training": {"seqLen": 128, "globalBatchTokens": 4096, "microBatchSize": 4, "maxSteps": steps,
                     "evalEvery": 0, "evalBatches": 1, "seed": 11, "precision": "fp32", **training},
        "optimizer": {"lr": 1e-3, "warmupSteps": 2},
        "checkpoint": {"uri": str(out / "checkpoints"), "interval": 100000, "keep": 1, "asyncSave": False},
        "lossSpike": {"enabled": False},
        "metrics": {"port": 0, "logEvery": 1000},
        "output": {"uri": str(out / "model")},
    }


def worker(spec_path: str, out: str) -> None:
    """One rank: train the case through the engine, then write this rank's memory figures."""
    import torch

    from crucible.trainer.config import parse_stage_spec
    from crucible.trainer.data.shards import ShardSet
    from crucible.trainer.distributed import init_distributed, shutdown
    from crucible.trainer.engine import Engine
    from crucible.trainer.model import build_model
    from crucible.trainer.pretrain import PretrainObjective

    torch.set_num_threads(1)
    config: Any = parse_stage_spec("pretrain", json.loads(Path(spec_path).read_text()))
    env = init_distributed()
    train = ShardSet(Path(config.data.uri) / "train")
    model = build_model(config.model, train.vocab_size, config.training.seed)
    engine = Engine(config, model, PretrainObjective(train, None), None, env, log=lambda _m: None)
    params = [p for s in getattr(engine.strategy, "stages", [engine.strategy.module]) for p in s.parameters()]
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in params)
    try:
        engine.fit()
    finally:
        engine.close()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Path(out, f"mem-rank-{env.rank}.json").write_text(json.dumps({"stateBytes": 16 * local, "peakRssKiB": peak_kib}))
    shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_case(case: str, data: Path, work: Path, steps: int, warmup: int) -> dict[str, Any]:
    out = work / case
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    spec_path = out / "spec.json"
    spec_path.write_text(json.dumps(spec_for(case, data, out, steps)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=4", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", __file__, "--worker", str(spec_path), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CRUCIBLE_METRICS_PORT": "0",
           "PYTHONPATH": os.pathsep.join([str(REPO / "operator"), str(REPO / "trainer"),
                                          os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode:
        raise SystemExit(f"{case} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    records = [json.loads(line) for line in (out / "checkpoints" / "metrics.jsonl").read_text().splitlines()]
    steps_rec = [r for r in records if "event" not in r][warmup:]
    step_s = statistics.median(r["stepSeconds"] for r in steps_rec)
    tokens = steps_rec[-1]["tokens"] - steps_rec[-2]["tokens"] if len(steps_rec) > 1 else 4096
    mems = [json.loads(p.read_text()) for p in sorted(out.glob("mem-rank-*.json"))]
    return {"case": case, "tokensPerSecond": tokens / step_s, "stepSeconds": step_s,
            "stateMiBPerRank": max(m["stateBytes"] for m in mems) / 2**20,
            "peakRssMiB": max(m["peakRssKiB"] for m in mems) / 1024, "finalLoss": steps_rec[-1]["loss"]}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per case (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="steps excluded from the median (default 3)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    sys.path[:0] = [str(REPO / "operator"), str(REPO / "trainer")]
    cases = [c for c in args.cases.split(",") if c]
    unknown = set(cases) - set(CASES)
    if unknown:
        raise SystemExit(f"--cases: unknown {sorted(unknown)}; choose from {sorted(CASES)}")
    work = Path(tempfile.mkdtemp(prefix="crucible-parallel-bench-"))
    try:
        data = write_data(work / "data", tokens=4096 * (args.steps + 2) + 8192, vocab=2048)
        results = {c: run_case(c, data, work, args.steps, args.warmup) for c in cases}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'case':<9} {'tokens/s':>9} {'vs base':>8} {'state MiB/rank':>15} {'peak RSS MiB':>13} {'loss':>7}")
    for case, r in results.items():
        base = results.get(BASELINE.get(case, ""))
        ratio = f"{r['tokensPerSecond'] / base['tokensPerSecond']:.2f}×" if base else "-"
        print(f"{case:<9} {r['tokensPerSecond']:>9.0f} {ratio:>8} {r['stateMiBPerRank']:>15.1f} "
              f"{r['peakRssMiB']:>13.0f} {r['finalLoss']:>7.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
