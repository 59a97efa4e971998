"""Training throughput: Crucible's engine vs ``transformers.Trainer`` on the same work, in one run.

Both sides train the same Llama (same initial weights), on the same packed token sequences in
the same order, with the same AdamW (fused, the Trainer's default), LR schedule, gradient
clipping and batch; logging, evaluation and saving are off on the Trainer side, and ours runs
its normal loop (metrics.jsonl lines, spike detector) with checkpoints only after the timed
steps. Runs alternate (ours, Trainer, ours, Trainer, ...) so drift in the machine hits both;
the first ``--warmup`` steps of every run are excluded; the figure is the median step time over
all timed steps. On CUDA it also prints MFU (6N + 12·L·d·T FLOPs per token).

    .venv/bin/python bench/train_throughput.py                  # CPU: 2 threads, ~5M Llama, seq 256
    .venv/bin/python bench/train_throughput.py --preset h100-350m   # on one H100: bf16, seq 2048
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # ~5.3M parameters: the CPU goal is ≥ 1.2× the Trainer at sequence 256
    "cpu-5m": {"hidden": 256, "layers": 4, "heads": 4, "ff": 688, "vocab": 4096, "seq": 256, "mbs": 8,
               "accum": 1, "threads": 2, "precision": "fp32"},
    # ~1.9M parameters, a quarter of the work per step: for busy shared machines
    "cpu-2m": {"hidden": 128, "layers": 4, "heads": 4, "ff": 352, "vocab": 4096, "seq": 256, "mbs": 4,
               "accum": 1, "threads": 2, "precision": "fp32"},
    # ~350M: the H100 goal (≥ 50% MFU, ≥ 1.5× Trainer); bf16 autocast with fp32 master weights
    "h100-350m": {"hidden": 1024, "layers": 24, "heads": 16, "ff": 2816, "vocab": 32000, "seq": 2048, "mbs": 8,
                  "accum": 1, "threads": 8, "precision": "bf16"},
    # ~1.0B: the H100/H200 goal of #13 (≥ 55% MFU, ≥ 1.5× Trainer)
    "h100-1b": {"hidden": 2048, "layers": 18, "heads": 16, "ff": 5632, "vocab": 32000, "seq": 2048, "mbs": 4,
                "accum": 1, "threads": 8, "precision": "bf16"},
}


def write_data(root: Path, vocab: int, tokens: int, seed: int = 0) -> Path:
    import numpy as np

    from crucible.trainer.data.shards import ShardWriter

    rng = np.random.default_rng(seed)
    writer = ShardWriter(root / "train", vocab_size=vocab, eos_id=0, tokens_per_shard=1 << 24)
    written = 0
    while written < tokens:
        n = int(rng.integers(100, 2000))
        writer.add_document(rng.integers(1, vocab, n))
        written += n + 1
    writer.close()
    return root


def spec_for(p: dict[str, Any], data: Path, out: Path, steps: int, compile_: bool) -> dict[str, Any]:
    return {
        "model": {"hiddenSize": p["hidden"], "numLayers": p["layers"], "numHeads": p["heads"],
                  "intermediateSize": p["ff"], "vocabSize": p["vocab"], "maxPositionEmbeddings": p["seq"]},
        "data": {"uri": str(data)},
        "training": {"seqLen": p["seq"], "microBatchSize": p["mbs"], "maxSteps": steps,
                     "globalBatchTokens": p["seq"] * p["mbs"] * p["accum"], "evalEvery": 0, "seed": 1,
                     "precision": p["precision"], "compile": compile_},
        "optimizer": {"lr": 3e-4, "warmupSteps": 2, "schedule": "cosine", "gradClip": 1.0, "weightDecay": 0.1},
        "checkpoint": {"uri": str(out / "ckpt"), "interval": 10**9, "asyncSave": False, "resume": "never"},
        "lossSpike": {"enabled": False},
        "metrics": {"port": 0, "logEvery": 10**6},
        "output": {"uri": str(out / "model")},
    }


def run_ours(p: dict[str, Any], data: Path, init_state: dict[str, Any], steps: int, warmup: int,
             work: Path, compile_: bool) -> list[tuple[float, float]]:
    from crucible.trainer.config import parse_stage_spec
    from crucible.trainer.data.shards import ShardSet
    from crucible.trainer.distributed import init_distributed, shutdown
    from crucible.trainer.engine import Engine
    from crucible.trainer.model import build_model
    from crucible.trainer.pretrain import PretrainObjective

    shutil.rmtree(work, ignore_errors=True)
    config = parse_stage_spec("pretrain", spec_for(p, data, work, steps, compile_))
    env = init_distributed()
    train = ShardSet(data / "train")
    model = build_model(config.model, p["vocab"], seed=1)  # type: ignore[attr-defined]
    model.load_state_dict(init_state)
    engine = Engine(config, model, PretrainObjective(train, None), None, env, log=lambda m: None)  # type: ignore[arg-type]
    # a step ends when the loop writes its metrics.jsonl line: time the interval between two
    # (data, forward, backward, clip, optimizer, metrics all-reduce, the jsonl line: the whole loop)
    stamps: list[tuple[float, float]] = []
    write = engine.step_log.write

    def stamped(record: dict[str, Any]) -> None:
        write(record)
        if "event" not in record:
            stamps.append(_now())

    engine.step_log.write = stamped  # type: ignore[method-assign]
    engine.fit()
    engine.close()
    shutdown()  # the Trainer must not find (and wrap the model for) our process group
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    return _intervals(stamps)[warmup:]


def _now() -> tuple[float, float]:
    """Wall clock and this process's CPU time (user + system, all threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), usage.ru_utime + usage.ru_stime


def _intervals(stamps: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(b[0] - a[0], b[1] - a[1]) for a, b in itertools.pairwise(stamps)]


def run_trainer(p: dict[str, Any], data: Path, init_state: dict[str, Any], steps: int, warmup: int,
                work: Path, compile_: bool) -> list[tuple[float, float]]:
    import torch
    from torch.utils.data import Dataset, SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from crucible.trainer.config.training import ModelConfig
    from crucible.trainer.data.shards import ShardSet
    from crucible.trainer.model import build_model
    from crucible.trainer.sampler import GlobalSampler, PackedSequences

    shards = ShardSet(data / "train")
    packed = PackedSequences(shards, p["seq"])
    sampler = GlobalSampler(len(packed), p["mbs"], 0, 1, seed=1)
    order = [i for _ in range(steps * p["accum"]) for i in sampler.next_indices()]  # our exact order

    class Sequences(Dataset):
        def __len__(self) -> int:
            return len(order)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids = torch.from_numpy(shards.read(order[i] * p["seq"], p["seq"]))
            return {"input_ids": ids, "labels": ids}

    class InOrder(Trainer):
        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            return SequentialSampler(self.train_dataset)  # type: ignore[arg-type]

    stamps: list[tuple[float, float]] = []

    class StepTimer(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            stamps.append(_now())

    cfg = ModelConfig(hidden_size=p["hidden"], num_layers=p["layers"], num_heads=p["heads"],
                      intermediate_size=p["ff"], vocab_size=p["vocab"], max_position_embeddings=p["seq"])
    model = build_model(cfg, p["vocab"], seed=1)
    model.load_state_dict(init_state)
    cuda = torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(work), max_steps=steps, per_device_train_batch_size=p["mbs"],
        gradient_accumulation_steps=p["accum"], learning_rate=3e-4, weight_decay=0.1, adam_beta1=0.9,
        adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0, lr_scheduler_type="cosine", warmup_steps=2,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True,
        dataloader_num_workers=0, use_cpu=not cuda, bf16=cuda and p["precision"] == "bf16", seed=1,
        torch_compile=compile_,
    )
    trainer = InOrder(model=model, args=args, train_dataset=Sequences(), callbacks=[StepTimer()])
    trainer.train()
    return _intervals(stamps)[warmup:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-5m")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of every run")
    parser.add_argument("--rounds", type=int, default=4, help="alternations (ours, Trainer) — ≥ 30 timed steps in all")
    parser.add_argument("--compile", action="store_true", help="torch.compile on both sides")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    p = PRESETS[args.preset]

    os.environ.setdefault("OMP_NUM_THREADS", str(p["threads"]))
    import torch

    torch.set_num_threads(p["threads"])
    from crucible.trainer.config.training import ModelConfig
    from crucible.trainer.flops import count_params, flops_per_token, peak_flops
    from crucible.trainer.model import build_model

    root = Path(tempfile.mkdtemp(prefix="crucible-bench-"))
    try:
        steps = args.warmup + args.steps + 1
        tokens_needed = (steps + 2) * p["seq"] * p["mbs"] * p["accum"] * 2
        data = write_data(root / "data", p["vocab"], tokens_needed)
        cfg = ModelConfig(hidden_size=p["hidden"], num_layers=p["layers"], num_heads=p["heads"],
                          intermediate_size=p["ff"], vocab_size=p["vocab"], max_position_embeddings=p["seq"])
        reference = build_model(cfg, p["vocab"], seed=1)
        init_state = copy.deepcopy(reference.state_dict())
        n_params = sum(t.numel() for t in reference.parameters())
        per_token = flops_per_token(count_params(reference), p["layers"], p["hidden"], p["seq"])
        del reference
        ours: list[tuple[float, float]] = []
        theirs: list[tuple[float, float]] = []
        for r in range(args.rounds):
            ours += run_ours(p, data, init_state, steps, args.warmup, root / f"ours-{r}", args.compile)
            theirs += run_trainer(p, data, init_state, steps, args.warmup, root / f"hf-{r}", args.compile)
        tokens_per_step = p["seq"] * p["mbs"] * p["accum"]
        wall_ours, wall_theirs = [w for w, _ in ours], [w for w, _ in theirs]
        med_ours, med_theirs = statistics.median(wall_ours), statistics.median(wall_theirs)
        tps_ours, tps_theirs = tokens_per_step / med_ours, tokens_per_step / med_theirs
        cpu_ours = tokens_per_step / statistics.median([c for _, c in ours])
        cpu_theirs = tokens_per_step / statistics.median([c for _, c in theirs])
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {p['threads']} threads"
        peak = peak_flops(device) if torch.cuda.is_available() else None

        def p99_p50(xs: list[float]) -> float:
            s = sorted(xs)
            return s[min(len(s) - 1, round(0.99 * (len(s) - 1)))] / statistics.median(s)

        result: dict[str, Any] = {
            "preset": args.preset, "device": device, "parameters": n_params, "seqLen": p["seq"],
            "tokensPerStep": tokens_per_step, "timedStepsEach": len(ours),
            "crucibleTokensPerSecond": round(tps_ours, 1), "trainerTokensPerSecond": round(tps_theirs, 1),
            "ratio": round(tps_ours / tps_theirs, 3),
            "crucibleTokensPerCpuSecond": round(cpu_ours, 1), "trainerTokensPerCpuSecond": round(cpu_theirs, 1),
            "cpuRatio": round(cpu_ours / cpu_theirs, 3),
            "crucibleP99OverP50": round(p99_p50(wall_ours), 3), "trainerP99OverP50": round(p99_p50(wall_theirs), 3),
            "loadAverage": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
        }
        if peak:
            result["crucibleMfu"] = round(tps_ours * per_token / peak, 4)
            result["trainerMfu"] = round(tps_theirs * per_token / peak, 4)
        print(f"device {device}; Llama {n_params / 1e6:.2f}M params, seq {p['seq']}, {tokens_per_step} tokens/step, "
              f"median of {len(ours)} timed steps each, {args.rounds} alternating rounds")
        print(f"  crucible engine       {tps_ours:12,.0f} tokens/s  (p99/p50 {result['crucibleP99OverP50']})"
              + (f"  MFU {result['crucibleMfu']:.1%}" if peak else ""))
        print(f"  transformers.Trainer  {tps_theirs:12,.0f} tokens/s  (p99/p50 {result['trainerP99OverP50']})"
              + (f"  MFU {result['trainerMfu']:.1%}" if peak else ""))
        print(f"  ratio                 {result['ratio']:.2f}x wall clock; {result['cpuRatio']:.2f}x per CPU-second "
              f"({result['crucibleTokensPerCpuSecond']:,.0f} vs {result['trainerTokensPerCpuSecond']:,.0f} tokens/CPU-s)")
        print(f"  machine load average {result['loadAverage']} on {result['cpus']} CPUs"
              + ("  (busy: wall-clock figures are noisy; the per-CPU-second ratio is the steadier one)"
                 if result["loadAverage"] > (result["cpus"] or 1) else ""))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
