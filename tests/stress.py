"""The timing-sensitive tests, run beside CPU-bound processes: proof that the suite holds under load.

    python tests/stress.py                 # two busy processes + the emulated-operator and local-runner tests
    python tests/stress.py --busy 4 -- -k peering

``make test`` runs it after the suite (``make stress`` alone). The tests wait with the suite's
one time factor (tests/waits.py, ``CRUCIBLE_TEST_TIME_FACTOR``); this script does not raise it —
it proves the default is enough on a machine whose cores are all taken. Chosen subset: the
operator against KMock's emulator (Kopf watches, peering, hang and restart timing) and the
embedded runner and CLI (processes, signals, hang detection): the tests that wait on other
processes and threads. Exit status: pytest's.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SUBSET = [
    "tests/operator/test_operator_emulated.py",
    "tests/local/test_runner.py",
    "tests/local/test_cli.py",
]
BUSY = "import os, signal, ctypes\n" \
       "ctypes.CDLL('libc.so.6').prctl(1, signal.SIGKILL)\n" \
       "while True:\n    pass\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--busy", type=int, default=2, help="CPU-bound processes beside the tests (default 2)")
    p.add_argument("pytest_args", nargs="*", help="after --: extra pytest arguments (default: the subset)")
    args = p.parse_args(argv)
    hogs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(args.busy)]
    started = time.monotonic()
    try:
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=5",
               *(args.pytest_args or SUBSET)]
        print(f"stress: {args.busy} CPU-bound processes beside: {' '.join(cmd[3:])} "
              f"(load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs)", flush=True)
        rc = subprocess.call(cmd, cwd=REPO)
    finally:
        for hog in hogs:
            with contextlib.suppress(ProcessLookupError):
                hog.send_signal(signal.SIGKILL)
            hog.wait()
    print(f"stress: pytest exited {rc} after {time.monotonic() - started:.0f}s "
          f"(load average now {os.getloadavg()[0]:.1f})", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
