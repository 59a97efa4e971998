"""Run under torchrun (4 ranks, gloo): a tiny MoE trained with expert parallelism, and resumed across EP degrees.

``python expert_worker.py DATA OUT CASES_JSON`` — CASES_JSON is a list of
``{"name", "parallelism", "training": {...} (optional overrides), "resume": CHECKPOINT_DIR | null}``; every case trains in this one process
group (saving start-up time). A case with ``resume`` starts from a copy of that checkpoint folder
holding only its step-5 checkpoint. Rank 0 writes ``OUT/<name>/checkpoints/metrics.jsonl`` and each
case exports ``OUT/<name>/model``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from trainlib import tiny_spec

EXPERT_MODEL = {"architecture": "mixtral",
                "moe": {"numExperts": 4, "topK": 2, "capacityFactor": 1.0, "auxLossCoef": 0.01}}
EXPERT_TRAINING = {"globalBatchTokens": 512, "microBatchSize": 2, "maxSteps": 10, "evalEvery": 0}
RESUME_STEP = 5


def copy_until(source: Path, target: Path, step: int) -> None:
    """``source``'s checkpoint folder with the checkpoints after ``step`` left out (the metrics too)."""
    shutil.copytree(source, target, ignore=lambda _d, names: [
        n for n in names if (n.startswith("step-") and int(n.split("-")[1]) > step) or n == "metrics.jsonl"])


def main() -> None:
    import torch.distributed as dist

    from crucible.trainer.config import parse_stage_spec
    from crucible.trainer.data.shards import ShardSet
    from crucible.trainer.distributed import init_distributed, shutdown
    from crucible.trainer.engine import Engine
    from crucible.trainer.model import build_model
    from crucible.trainer.pretrain import PretrainObjective

    data, out, cases = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
    env = init_distributed()
    train = ShardSet(data / "train")
    for case in cases:
        name, resume = case["name"], case.get("resume")
        if resume and env.rank == 0:
            copy_until(Path(resume), out / name / "checkpoints", RESUME_STEP)
        dist.barrier()
        training: dict[str, Any] = {**EXPERT_TRAINING, **case.get("training", {}), "strategy": "fsdp",
                                    "parallelism": case["parallelism"]}
        spec = tiny_spec(data, out / name, model=EXPERT_MODEL, training=training,
                         checkpoint={"interval": RESUME_STEP})
        config = parse_stage_spec("pretrain", spec)
        model = build_model(config.model, train.vocab_size, config.training.seed)  # type: ignore[attr-defined]
        validation = ShardSet(data / "validation") if training.get("evalEvery") else None
        engine = Engine(config, model, PretrainObjective(train, validation), None, env)
        try:
            engine.fit()
            engine.export(str(out / name / "model"))
        finally:
            engine.close()
    shutdown()


if __name__ == "__main__":
    main()
