"""DPO: Crucible's PreferenceRun against TRL's DPOTrainer on the same work, in one run.

    .venv/bin/python bench/posttrain_dpo.py [--steps 40] [--pairs 240] [--hidden 128] [--layers 4]

Both train the same freshly initialised Llama (full fine-tuning, fp32, CPU, one thread) with
DPO (sigmoid loss, β 0.1) on the same separable preference pairs for the same number of
optimizer steps of 8 pairs, with the same optimizer settings (AdamW lr 1e-3, betas 0.9/0.95,
no weight decay, constant schedule, clip 1.0) and a frozen reference computed on the fly.

Prints for each: training seconds (the optimizer steps only: Crucible's summed step times
from metrics.jsonl, TRL's ``train_runtime``), wall seconds of the whole job (Crucible's stage
includes held-out evaluation before/after, checkpoints and the export; TRL's is ``train()`` +
``save_model``), pairs per training second, and the held-out preference accuracy of the
result scored by the same code (``crucible.trainer.preference``) against the same reference —
then the ratios. Crucible checkpoints only at the end (``checkpoint.interval`` = steps) so
the comparison is of the training step itself.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CRUCIBLE_METRICS_PORT", "0")

import torch

WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
MICRO_BATCH = 8
SEQ_LEN = 32
BETA = 0.1
LR = 1e-3


def build_model(root: Path, hidden: int, layers: int) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([" ".join(WORDS)] * 50, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    path = root / "base"
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_pairs(path: Path, n: int) -> list[dict[str, str]]:
    rng = random.Random(0)
    pairs = []
    for _ in range(n):
        a = rng.randrange(len(WORDS) - 2)
        right = WORDS[a + 2]
        wrong = rng.choice([w for w in WORDS if w != right])
        pairs.append({"prompt": f"{WORDS[a]} {WORDS[a + 1]}", "chosen": f" {right}", "rejected": f" {wrong}"})
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return pairs


def held_out_accuracy(model_dir: Path, base_dir: Path, pairs_file: Path) -> float:
    """Preference accuracy of a trained policy on the held-out split, against the base as reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from crucible.trainer.config.stages import PreferenceDataset
    from crucible.trainer.preference import DpoObjective, Reference, held_out_pairs
    from crucible.trainer.preference_data import build_preference_data

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    data = build_preference_data(PreferenceDataset(uri=str(pairs_file), validation_fraction=0.2), tokenizer,
                                 SEQ_LEN, 1234)
    reference = Reference(frozen=AutoModelForCausalLM.from_pretrained(base_dir))
    objective = DpoObjective(data, reference, BETA, "sigmoid", 0.0)
    policy = AutoModelForCausalLM.from_pretrained(model_dir)
    return held_out_pairs(objective, policy, data.validation, MICRO_BATCH)["preferenceAccuracy"]


def run_crucible(root: Path, base: Path, pairs_file: Path, steps: int) -> dict[str, Any]:
    from crucible.trainer.preference import main

    out = root / "crucible"
    spec = {
        "model": {"uri": str(base)},
        "dataset": {"uri": str(pairs_file), "validationFraction": 0.2},
        "method": "dpo",
        "dpo": {"beta": BETA, "loss": "sigmoid"},
        "training": {"seqLen": SEQ_LEN, "microBatchSize": MICRO_BATCH, "globalBatchTokens": MICRO_BATCH * SEQ_LEN,
                     "maxSteps": steps, "evalEvery": 0, "evalBatches": 1, "seed": 1234},
        "optimizer": {"lr": LR, "warmupSteps": 0, "schedule": "constant", "weightDecay": 0.0,
                      "beta1": 0.9, "beta2": 0.95, "gradClip": 1.0},
        "checkpoint": {"interval": steps, "keep": 1, "asyncSave": False},
        "lossSpike": {"enabled": False},
        "metrics": {"port": 0},
        "output": {"uri": str(out)},
    }
    (root / "spec.json").write_text(json.dumps(spec))
    started = time.perf_counter()
    rc = main(["--spec", str(root / "spec.json")])
    wall = time.perf_counter() - started
    if rc != 0:
        raise SystemExit(f"crucible preference stage failed with exit {rc}")
    records = [json.loads(line) for line in (out / "checkpoints" / "metrics.jsonl").read_text().splitlines()]
    train_s = sum(r["stepSeconds"] for r in records if "event" not in r)
    return {"train_s": train_s, "wall_s": wall, "model": out}


def run_trl(root: Path, base: Path, pairs_file: Path, steps: int) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from crucible.trainer.config.stages import PreferenceDataset
    from crucible.trainer.sft_data import read_jsonl, split_indices

    records = [r for r, _ in read_jsonl([pairs_file])]
    train_idx, _ = split_indices(len(records), PreferenceDataset(uri="x", validation_fraction=0.2).validation_fraction,
                                 1234)
    train = Dataset.from_list([records[i] for i in train_idx])
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(base)
    policy = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    args = DPOConfig(
        output_dir=str(root / "trl"), per_device_train_batch_size=MICRO_BATCH, max_steps=steps, learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95,
        max_grad_norm=1.0, beta=BETA, loss_type=["sigmoid"], max_length=SEQ_LEN, use_cpu=True, bf16=False,
        report_to=[], save_strategy="no", logging_steps=steps, seed=1234, dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=train, processing_class=tokenizer)
    output = trainer.train()
    trainer.save_model(str(root / "trl" / "model"))
    wall = time.perf_counter() - started
    return {"train_s": float(output.metrics["train_runtime"]), "wall_s": wall, "model": root / "trl" / "model"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--pairs", type=int, default=240)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    base = build_model(root, args.hidden, args.layers)
    pairs_file = root / "pairs.jsonl"
    write_pairs(pairs_file, args.pairs)
    ours = run_crucible(root, base, pairs_file, args.steps)
    peer = run_trl(root, base, pairs_file, args.steps)
    pairs_trained = args.steps * MICRO_BATCH
    rows = []
    for name, res in (("crucible", ours), ("trl", peer)):
        res["pairs_per_s"] = pairs_trained / res["train_s"]
        res["accuracy"] = held_out_accuracy(res["model"], base, pairs_file)
        rows.append((name, res))
    print(f"\nDPO, {args.steps} steps × {MICRO_BATCH} pairs, Llama hidden {args.hidden} × {args.layers} layers, "
          f"CPU, 1 thread, torch {torch.__version__}")
    print(f"{'':10}{'train s':>10}{'wall s':>10}{'pairs/s':>10}{'held-out acc':>14}")
    for name, res in rows:
        print(f"{name:10}{res['train_s']:>10.2f}{res['wall_s']:>10.2f}{res['pairs_per_s']:>10.1f}{res['accuracy']:>14.3f}")
    print(f"ratio crucible/trl: training throughput {ours['pairs_per_s'] / peer['pairs_per_s']:.2f}x, "
          f"wall {peer['wall_s'] / ours['wall_s']:.2f}x (>1 = crucible faster), "
          f"accuracy {ours['accuracy']:.3f} vs {peer['accuracy']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
