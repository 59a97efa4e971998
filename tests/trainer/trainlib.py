"""Helpers of the trainer-engine tests: tiny token shards, tiny specs, launching the stage."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from crucible.trainer.data.shards import ShardWriter

# The worker scripts beside this file run under torchrun with only this folder on sys.path;
# tests/waits.py (the suite's one time factor) must import there as it does under pytest.
if str(Path(__file__).resolve().parent.parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent.parent))
from waits import scaled

VOCAB = 128



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_shards(root: Path, documents: int = 400, seed: int = 0, vocab: int = VOCAB) -> Path:
    """A DataPipeline-shaped output: train/ and validation/ splits of random documents."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", documents), ("validation", max(documents // 8, 8))):
        writer = ShardWriter(root / split, vocab_size=vocab, eos_id=0, tokens_per_shard=4000)
        for _ in range(n):
            length = int(rng.integers(20, 120))
            # a learnable pattern: runs of increasing ids mod vocab, random start
            start = int(rng.integers(1, vocab))
            writer.add_document([(start + i) % (vocab - 1) + 1 for i in range(length)])
        writer.close()
    write_tokenizer(root / "tokenizer", vocab)
    manifest = {"stage": "data", "tokens": 0}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def write_tokenizer(directory: Path, vocab: int = VOCAB) -> None:
    """A word-level tokenizer over the ids of the generated data ("<eos>", "w1" ... "wN")."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<eos>": 0, **{f"w{i}": i for i in range(1, vocab)}}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    fast.save_pretrained(directory)


def tiny_spec(data_dir: Path, out: Path, **overrides: Any) -> dict[str, Any]:
    """A PretrainRun spec (camelCase) for a tiny Llama that trains in seconds on CPU."""
    spec: dict[str, Any] = {
        "model": {"hiddenSize": 32, "numLayers": 2, "numHeads": 4, "intermediateSize": 64,
                  "vocabSize": VOCAB, "maxPositionEmbeddings": 64},
        "data": {"uri": str(data_dir)},
        "training": {"seqLen": 32, "globalBatchTokens": 256, "microBatchSize": 4, "maxSteps": 12,
                     "evalEvery": 0, "evalBatches": 2, "seed": 7},
        "optimizer": {"lr": 3e-3, "warmupSteps": 2},
        "checkpoint": {"uri": str(out / "checkpoints"), "interval": 4, "keep": 2, "asyncSave": False},
        "metrics": {"port": 0, "logEvery": 1},
        "output": {"uri": str(out / "model")},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    if "source" in spec["model"]:  # the source model's config.json decides the shape
        for shape in ("hiddenSize", "numLayers", "numHeads", "intermediateSize", "vocabSize", "maxPositionEmbeddings"):
            if shape not in overrides.get("model", {}):
                spec["model"].pop(shape, None)
    return spec


REPO = Path(__file__).resolve().parents[2]
PYTHON = str(REPO / ".venv" / "bin" / "python")


def trainer_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "CRUCIBLE_METRICS_PORT": "0"})
    env.update(extra)
    return env


def launch(spec: dict[str, Any], workdir: Path, nproc: int = 1, **env: str) -> subprocess.Popen[str]:
    """Start ``python -m crucible.trainer pretrain`` under torchrun (nproc > 1) or plainly."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    stage = ["-m", "crucible.trainer", "pretrain", "--spec", str(spec_path)]
    if nproc > 1:
        cmd = [PYTHON, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
               f"--master-port={free_port()}", "--monitor-interval=0.2", *stage]
    else:
        cmd = [PYTHON, *stage]
    log = open(workdir / f"log-{time.monotonic_ns()}.txt", "w")  # noqa: SIM115
    return subprocess.Popen(cmd, cwd=REPO, env=trainer_env(**env), stdout=log, stderr=subprocess.STDOUT, text=True)


def run_stage(spec: dict[str, Any], workdir: Path, nproc: int = 1, timeout: float = 300, **env: str) -> tuple[int, str]:
    proc = launch(spec, workdir, nproc, **env)
    try:
        rc = proc.wait(timeout=scaled(timeout))
    finally:
        if proc.poll() is None:
            proc.kill()
    logs = sorted(workdir.glob("log-*.txt"))
    return rc, logs[-1].read_text() if logs else ""


def step_losses(checkpoint_dir: Path) -> dict[int, float]:
    """The last loss recorded for each step in metrics.jsonl (a resumed run re-records replayed steps)."""
    out: dict[int, float] = {}
    path = checkpoint_dir / "metrics.jsonl"
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line torn by SIGKILL
            continue
        if "event" not in rec:
            out[int(rec["step"])] = rec["loss"]
    return out


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (the workers torchrun started)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def make_engine(data: Path, out: Path, objective: Any = None, **overrides: Any) -> Any:
    """An in-process Engine (one rank, gloo) over the tiny spec; the objective defaults to pretraining."""
    from crucible.trainer.config import parse_stage_spec
    from crucible.trainer.data.shards import ShardSet
    from crucible.trainer.distributed import init_distributed
    from crucible.trainer.engine import Engine
    from crucible.trainer.model import build_model
    from crucible.trainer.pretrain import PretrainObjective

    config = parse_stage_spec("pretrain", tiny_spec(data, out, **overrides))
    env = init_distributed()
    train = ShardSet(data / "train")
    model = build_model(config.model, train.vocab_size, config.training.seed)  # type: ignore[attr-defined]
    objective = objective or PretrainObjective(train, ShardSet(data / "validation"))
    return Engine(config, model, objective, None, env, log=lambda msg: LOG.append(msg))  # type: ignore[arg-type]


LOG: list[str] = []


def run_worker_on_four_ranks(worker: Path, shards: Path, out: Path, cases: Any, timeout: float) -> None:
    """``worker SHARDS OUT CASES_JSON`` under torchrun with 4 gloo ranks on loopback; asserts it exits 0."""
    cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc-per-node=4", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(worker), str(shards), str(out), json.dumps(cases)]
    env = trainer_env(PYTHONPATH=os.pathsep.join([str(worker.parent), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=scaled(timeout))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
