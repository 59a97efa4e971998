"""On one GPU: time a ~1B Llama's training loop is blocked per asynchronous sharded save (goal < 100 ms),
and the step time with a save in flight against without (goal ≤ 2% slower).

    .venv/bin/python bench/gpu/checkpoint_gpu.py [--hidden 2048 --layers 18] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--mbs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch

    from crucible.trainer import storage as st
    from crucible.trainer.checkpoint import Checkpointer
    from crucible.trainer.config.training import ModelConfig, OptimizerConfig, TrainingConfig
    from crucible.trainer.distributed import DDPStrategy, init_distributed
    from crucible.trainer.model import build_model
    from crucible.trainer.precision import autocast

    env = init_distributed()
    cfg = ModelConfig(hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                      vocab_size=args.vocab, max_position_embeddings=args.seq)
    model = build_model(cfg, args.vocab, seed=1)
    params = sum(p.numel() for p in model.parameters())
    training = TrainingConfig(max_steps=1, seq_len=args.seq, global_batch_tokens=args.seq * args.mbs,
                              micro_batch_size=args.mbs, precision="bf16")
    strategy = DDPStrategy(model, env, training, OptimizerConfig())
    ids = torch.randint(0, args.vocab, (args.mbs, args.seq), device=env.device)

    def step() -> float:
        torch.cuda.synchronize()
        started = time.perf_counter()
        with autocast(strategy.precision, env.device):
            loss = strategy.model(input_ids=ids, labels=ids).loss
        strategy.backward(loss, True)
        strategy.optimizer_step(1e-4, 1.0)
        torch.cuda.synchronize()
        return time.perf_counter() - started

    for _ in range(3):
        step()
    plain = [step() for _ in range(args.steps)]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Checkpointer(str(Path(tmp) / "ckpt"), st.Storage(), env, keep=1, async_save=True,
                            config_hash="bench", log=lambda m: None)
        blocked: list[float] = []
        in_flight: list[float] = []
        writes: list[float] = []
        for i in range(3):  # the first save allocates the staging buffers; later ones reuse them
            started = time.perf_counter()
            ckpt.save(i + 1, {"step": i + 1, "tokens": 0, "data": {}}, strategy)
            blocked.append(time.perf_counter() - started)
            while ckpt.saving and len(in_flight) < 10 * args.steps:
                in_flight.append(step())
            ckpt.wait()
            writes.append(ckpt.last_write_s)
        ckpt.close()
    result = {
        "params": params, "gpu": torch.cuda.get_device_name(),
        "blocked_ms_first": blocked[0] * 1e3, "blocked_ms_reused": statistics.median(blocked[1:]) * 1e3,
        "background_write_s": statistics.median(writes),
        "step_s": statistics.median(plain), "step_s_save_in_flight": statistics.median(in_flight or plain),
        "steps_in_flight": len(in_flight),
    }
    result["slowdown_in_flight"] = result["step_s_save_in_flight"] / result["step_s"] - 1
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
