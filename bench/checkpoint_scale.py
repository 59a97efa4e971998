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
  model and optimizer) + ``torch.save`` on rank 0 — its peak RSS and time;
* model build, per rank: peak RSS of building on meta + FSDP2 + filling the shards
  (``build_meta_model``) against building the whole model on CPU and then sharding it (``build_model``);
* the Hugging Face export: the streamed, shard-wise export (one tensor gathered at a time, safetensors
  files planned from the shapes) against the whole-state gather + ``save_pretrained`` on rank 0;
* loading that export back as a ``model.source``: each rank reads only its safetensors slices
  (bytes read per rank, peak RSS) against ``from_pretrained`` of the whole model on every rank.

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
    from crucible.trainer.model import build_meta_model, build_model

    torch.set_num_threads(1)
    env = init_distributed()
    cfg = ModelConfig(hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                      vocab_size=args.vocab, max_position_embeddings=256)
    training = TrainingConfig(max_steps=1, strategy="fsdp", seq_len=16, global_batch_tokens=16 * env.world_size,
                              micro_batch_size=1, precision="fp32")
    barrier()
    before, _ = _rss()
    _reset_peak()
    started = time.perf_counter()
    model = build_meta_model(cfg, args.vocab, seed=1)  # on meta, sharded, then each rank fills its shards
    params = sum(p.numel() for p in model.parameters())
    strategy = FSDPStrategy(model, env, training, OptimizerConfig())
    build_new = {"build_s": time.perf_counter() - started, "build_peak_above_rss": _rss()[1] - before}
    ids = torch.randint(0, args.vocab, (1, 16))
    strategy.model(input_ids=ids, labels=ids).loss.backward()
    strategy.optimizer_step(1e-4, 1.0)
    del model
    root = Path(args.dir)
    ckpt = Checkpointer(str(root / "new"), st.Storage(), env, keep=1, async_save=True, config_hash="bench",
                        log=lambda m: None)
    out: dict[str, Any] = {"rank": env.rank, "params": params, **build_new}

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
    out.update(_export_and_source(args, env, strategy, training, root))
    del strategy

    barrier()
    before, _ = _rss()
    _reset_peak()
    started = time.perf_counter()
    old_model = build_model(cfg, args.vocab, seed=1)  # the old build: the whole model on every rank first
    old_strategy = FSDPStrategy(old_model, env, training, OptimizerConfig())
    out["old_build_s"] = time.perf_counter() - started
    out["old_build_peak_above_rss"] = _rss()[1] - before
    del old_strategy, old_model
    rows = all_gather_object(out)
    if env.is_main:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def _export_and_source(args: argparse.Namespace, env: Any, strategy: Any, training: Any, root: Path) -> dict[str, Any]:
    """Streamed export vs the whole-state export; the export read back by slices vs from_pretrained."""
    from crucible.trainer.config.training import OptimizerConfig
    from crucible.trainer.distributed import FSDPStrategy, all_gather_object, barrier
    from crucible.trainer.meta_init import pending_init
    from crucible.trainer.model import source_meta_model
    from crucible.trainer.output import save_hf_model, write_hf_model

    out: dict[str, Any] = {}
    export = root / "export"
    barrier()
    before, _ = _rss()
    _reset_peak()
    started = time.perf_counter()
    specs, items = strategy.export_stream()
    stats = write_hf_model(strategy.module, specs, items, export if env.is_main else None, None,
                           shard_bytes=args.export_shard_mib * 2**20)
    barrier()
    out.update(export_s=time.perf_counter() - started, export_peak_above_rss=_rss()[1] - before,
               export_files=stats["files"], export_bytes=stats["bytes"])

    barrier()
    before, _ = _rss()
    _reset_peak()
    started = time.perf_counter()
    state = strategy.export_state()  # the old export: the whole state on rank 0, then save_pretrained
    if env.is_main:
        assert state is not None
        save_hf_model(strategy.module, state, root / "old-export", None)
    del state
    barrier()
    out.update(old_export_s=time.perf_counter() - started, old_export_peak_above_rss=_rss()[1] - before)

    barrier()
    before, _ = _rss()
    _reset_peak()
    started = time.perf_counter()
    meta = source_meta_model(export, str(export))
    assert meta is not None
    reader = pending_init(meta)
    loaded = FSDPStrategy(meta, env, training, OptimizerConfig())
    out.update(source_s=time.perf_counter() - started, source_peak_above_rss=_rss()[1] - before,
               source_bytes_read=reader.bytes_read, source_bytes=reader.bytes_total)  # type: ignore[union-attr]
    del loaded, meta

    barrier()
    before, _ = _rss()
    _reset_peak()
    started = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM

    whole = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)  # the old load: all of it, every rank
    old_loaded = FSDPStrategy(whole, env, training, OptimizerConfig())
    out.update(old_source_s=time.perf_counter() - started, old_source_peak_above_rss=_rss()[1] - before)
    del old_loaded, whole
    all_gather_object(None)
    return out


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
    parser.add_argument("--export-shard-mib", type=int, default=128, help="largest safetensors file of the export")
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
               f"--vocab={args.vocab}", f"--export-shard-mib={args.export_shard_mib}", f"--json={os.path.abspath(args.json)}", f"--dir={args.dir or tmp}"]
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
    print(f"{'rank':>4} {'build peak+':>11} {'old build+':>10} {'export peak+':>12} {'old export+':>11} "
          f"{'source read GiB':>15} {'source peak+':>12} {'old source+':>11}")
    for r in rows:
        print(f"{r['rank']:>4} {r['build_peak_above_rss'] / gib:11.3f} {r['old_build_peak_above_rss'] / gib:10.3f} "
              f"{r['export_peak_above_rss'] / gib:12.3f} {r['old_export_peak_above_rss'] / gib:11.3f} "
              f"{r['source_bytes_read'] / gib:15.3f} {r['source_peak_above_rss'] / gib:12.3f} "
              f"{r['old_source_peak_above_rss'] / gib:11.3f}")
    r0 = rows[0]
    print(f"export: {r0['export_files']} safetensors files, {r0['export_bytes'] / gib:.3f} GiB in {r0['export_s']:.1f} s "
          f"(whole-state export {r0['old_export_s']:.1f} s); source: {r0['source_bytes'] / gib:.3f} GiB, each rank read "
          f"{max(r['source_bytes_read'] for r in rows) / max(r0['source_bytes'], 1):.1%} at most")
    print(f"peak extra memory per rank during a save: sharded {worst_save:.3f} GiB vs rank-0 gather {old:.3f} GiB "
          f"({old / max(worst_save, 1e-9):.1f}x); blocked {blocked:.3f} s of a {write + blocked:.2f} s save "
          f"({blocked / max(write + blocked, 1e-9):.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
