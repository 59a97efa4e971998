"""SFT: Crucible's FinetuneRun against TRL's SFTTrainer on the same work, in one run.

    .venv/bin/python bench/posttrain_sft.py [--steps 40] [--records 400] [--hidden 128] [--layers 4] [--method full|lora]

Both fine-tune the same freshly initialised Llama (fp32, CPU, one thread) on the same
prompt/response records for the same number of optimizer steps of 8 examples, with the same
optimizer settings (AdamW lr 1e-3 (full) / 3e-3 (LoRA r 16), betas 0.9/0.95, no weight decay,
constant schedule, clip 1.0), prompt tokens masked (TRL: ``completion_only_loss``), no packing
on either side, and the same text: prompt, then response, then EOS (Crucible gets the
equivalent ``chatTemplate``; TRL's prompt-completion format is that concatenation).

Prints for each: training seconds (the optimizer steps only: Crucible's summed step times from
metrics.jsonl, TRL's ``train_runtime``), wall seconds of the whole job, examples per training
second, and the held-out loss of the result on the same held-out records scored by the same
code (``crucible.trainer.finetune.held_out_loss``) — then the ratios.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from posttrain_dpo import WORDS, build_model  # the same tiny model and tokenizer builder

MICRO_BATCH = 8
SEQ_LEN = 64
# prompt + response + EOS, nothing else: the text TRL's prompt-completion format trains on.
CONCAT_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
)


def write_records(path: Path, n: int) -> None:
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        a = rng.randrange(len(WORDS) - 3)
        rows.append({"prompt": f"{WORDS[a]} {WORDS[a + 1]}", "response": f" {WORDS[a + 2]} {WORDS[a + 3]}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def held_out(model_dir: Path, records: Path, base: Path) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from crucible.trainer.config.stages import SftDataset
    from crucible.trainer.finetune import held_out_loss
    from crucible.trainer.sft_data import build_sft_data

    tokenizer = AutoTokenizer.from_pretrained(base)
    data = build_sft_data(SftDataset(uri=str(records), validation_fraction=0.2), tokenizer, SEQ_LEN, False, 1234,
                          CONCAT_TEMPLATE)
    loss = held_out_loss(AutoModelForCausalLM.from_pretrained(model_dir), data.validation, MICRO_BATCH)
    assert loss is not None
    return loss


def run_crucible(root: Path, base: Path, records: Path, steps: int, method: str, lr: float) -> dict[str, Any]:
    from crucible.trainer.finetune import main

    out = root / "crucible"
    spec: dict[str, Any] = {
        "model": {"uri": str(base)},
        "dataset": {"uri": str(records), "validationFraction": 0.2},
        "method": method,
        "packing": False,
        "chatTemplate": CONCAT_TEMPLATE,
        "training": {"seqLen": SEQ_LEN, "microBatchSize": MICRO_BATCH, "globalBatchTokens": MICRO_BATCH * SEQ_LEN,
                     "maxSteps": steps, "evalEvery": 0, "evalBatches": 1, "seed": 1234},
        "optimizer": {"lr": lr, "warmupSteps": 0, "schedule": "constant", "weightDecay": 0.0,
                      "beta1": 0.9, "beta2": 0.95, "gradClip": 1.0},
        "checkpoint": {"interval": steps, "keep": 1, "asyncSave": False},
        "lossSpike": {"enabled": False},
        "metrics": {"port": 0},
        "output": {"uri": str(out)},
    }
    if method == "lora":
        spec["lora"] = {"r": 16, "alpha": 32}
    (root / "spec.json").write_text(json.dumps(spec))
    started = time.perf_counter()
    if main(["--spec", str(root / "spec.json")]) != 0:
        raise SystemExit("crucible finetune stage failed")
    wall = time.perf_counter() - started
    steps_log = [json.loads(x) for x in (out / "checkpoints" / "metrics.jsonl").read_text().splitlines()]
    return {"train_s": sum(r["stepSeconds"] for r in steps_log if "event" not in r), "wall_s": wall, "model": out}


def run_trl(root: Path, base: Path, records: Path, steps: int, method: str, lr: float) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from crucible.trainer.sft_data import read_jsonl, split_indices

    rows = [r for r, _ in read_jsonl([records])]
    train_idx, _ = split_indices(len(rows), 0.2, 1234)
    train = Dataset.from_list([{"prompt": rows[i]["prompt"], "completion": rows[i]["response"]} for i in train_idx])
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_config = None
    if method == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"])
    args = SFTConfig(
        output_dir=str(root / "trl"), per_device_train_batch_size=MICRO_BATCH, max_steps=steps, learning_rate=lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95,
        max_grad_norm=1.0, max_length=SEQ_LEN, packing=False, completion_only_loss=True, use_cpu=True, bf16=False,
        report_to=[], save_strategy="no", logging_steps=steps, seed=1234, dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                         peft_config=peft_config)
    output = trainer.train()
    trained: Any = trainer.model
    final = trained.merge_and_unload() if method == "lora" else trained
    final.save_pretrained(str(root / "trl" / "model"))
    wall = time.perf_counter() - started
    return {"train_s": float(output.metrics["train_runtime"]), "wall_s": wall, "model": root / "trl" / "model"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--records", type=int, default=400)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--method", choices=["full", "lora"], default="lora")
    args = parser.parse_args()
    torch.set_num_threads(1)
    lr = 3e-3 if args.method == "lora" else 1e-3
    root = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    base = build_model(root, args.hidden, args.layers)
    records = root / "records.jsonl"
    write_records(records, args.records)
    results = {"crucible": run_crucible(root, base, records, args.steps, args.method, lr),
               "trl": run_trl(root, base, records, args.steps, args.method, lr)}
    base_loss = held_out(base, records, base)
    for res in results.values():
        res["per_s"] = args.steps * MICRO_BATCH / res["train_s"]
        res["loss"] = held_out(res["model"], records, base)
    print(f"\nSFT ({args.method}), {args.steps} steps × {MICRO_BATCH} examples, Llama hidden {args.hidden} × "
          f"{args.layers} layers, CPU, 1 thread, torch {torch.__version__}; held-out loss of the base {base_loss:.3f}")
    print(f"{'':10}{'train s':>10}{'wall s':>10}{'examples/s':>12}{'held-out loss':>15}")
    for name, res in results.items():
        print(f"{name:10}{res['train_s']:>10.2f}{res['wall_s']:>10.2f}{res['per_s']:>12.1f}{res['loss']:>15.3f}")
    ours, peer = results["crucible"], results["trl"]
    print(f"ratio crucible/trl: training throughput {ours['per_s'] / peer['per_s']:.2f}x, "
          f"wall {peer['wall_s'] / ours['wall_s']:.2f}x (>1 = crucible faster), "
          f"held-out loss {ours['loss']:.3f} vs {peer['loss']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
