"""Input hashing of the receipts against coreutils ``sha256sum``, on the same files, in one run.

    .venv/bin/python bench/receipt_hashing.py [--mib 512] [--files 4]

Writes ``--files`` random files of ``--mib`` MiB in total (a model folder's weight shards), then
hashes the folder three ways and prints the time and GiB/s of each and our ratio to the peer:

1. ``input_receipt`` (crucible.trainer.stage_io: the folder file by file through the shards
   module's streamed ``sha256_file``, what a stage records for a base model that no stage wrote);
2. ``sha256sum`` over the same files (the peer: coreutils, one process);
3. ``input_receipt`` again in the same process: every file is cached by (path, size, mtime), so a
   second input naming the same folder (model and reference) costs no read.

The files are read once before timing so both read from the page cache (hashing, not the disk, is
measured). Goal: within 10 % of sha256sum (ratio >= 0.9), and the cached call under 1 % of it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "operator"), str(ROOT / "trainer")]

from crucible.trainer import stage_io  # noqa: E402
from crucible.trainer.storage import Storage  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512, help="total size of the files (MiB)")
    parser.add_argument("--files", type=int, default=4)
    args = parser.parse_args()
    if shutil.which("sha256sum") is None:
        print("sha256sum (coreutils) is not installed: nothing to compare against", file=sys.stderr)
        return 2
    folder = Path(tempfile.mkdtemp(prefix="crucible-hash-bench-"))
    try:
        per = args.mib * (1 << 20) // args.files
        files = []
        for i in range(args.files):
            path = folder / f"model-{i:05d}-of-{args.files:05d}.safetensors"
            with path.open("wb") as fh:
                for _ in range(per // (1 << 24)):
                    fh.write(os.urandom(1 << 24))
                fh.write(os.urandom(per % (1 << 24)))
            files.append(str(path))
        for f in files:  # into the page cache
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass
        gib = args.mib / 1024

        started = time.perf_counter()
        ours = stage_io.input_receipt(Storage(), str(folder), "spec.model")
        t_ours = time.perf_counter() - started
        started = time.perf_counter()
        peer = subprocess.run(["sha256sum", *files], capture_output=True, text=True, check=True).stdout
        t_peer = time.perf_counter() - started
        started = time.perf_counter()
        stage_io.input_receipt(Storage(), str(folder), "spec.model")
        t_cached = time.perf_counter() - started

        theirs = {Path(line.split()[1]).name: line.split()[0] for line in peer.splitlines()}
        assert ours["files"] == theirs, "the hashes differ from sha256sum's"
        print(f"{args.files} files, {args.mib} MiB (page cache)")
        print(f"  input_receipt (ours)   {t_ours:7.3f} s  {gib / t_ours:6.2f} GiB/s")
        print(f"  sha256sum (coreutils)  {t_peer:7.3f} s  {gib / t_peer:6.2f} GiB/s")
        print(f"  ratio ours/peer (throughput)  {t_peer / t_ours:.2f}x  (goal >= 0.9)")
        print(f"  same folder again (cached by path, size, mtime)  {t_cached * 1000:.2f} ms "
              f"({t_cached / t_peer:.2%} of sha256sum)")
        return 0
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
