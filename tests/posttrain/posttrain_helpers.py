"""Builders shared by the post-training tests (a uniquely named module: conftest names collide across areas)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from waits import scaled

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "user assistant question answer what is the colour of the sky blue green red",
    "one two three four five six seven eight nine ten",
    "good bad yes no cat dog bird fish apple banana cherry",
]


def build_tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def build_tiny_model(path: Path, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


TRAIN_TEXT = " ".join(CORPUS)




def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(json.dumps(spec))
    return path


WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def counting_records(n: int, seed: int = 0) -> list[dict]:
    """{prompt: "four five", response: " six"}: a rule a tiny model learns in a few dozen steps."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a = rng.randrange(len(WORDS) - 2)
        out.append({"prompt": f"{WORDS[a]} {WORDS[a + 1]}", "response": f" {WORDS[a + 2]}"})
    return out


def write_records(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def merge(spec: dict, overrides: dict) -> dict:
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        elif value is None:
            spec.pop(key, None)
        else:
            spec[key] = value
    return spec


def sft_spec(base: Path, data_file: Path, out_dir: Path, /, **overrides) -> dict:
    spec = {
        "model": {"uri": str(base)},
        "dataset": {"uri": str(data_file), "validationFraction": 0.2},
        "method": "lora",
        "lora": {"r": 8, "alpha": 16},
        "training": {"seqLen": 64, "microBatchSize": 4, "globalBatchTokens": 256, "maxSteps": 30,
                     "evalEvery": 0, "evalBatches": 4},
        "optimizer": {"lr": 3e-3, "warmupSteps": 0, "schedule": "constant", "weightDecay": 0.0},
        "metrics": {"port": 0},
        "output": {"uri": str(out_dir)},
    }
    return merge(spec, overrides)


REPO = Path(__file__).resolve().parents[2]
PYTHON = str(REPO / ".venv" / "bin" / "python")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(stage: str, spec: dict, workdir: Path, nproc: int = 1):
    """``python -m crucible.trainer STAGE --spec FILE`` as a subprocess (under torchrun when nproc > 1),
    its output in workdir/log.txt."""
    import os
    import subprocess

    workdir.mkdir(parents=True, exist_ok=True)
    spec_path = write_spec(workdir / "spec.json", spec)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "CRUCIBLE_METRICS_PORT": "0"})
    log = open(workdir / "log.txt", "a")  # noqa: SIM115
    command = ["-m", "crucible.trainer", stage, "--spec", str(spec_path)]
    if nproc > 1:
        command = ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
                   f"--master-port={free_port()}", "--monitor-interval=0.2", *command]
    return subprocess.Popen([PYTHON, *command], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def step_losses(checkpoint_dir: Path) -> dict[int, float]:
    """The last loss recorded per step in metrics.jsonl (a resumed run re-records replayed steps)."""
    out: dict[int, float] = {}
    path = checkpoint_dir / "metrics.jsonl"
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line torn by SIGKILL
            continue
        if "event" not in record:
            out[int(record["step"])] = record["loss"]
    return out


def kill_at_step(proc, checkpoint_dir: Path, step: int, timeout: float = 240, committed: int | None = None) -> None:
    """SIGKILL the stage once metrics.jsonl shows ``step`` (and, with ``committed``, once the
    checkpoint of that step has its manifest: an asynchronous save may still be writing when a
    busy machine reaches ``step``)."""
    import signal
    import time

    def saved() -> bool:
        return committed is None or any(
            (d / "manifest.json").exists() and int(d.name.removeprefix("step-")) >= committed
            for d in checkpoint_dir.glob("step-*"))

    deadline = time.monotonic() + scaled(timeout)
    while time.monotonic() < deadline:
        if max(step_losses(checkpoint_dir), default=0) >= step and saved():
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=scaled(60))
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before step {step}")
        time.sleep(0.01)
    raise AssertionError(f"step {step} never reached")


def preference_records(n: int, seed: int = 0) -> list[dict]:
    """Separable pairs: the chosen response continues the count, the rejected one is a wrong number."""
    import random

    rng = random.Random(seed)
    out = []
    for record in counting_records(n, seed):
        right = record["response"].strip()
        wrong = rng.choice([w for w in WORDS if w != right])
        out.append({"prompt": record["prompt"], "chosen": f" {right}", "rejected": f" {wrong}"})
    return out


def preference_spec(base: Path, data_file: Path, out_dir: Path, /, **overrides) -> dict:
    spec = {
        "model": {"uri": str(base)},
        "dataset": {"uri": str(data_file), "validationFraction": 0.25},
        "method": "dpo",
        "dpo": {"beta": 0.5},
        "training": {"seqLen": 32, "microBatchSize": 8, "globalBatchTokens": 256, "maxSteps": 25,
                     "evalEvery": 0, "evalBatches": 2},
        "optimizer": {"lr": 3e-3, "warmupSteps": 0, "schedule": "constant", "weightDecay": 0.0},
        "metrics": {"port": 0},
        "output": {"uri": str(out_dir)},
    }
    spec = merge(spec, overrides)
    if spec.get("method", "dpo") != "dpo" and "dpo" not in overrides:
        spec.pop("dpo")  # dpo settings on another method are rejected
    return spec
