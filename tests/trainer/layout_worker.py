"""Run under torchrun (4 ranks, gloo): train the same tiny Llama in several layouts, one after the other.

``python layout_worker.py DATA OUT LAYOUTS_JSON`` — LAYOUTS_JSON maps a name to a
``training.parallelism`` block; each layout trains in this one process group (saving process
start-up time) and rank 0 writes ``OUT/<name>/checkpoints/metrics.jsonl``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from trainlib import tiny_spec

LAYOUT_TRAINING = {"globalBatchTokens": 512, "microBatchSize": 2, "maxSteps": 10, "evalEvery": 0}


def main() -> None:
    from crucible.trainer.config import parse_stage_spec
    from crucible.trainer.data.shards import ShardSet
    from crucible.trainer.distributed import init_distributed, shutdown
    from crucible.trainer.engine import Engine
    from crucible.trainer.model import build_meta_model
    from crucible.trainer.pretrain import PretrainObjective

    data, out, layouts = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
    env = init_distributed()
    train = ShardSet(data / "train")
    for name, parallelism in layouts.items():
        spec = tiny_spec(data, out / name, training={**LAYOUT_TRAINING, "strategy": "fsdp", "parallelism": parallelism},
                         checkpoint={"interval": 100})
        config = parse_stage_spec("pretrain", spec)
        model = build_meta_model(config.model, train.vocab_size, config.training.seed)  # type: ignore[attr-defined]
        engine = Engine(config, model, PretrainObjective(train, None), None, env)
        try:
            engine.fit()
        finally:
            engine.close()
    shutdown()


if __name__ == "__main__":
    main()
