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
    from crucible.trainer.model import build_meta_model

    torch.set_num_threads(1)
    env = init_distributed()
    cfg = ModelConfig(hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                      vocab_size=args.vocab, max_position_embeddings=256)
    training = TrainingConfig(max_steps=1, strategy="fsdp", seq_len=16, global_batch_tokens=16 * env.world_size,
                              micro_batch_size=1, precision="fp32")
    model = build_meta_model(cfg, args.vocab, seed=1)  # on meta, sharded, then each rank fills its shards
    params = sum(p.numel() for p in model.parameters())
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
    out.update(_export(args, env, strategy, root))
    rows = all_gather_object(out)
    if env.is_main:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def _export(args: argparse.Namespace, env: Any, strategy: Any, root: Path) -> dict[str, Any]:
    """The streamed export against the whole-state export (gather + save_pretrained on rank 0)."""
    from crucible.trainer.distributed import barrier
    from crucible.trainer.output import save_hf_model, write_hf_model

    out: dict[str, Any] = {}
    barrier()
    before, _ = _rss()
    _reset_peak()
    started = time.perf_counter()
    specs, items = strategy.export_stream()
    stats = write_hf_model(strategy.module, specs, items, root / "export" if env.is_main else None, None,
                           shard_bytes=args.export_shard_mib * 2**20)
    barrier()
    out.update(export_s=time.perf_counter() - started, export_peak_above_rss=_rss()[1] - before,
               export_files=stats["files"], export_bytes=stats["bytes"])
    barrier()
    before, _ = _rss()
    _reset_peak()
    started = time.perf_counter()
    state = strategy.export_state()
    if env.is_main:
        assert state is not None
        save_hf_model(strategy.module, state, root / "old-export", None)
    del state
    barrier()
    out.update(old_export_s=time.perf_counter() - started, old_export_peak_above_rss=_rss()[1] - before)
    return out


def measure(args: argparse.Namespace) -> None:
    """One model build or source load in a fresh process per rank (imports warmed first), its peak RSS."""
    import torch

    from crucible.trainer.config.training import ModelConfig, OptimizerConfig, TrainingConfig
    from crucible.trainer.distributed import FSDPStrategy, all_gather_object, barrier, init_distributed
    from crucible.trainer.meta_init import pending_init
    from crucible.trainer.model import build_meta_model, build_model, source_meta_model

    torch.set_num_threads(1)
    env = init_distributed()
    training = TrainingConfig(max_steps=1, strategy="fsdp", seq_len=16, global_batch_tokens=16 * env.world_size,
                              micro_batch_size=1, precision="fp32")
    tiny = ModelConfig(hidden_size=64, num_layers=1, num_heads=4, vocab_size=128, max_position_embeddings=64)
    FSDPStrategy(build_meta_model(tiny, 128, seed=1), env, training, OptimizerConfig())  # imports, warmed
    FSDPStrategy(build_model(tiny, 128, seed=1), env, training, OptimizerConfig())
    cfg = ModelConfig(hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                      vocab_size=args.vocab, max_position_embeddings=256)
    export = Path(args.dir) / "export"
    barrier()
    before, _ = _rss()
    _reset_peak()
    started = time.perf_counter()
    row: dict[str, Any] = {"rank": env.rank}
    if args.measure == "build-new":  # on meta, sharded, each rank fills its own shards
        model = build_meta_model(cfg, args.vocab, seed=1)
    elif args.measure == "build-old":  # the whole model on every rank, then sharded
        model = build_model(cfg, args.vocab, seed=1)
    elif args.measure == "source-new":  # each rank reads its safetensors slices
        model = source_meta_model(export, str(export))
        reader = pending_init(model)
    else:  # from_pretrained of the whole model on every rank, then sharded
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    strategy = FSDPStrategy(model, env, training, OptimizerConfig())
    row.update(seconds=time.perf_counter() - started, peak_above_rss=_rss()[1] - before)
    if args.measure == "source-new":
        row.update(bytes_read=reader.bytes_read, bytes=reader.bytes_total)  # type: ignore[union-attr]
    del strategy, model
    rows = all_gather_object(row)
    if env.is_main:
        Path(args.json).write_text(json.dumps(rows))


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
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args)
        return 0
    if args.worker:
        worker(args)
        return 0
    measured: dict[str, Any] = {}
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
        for what in ("build-new", "build-old", "source-new", "source-old"):  # each in fresh processes
            part = f"{os.path.abspath(args.json)}.{what}"
            fresh = [f"--master-port={_free_port()}" if c.startswith("--master-port") else c
                     for c in cmd if not c.startswith("--json") and c != "--worker"]
            rc = subprocess.call([*fresh, f"--measure={what}", f"--json={part}"], env=env)
            if rc:
                return rc
            measured[what] = json.loads(Path(part).read_text())
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
    m = {k: {r["rank"]: r for r in v} for k, v in measured.items()}
    for r in rows:
        k = r["rank"]
        print(f"{k:>4} {m['build-new'][k]['peak_above_rss'] / gib:11.3f} {m['build-old'][k]['peak_above_rss'] / gib:10.3f} "
              f"{r['export_peak_above_rss'] / gib:12.3f} {r['old_export_peak_above_rss'] / gib:11.3f} "
              f"{m['source-new'][k]['bytes_read'] / gib:15.3f} {m['source-new'][k]['peak_above_rss'] / gib:12.3f} "
              f"{m['source-old'][k]['peak_above_rss'] / gib:11.3f}")
    r0 = rows[0]
    source = m["source-new"][0]["bytes"]
    print(f"export: {r0['export_files']} safetensors files, {r0['export_bytes'] / gib:.3f} GiB in {r0['export_s']:.1f} s "
          f"(whole-state export {r0['old_export_s']:.1f} s); source: {source / gib:.3f} GiB, each rank read "
          f"{max(v['bytes_read'] for v in m['source-new'].values()) / max(source, 1):.1%} at most; build "
          f"{m['build-new'][0]['seconds']:.1f} s on meta vs {m['build-old'][0]['seconds']:.1f} s whole")
    Path(args.json).write_text(json.dumps({"ranks": rows, **measured}, indent=1))
    print(f"peak extra memory per rank during a save: sharded {worst_save:.3f} GiB vs rank-0 gather {old:.3f} GiB "
          f"({old / max(worst_save, 1e-9):.1f}x); blocked {blocked:.3f} s of a {write + blocked:.2f} s save "
          f"({blocked / max(write + blocked, 1e-9):.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
