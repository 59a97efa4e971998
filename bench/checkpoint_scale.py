"""Sharded checkpoints at scale on CPU: per-rank memory and time of a save and a load, against the
old format's rank-0 gather, in one run.

    .venv/bin/python bench/checkpoint_scale.py [--ranks 4] [--hidden 768 --layers 12 --vocab 32000]

Starts ``--ranks`` gloo processes (torch.distributed.run). Each builds the Llama, shards it with
FSDP2, takes one AdamW step (so the optimizer state exists), then measures, per rank:

* the bytes it writes (its shard of model + Adam state) and its peak RSS during an asynchronous
  sharded save (``Checkpointer.save`` + wait) above the RSS before it — goal ≤ 1.25 × shard + 1 GiB;
* the time the training loop is blocked by the save (staging copy) and the background write time;
* the peak RSS during a load (verify + DCP load into the live model);
* the old format beside it: ``Strategy.full_state`` (every rank gathers, rank 0 keeps the full
  model and optimizer) + ``torch.save`` on rank 0 — its peak RSS and time.

Prints a table and writes ``--json`` (default checkpoint_scale.json). The default shape is ~120M
parameters; ``--hidden 1536 --layers 16`` is about 0.5B (needs ~4 × 9 GB here: run it once).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _rss() -> tuple[int, int]:
    """(current RSS, peak RSS since the last reset) of this process in bytes."""
    cur = peak = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            cur = int(line.split()[1]) * 1024
        elif line.startswith("VmHWM:"):
            peak = int(line.split()[1]) * 1024
    return cur, peak


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def worker(args: argparse.Namespace) -> None:
    import torch

    from crucible.trainer import storage as st
    from crucible.trainer.checkpoint import Checkpointer
    from crucible.trainer.config.training import ModelConfig, OptimizerConfig, TrainingConfig
    from crucible.trainer.distributed import FSDPStrategy, all_gather_object, barrier, init_distributed
    from crucible.trainer.model import build_model

    torch.set_num_threads(1)
    env = init_distributed()
    cfg = ModelConfig(hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                      vocab_size=args.vocab, max_position_embeddings=256)
    model = build_model(cfg, args.vocab, seed=1)
    params = sum(p.numel() for p in model.parameters())
    training = TrainingConfig(max_steps=1, strategy="fsdp", seq_len=16, global_batch_tokens=16 * env.world_size,
                              micro_batch_size=1, precision="fp32")
    strategy = FSDPStrategy(model, env, training, OptimizerConfig())
    ids = torch.randint(0, args.vocab, (1, 16))
    strategy.model(input_ids=ids, labels=ids).loss.backward()
    strategy.optimizer_step(1e-4, 1.0)
    del model
    root = Path(args.dir)
    ckpt = Checkpointer(str(root / "new"), st.Storage(), env, keep=1, async_save=True, config_hash="bench",
                        log=lambda m: None)
    out: dict[str, Any] = {"rank": env.rank, "params": params}

    barrier()
    before, _ = _rss()
    _reset_peak()
    started = time.perf_counter()
    ckpt.save(1, {"step": 1, "tokens": 0, "data": {}}, strategy)
    out["blocked_s"] = time.perf_counter() - started
    ckpt.wait()
    out["save_total_s"] = time.perf_counter() - started
    out["background_write_s"] = ckpt.last_write_s
    out["shard_bytes"] = ckpt.last_bytes_written
    out["save_peak_above_rss"] = _rss()[1] - before
    out["rss_before_save"] = before

    barrier()
    before, _ = _rss()
    _reset_peak()
    started = time.perf_counter()
    found = ckpt.latest_valid(strategy)
    assert found is not None
    ckpt.load(found[0], found[1], strategy, seed=1)
    out["load_s"] = time.perf_counter() - started
    out["load_peak_above_rss"] = _rss()[1] - before

    barrier()
    before, _ = _rss()
    _reset_peak()
    started = time.perf_counter()
    full = strategy.full_state(with_optimizer=True)  # the old format: a gather to rank 0
    if env.is_main:
        assert full is not None
        torch.save(full["model"], root / "old-model.pt")
        torch.save(full["optimizer"], root / "old-optimizer.pt")
    del full
    out["old_gather_s"] = time.perf_counter() - started
    out["old_gather_peak_above_rss"] = _rss()[1] - before
    ckpt.close()
    rows = all_gather_object(out)
    if env.is_main:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--json", default="checkpoint_scale.json")
    parser.add_argument("--dir", default=None, help="where the checkpoints go (default: a temporary folder)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-") as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.ranks}",
               "--master-addr=127.0.0.1", f"--master-port={_free_port()}", __file__, "--worker",
               f"--hidden={args.hidden}", f"--layers={args.layers}", f"--heads={args.heads}",
               f"--vocab={args.vocab}", f"--json={os.path.abspath(args.json)}", f"--dir={args.dir or tmp}"]
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(REPO / "trainer"), str(REPO / "operator"),
                                              os.environ.get("PYTHONPATH", "")])}
        rc = subprocess.call(cmd, env=env)
        if rc:
            return rc
    rows = json.loads(Path(args.json).read_text())
    gib = 1024**3
    print(f"Llama {rows[0]['params'] / 1e6:.0f}M parameters, AdamW, FSDP2 over {len(rows)} CPU ranks (gloo)")
    print(f"{'rank':>4} {'shard GiB':>9} {'save peak+':>10} {'goal':>6} {'load peak+':>10} {'blocked s':>9} "
          f"{'write s':>8} {'load s':>7} {'old gather peak+':>16} {'old s':>6}")
    for r in rows:
        goal = 1.25 * r["shard_bytes"] / gib + 1
        print(f"{r['rank']:>4} {r['shard_bytes'] / gib:9.3f} {r['save_peak_above_rss'] / gib:10.3f} {goal:6.2f} "
              f"{r['load_peak_above_rss'] / gib:10.3f} {r['blocked_s']:9.3f} {r['background_write_s']:8.2f} "
              f"{r['load_s']:7.2f} {r['old_gather_peak_above_rss'] / gib:16.3f} {r['old_gather_s']:6.2f}")
    worst_save = max(r["save_peak_above_rss"] for r in rows) / gib
    old = rows[0]["old_gather_peak_above_rss"] / gib
    blocked = max(r["blocked_s"] for r in rows)
    write = max(r["background_write_s"] for r in rows)
    print(f"peak extra memory per rank during a save: sharded {worst_save:.3f} GiB vs rank-0 gather {old:.3f} GiB "
          f"({old / max(worst_save, 1e-9):.1f}x); blocked {blocked:.3f} s of a {write + blocked:.2f} s save "
          f"({blocked / max(write + blocked, 1e-9):.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
