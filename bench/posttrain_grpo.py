"""GRPO: Crucible's PreferenceRun against TRL's GRPOTrainer on the same work, in one run.

    .venv/bin/python bench/posttrain_grpo.py [--steps 12] [--prompts-per-step 8] [--group 4] [--new-tokens 8]

Both start from the same tiny Llama (pretrained here for a few dozen steps on a small word corpus,
so its samples are words), sample ``--group`` completions of ``--new-tokens`` tokens for each of
``--prompts-per-step`` prompts per step at temperature 1, score them with the same rule reward
(1 when the completion contains "dog"), and take one GRPO step (TRL ``loss_type="grpo"``, group
normalisation, ε 0.2, β 0.04 against the frozen starting model; AdamW lr 3e-3, constant, no weight
decay, fp32, CPU, one thread) for the same number of steps.

Prints for each: training seconds (the steps only: Crucible's summed step times from metrics.jsonl,
TRL's ``train_runtime``), prompts per training second, the mean reward of the samples over the first
and last three steps, and the ratios. Crucible checkpoints only at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CRUCIBLE_METRICS_PORT", "0")

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests" / "posttrain"), str(REPO / "tests")]  # the tiny model and its corpus
WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
PATTERN = "dog"
LR = 3e-3
BETA = 0.04
SEQ_LEN = 32


def build_model(root: Path) -> Path:
    from posttrain_helpers import TRAIN_TEXT, build_tiny_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = build_tiny_model(root / "base")
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = torch.tensor(tokenizer(TRAIN_TEXT)["input_ids"])[None]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(40):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(path)
    return path


def prompts(n: int) -> list[str]:
    return [f"{WORDS[i % 8]} {WORDS[i % 8 + 1]}" for i in range(n)]


def crucible_run(base: Path, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    from crucible.trainer.preference import main

    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts(args.prompts_per_step * args.steps)))
    completions = args.prompts_per_step * args.group
    spec = {
        "model": {"uri": str(base)}, "method": "grpo",
        "prompts": {"uri": str(data), "validationFraction": 0},
        "reward": {"rules": [{"type": "regex", "pattern": PATTERN, "name": "dog"}]},
        "rl": {"groupSize": args.group, "maxNewTokens": args.new_tokens, "klCoef": BETA, "clipRange": 0.2,
               "temperature": 1.0},
        "training": {"seqLen": SEQ_LEN, "microBatchSize": completions, "globalBatchTokens": completions * SEQ_LEN,
                     "maxSteps": args.steps},
        "optimizer": {"lr": LR, "warmupSteps": 0, "schedule": "constant", "weightDecay": 0.0, "beta2": 0.999},
        "checkpoint": {"interval": args.steps}, "metrics": {"port": 0}, "output": {"uri": str(root / "crucible")},
    }
    spec_file = root / "spec.json"
    spec_file.write_text(json.dumps(spec))
    assert main(["--spec", str(spec_file)]) == 0
    steps = [json.loads(line) for line in (root / "crucible" / "checkpoints" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "event" not in r]
    return {"seconds": sum(r["stepSeconds"] for r in steps), "rewards": [r["rewardMean"] for r in steps],
            "generationShare": sum(r["generationSeconds"] for r in steps) / sum(r["stepSeconds"] for r in steps)}


def trl_run(base: Path, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    def reward(prompts: Any, completions: list[str], **_: Any) -> list[float]:
        return [float(re.search(PATTERN, c) is not None) for c in completions]

    completions = args.prompts_per_step * args.group
    config = GRPOConfig(
        output_dir=str(root / "trl"), per_device_train_batch_size=completions, num_generations=args.group,
        max_completion_length=args.new_tokens, max_steps=args.steps, learning_rate=LR, lr_scheduler_type="constant",
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0, beta=BETA, epsilon=0.2,
        loss_type="grpo", temperature=1.0, use_cpu=True, bf16=False, report_to=[], logging_steps=1, save_strategy="no",
        seed=1234, dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(base), reward_funcs=[reward], args=config,
                          train_dataset=Dataset.from_dict({"prompt": prompts(args.prompts_per_step * args.steps)}),
                          processing_class=AutoTokenizer.from_pretrained(base))
    output = trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return {"seconds": float(output.metrics["train_runtime"]), "rewards": rewards}


def summary(name: str, result: dict[str, Any], prompts_done: int) -> dict[str, float]:
    rewards = result["rewards"]
    out = {"seconds": result["seconds"], "promptsPerSecond": prompts_done / result["seconds"],
           "rewardFirst3": sum(rewards[:3]) / 3, "rewardLast3": sum(rewards[-3:]) / 3}
    print(f"{name:9s} train {out['seconds']:7.2f} s  {out['promptsPerSecond']:6.2f} prompts/s  reward "
          f"{out['rewardFirst3']:.3f} (first 3 steps) -> {out['rewardLast3']:.3f} (last 3)")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-grpo-") as tmp:
        root = Path(tmp)
        base = build_model(root)
        ours = crucible_run(base, root, args)
        theirs = trl_run(base, root, args)
    done = args.steps * args.prompts_per_step
    print(f"{args.steps} steps × {args.prompts_per_step} prompts × {args.group} samples of {args.new_tokens} tokens")
    a = summary("crucible", ours, done)
    b = summary("trl", theirs, done)
    print(f"throughput ratio crucible/trl: {a['promptsPerSecond'] / b['promptsPerSecond']:.2f}×; "
          f"reward after {args.steps} steps: {a['rewardLast3']:.3f} vs {b['rewardLast3']:.3f}; "
          f"crucible spent {ours['generationShare'] * 100:.0f} % of its step time generating")
    print(json.dumps({"crucible": a, "trl": b}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
