"""Dedup scaling: per-worker peak memory and CPU per document at 1M, 4M, 16M documents.

    .venv/bin/python bench/data_scale.py [--docs 1000000,4000000,16000000] [--workers 1,4,16]
                                         [--bands 14] [--dup 0.2] [--exact 0.05] [--dir /tmp/x]

Runs the DataPipeline's own dedup code (``crucible.trainer.data.dedup``) on generated band keys:
MinHash signatures are replaced by keys generated per document (a fraction ``--dup`` of the
documents are near copies of one of the million documents before them and share a random half
of its bands, a fraction ``--exact`` are exact copies; copies of copies make chains), because computing real signatures for 16M documents
would take hours on this machine and is the filter stage's cost, already measured by
bench/data_throughput.py. Every worker of every phase runs in its own process, one after another
(this machine has 2 cores), and reports its own peak RSS and CPU seconds:

- ``runs``: filter worker p writes its documents' band keys as sorted runs per bucket
  (BucketRunWriter; spills every 131072 documents, merges at the end);
- ``links``: dedup worker q merges bucket q of every part, links it (link_bucket) and sends
  its forests' edges to the partitions owning them (route_links: round 0);
- ``cluster``: the rounds of the partitioned connected components (cluster_round: small-star,
  large-star, ... until the large-star input is a star forest everywhere); partition j of
  round r is worker j's share. One child process per round runs the partitions one after
  another and resets its peak RSS between them (``/proc/self/clear_refs``; with
  ``--cluster-processes`` every partition of every round gets its own process instead);
- ``readback``: tokenize worker p reads its drop decisions and looks up all its documents.

Goals (issue 16): per-worker peak RSS within +-25% when documents per worker is constant
(1M/1, 4M/4, 16M/16), CPU seconds per document within +-25% across sizes.
Kept set check: with --verify (small sizes), the result equals the in-memory clustering.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

from crucible.trainer.data.dedup import (
    DECISIONS,
    DONE,
    LARGE_STAR,
    BucketRunWriter,
    DropDecisions,
    LocalFiles,
    Owners,
    link_bucket,
    round_dir,
    round_kind,
    route_links,
    run_round,
)
from crucible.trainer.data.minhash import mix64

BATCH = 8192  # documents generated and added at a time
READ_BATCH = 2048  # documents looked up at a time (as the tokenize stage does)
WINDOW = 1_000_000
RECORDS_PER_FILE = 100_000


def doc_keys(g: np.ndarray) -> np.ndarray:
    return ((g // RECORDS_PER_FILE) << np.uint64(32)) | (g % RECORDS_PER_FILE)


def generate(start: int, stop: int, bands: int, dup: float, exact: float, seed: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Documents [start, stop): doc keys, band keys, has-signature, exact hashes (a pure function of g)."""
    g = np.arange(start, stop, dtype=np.uint64)
    with np.errstate(over="ignore"):
        r = mix64(g * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed))
        u = (r >> np.uint64(11)).astype(np.float64) / 2.0**53
        # the original is one of the WINDOW documents before (all of them near the start), so the
        # duplicate rate is the same at every size
        back = (mix64(r) % np.maximum(np.minimum(g, np.uint64(WINDOW)), np.uint64(1))) + np.uint64(1)
        src = np.where((u < dup) & (g >= back), g - back, g)  # the near copy's original
        exact_src = np.where((u >= dup) & (u < dup + exact) & (g >= back), g - back, g)
        b = np.arange(bands, dtype=np.uint64)
        share = ((mix64(r ^ np.uint64(0x5851F42D4C957F2D))[:, None] >> b[None, :]) & np.uint64(1)).astype(bool)
        owner = np.where(share, src[:, None], g[:, None])  # (n, bands)
        keys = mix64(owner * np.uint64(bands) + b[None, :] + np.uint64(seed << 20))
        hashes = np.stack([mix64(exact_src + np.uint64(7)), mix64(exact_src + np.uint64(13))], axis=1)
    return doc_keys(g), keys, np.ones(len(g), bool), hashes


def part_range(docs: int, workers: int, p: int) -> tuple[int, int]:
    return p * docs // workers, (p + 1) * docs // workers


# -- one phase of one worker, in a child process -------------------------------------------------


def child(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(args.dir)
    cpu = 0.0
    n = 0
    if args.phase == "runs":
        lo, hi = part_range(args.n, args.workers, args.part)
        writer = BucketRunWriter(root / f"part-{args.part:05d}", args.workers, args.bands, exact=True)
        for s in range(lo, hi, BATCH):
            batch = generate(s, min(s + BATCH, hi), args.bands, args.dup, args.exact, args.seed)
            t = time.process_time()
            writer.add(*batch)
            cpu += time.process_time() - t
        t = time.process_time()
        writer.close()
        cpu += time.process_time() - t
        n = hi - lo
    elif args.phase == "links":
        t = time.process_time()
        files = [root / f"part-{p:05d}" / f"bucket-{args.part:05d}.bin" for p in range(args.workers)]
        links = link_bucket(files, args.bands)
        route_links(links, owners(args.n, args.workers), LocalFiles(root).path(f"{round_dir(CLUSTER, 0, args.part)}/x").parent)
        cpu = time.process_time() - t
        n = part_range(args.n, args.workers, args.part)[1] - part_range(args.n, args.workers, args.part)[0]
    elif args.phase == "cluster":
        # one round; every partition named in --parts, the peak RSS reset between them
        rows = []
        for j in [int(x) for x in args.parts.split(",")]:
            reset_peak_rss()
            t = time.process_time()
            summary = run_round(LocalFiles(root), CLUSTER, args.round, j, owners(args.n, args.workers))
            rows.append({"phase": "cluster", "part": j, "round": args.round, "cpu_s": time.process_time() - t,
                         "peak_rss_mib": peak_rss_mib(), "star": summary.get("star"),
                         "removed": summary.get("removed", 0), "exact": summary.get("exact", 0),
                         "rowsIn": summary["rowsIn"],
                         "docs": part_range(args.n, args.workers, j)[1] - part_range(args.n, args.workers, j)[0]})
        return {"rows": rows}
    else:  # readback
        lo, hi = part_range(args.n, args.workers, args.part)
        t = time.process_time()
        final = LocalFiles(root).read_json(f"{CLUSTER}/{DONE}")["round"]
        decisions = DropDecisions(root / round_dir(CLUSTER, final, args.part) / DECISIONS)
        dropped = 0
        for s in range(lo, hi, READ_BATCH):
            g = np.arange(s, min(s + READ_BATCH, hi), dtype=np.uint64)
            dropped += int((decisions.reasons(doc_keys(g)) > 0).sum())
        cpu = time.process_time() - t
        n = hi - lo
    return {"phase": args.phase, "part": args.part, "docs": n, "cpu_s": cpu, "peak_rss_mib": peak_rss_mib()}


CLUSTER = "cluster"


def owners(docs: int, workers: int) -> Owners:
    """Partition p owns the keys of part p's documents."""
    ranges: list[tuple[int, int] | None] = []
    for p in range(workers):
        lo, hi = part_range(docs, workers, p)
        ranges.append((int(doc_keys(np.uint64(lo))), int(doc_keys(np.uint64(hi - 1)))) if hi > lo else None)
    return Owners(ranges)


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux: 5 > /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM: reset by exec, unlike ru_maxrss, which a child inherits)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(phase: str, part: int, docs: int, workers: int, args: argparse.Namespace, root: Path,
              extra: tuple[str, ...] = ()) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", phase, "--part", str(part), "--n", str(docs),
           "--workers-n", str(workers), "--bands", str(args.bands), "--dup", str(args.dup),
           "--exact", str(args.exact), "--seed", str(args.seed), "--dir", str(root), *extra]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def run_cluster(docs: int, workers: int, args: argparse.Namespace, root: Path) -> tuple[list[dict[str, Any]], int]:
    """Every round, partition by partition (one process per round, or per partition and round)."""
    rows: list[dict[str, Any]] = []
    r = 1
    per_process = args.cluster_processes or not reset_peak_rss()
    while True:
        batches = [[j] for j in range(workers)] if per_process else [list(range(workers))]
        this = []
        for parts in batches:
            this += run_child("cluster", 0, docs, workers, args, root,
                              ("--round", str(r), "--parts", ",".join(map(str, parts))))["rows"]
        rows += this
        if round_kind(r) == LARGE_STAR and all(x["star"] for x in this):
            LocalFiles(root).write_json(f"{CLUSTER}/{DONE}", {"round": r, "removed": sum(x["removed"] for x in this),
                                                             "exact": sum(x["exact"] for x in this)})
            return rows, r
        r += 1


def baseline_rss() -> float:
    code = ("import numpy, crucible.trainer.data.dedup, pathlib; "
            "print([int(x.split()[1]) / 1024 for x in pathlib.Path('/proc/self/status').read_text().splitlines() "
            "if x.startswith('VmHWM:')][0])")
    return float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)


def verify(root: Path, docs: int, workers: int, args: argparse.Namespace) -> bool:
    from crucible.trainer.data.minhash import bucket_pairs, exact_pairs, removed_by_clusters

    keys_all, bands_all, _, hashes_all = generate(0, docs, args.bands, args.dup, args.exact, args.seed)
    ea, eb = exact_pairs(hashes_all, keys_all)
    na, nb = [ea], [eb]
    for band in range(args.bands):
        a, b = bucket_pairs(bands_all[:, band], keys_all)
        na.append(a)
        nb.append(b)
    expected = removed_by_clusters(np.concatenate(na), np.concatenate(nb))
    final = LocalFiles(root).read_json(f"{CLUSTER}/{DONE}")["round"]
    got = np.concatenate([np.load(root / round_dir(CLUSTER, final, p) / DECISIONS)[:, 0] for p in range(workers)])
    return bool(np.array_equal(np.sort(got), expected))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", default="1000000,4000000,16000000")
    parser.add_argument("--workers", default="1,4,16")
    parser.add_argument("--configs", default=None,
                        help="DOCS:WORKERS pairs instead of the grid, e.g. 1000000:1,4000000:4,16000000:16")
    parser.add_argument("--bands", type=int, default=14)
    parser.add_argument("--dup", type=float, default=0.2)
    parser.add_argument("--exact", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--verify", action="store_true", help="check the kept set against the in-memory clustering")
    parser.add_argument("--json", default=None, help="also write the figures here")
    # child-process arguments
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--part", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--workers-n", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--parts", default="0", help=argparse.SUPPRESS)
    parser.add_argument("--cluster-processes", action="store_true",
                        help="one process per partition and round in the cluster phase (default: one per round, "
                             "the peak RSS reset between partitions)")
    args = parser.parse_args()
    if args.child:
        args.phase, args.workers = args.child, args.workers_n
        print(json.dumps(child(args)))
        return 0
    sizes = [int(x) for x in args.docs.split(",")]
    worker_counts = [int(x) for x in args.workers.split(",")]
    base = baseline_rss()
    print(f"dedup scaling: {args.bands} bands + exact hash, {args.dup:.0%} near copies, {args.exact:.0%} exact copies; "
          f"process baseline (python + numpy) {base:.0f} MiB")
    print(f"{'docs':>11} {'workers':>7} {'docs/worker':>11} | {'peak RSS MiB per worker (max)':^40} | "
          f"{'CPU us/doc (all workers)':^34} | removed rounds wall_s load  ok")
    print(f"{'':>31} | {'runs':>9} {'links':>9} {'cluster':>9} {'readback':>9} | {'runs':>7} {'links':>7} "
          f"{'cluster':>8} {'read':>6} |")
    results = []
    grid = ([tuple(int(x) for x in c.split(":")) for c in args.configs.split(",")] if args.configs
            else [(d, w) for d in sizes for w in worker_counts])
    worker_counts = sorted({w for _, w in grid})
    for docs, workers in grid:
        root = Path(args.dir or tempfile.mkdtemp(prefix="crucible-scale-")) / f"d{docs}-w{workers}"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        wall = time.perf_counter()
        load_before = os.getloadavg()[0]
        rows: dict[str, list[dict[str, Any]]] = {}
        for phase in ("runs", "links"):
            rows[phase] = [run_child(phase, p, docs, workers, args, root) for p in range(workers)]
            if phase == "runs":
                disk = sum(f.stat().st_size for f in root.rglob("bucket-*.bin"))
        rows["cluster"], rounds = run_cluster(docs, workers, args, root)
        rows["readback"] = [run_child("readback", p, docs, workers, args, root) for p in range(workers)]
        removed = LocalFiles(root).read_json(f"{CLUSTER}/{DONE}")
        ok = verify(root, docs, workers, args) if args.verify else None
        load = (load_before + os.getloadavg()[0]) / 2
        rss = {ph: max(r["peak_rss_mib"] for r in rs) for ph, rs in rows.items()}
        per_worker_cluster = [sum(r["cpu_s"] for r in rows["cluster"] if r["part"] == j) for j in range(workers)]
        cpu = {ph: sum(r["cpu_s"] for r in rs) / docs * 1e6 for ph, rs in rows.items()}
        res = {"docs": docs, "workers": workers, "docsPerWorker": docs // workers, "peakRssMiB": rss,
               "cpuMicrosPerDoc": cpu, "removed": removed, "bucketBytes": disk, "kept_set_ok": ok,
               "wallSeconds": time.perf_counter() - wall, "rounds": rounds, "loadAverage": load,
               "clusterRowsIn": sum(r["rowsIn"] for r in rows["cluster"]),
               "perWorkerCpuMicrosPerDoc": {
                   **{ph: max(r["cpu_s"] / max(r["docs"], 1) * 1e6 for r in rs) for ph, rs in rows.items()
                      if ph != "cluster"},
                   "cluster": max(c / max(part_range(docs, workers, j)[1] - part_range(docs, workers, j)[0], 1) * 1e6
                                  for j, c in enumerate(per_worker_cluster))}}
        results.append(res)
        print(f"{docs:>11,} {workers:>7} {docs // workers:>11,} | {rss['runs']:>9.0f} {rss['links']:>9.0f} "
              f"{rss['cluster']:>9.0f} {rss['readback']:>9.0f} | {cpu['runs']:>7.2f} {cpu['links']:>7.2f} "
              f"{cpu['cluster']:>8.2f} {cpu['readback']:>6.2f} | {removed['removed']:>8,} {rounds:>6} "
              f"{res['wallSeconds']:>6.0f} {load:>4.1f} {'' if ok is None else ('yes' if ok else 'NO')}", flush=True)
        if not args.dir:
            shutil.rmtree(root.parent, ignore_errors=True)
        else:
            shutil.rmtree(root, ignore_errors=True)

    def spread(values: list[float]) -> float:
        mid = (max(values) + min(values)) / 2
        return (max(values) - min(values)) / 2 / mid if mid else 0.0

    print("\ngoals:")
    by_ratio: dict[int, list[dict[str, Any]]] = {}
    for r in results:
        by_ratio.setdefault(r["docsPerWorker"], []).append(r)
    for per, group in sorted(by_ratio.items()):
        if len(group) < 2:
            continue
        for ph in ("runs", "links", "cluster", "readback"):
            vals = [r["peakRssMiB"][ph] for r in group]
            print(f"  peak RSS, {per:,} docs/worker, {ph:<8}: {', '.join(f'{v:.0f}' for v in vals)} MiB "
                  f"-> +-{spread(vals):.0%} (goal +-25%) over {[(r['docs'], r['workers']) for r in group]}")
    for per, group in sorted(by_ratio.items()):
        if len(group) < 2:
            continue
        total = [sum(r["cpuMicrosPerDoc"].values()) for r in group]
        print(f"  CPU per doc, {per:,} docs/worker, sizes {[r['docs'] for r in group]}: "
              f"{', '.join(f'{v:.2f}' for v in total)} us -> +-{spread(total):.0%} (goal +-25%)")
    for workers in worker_counts:
        group = [r for r in results if r["workers"] == workers]
        if len(group) < 2:
            continue
        total = [sum(r["cpuMicrosPerDoc"].values()) for r in group]
        print(f"  CPU per doc, {workers} workers, sizes {[r['docs'] for r in group]}: "
              f"{', '.join(f'{v:.2f}' for v in total)} us -> +-{spread(total):.0%} (goal +-25%)")
    if args.json:
        Path(args.json).write_text(json.dumps({"baselineRssMiB": base, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
