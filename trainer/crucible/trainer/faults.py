"""Which failures are the infrastructure's fault: the retriable exit code and its classifier.

The trainer exits with :data:`EXIT_RETRIABLE` (75, ``EX_TEMPFAIL``) when it detects a fault
that a restart on other hardware can cure, and with 1 (application) or 2 (bad spec/input)
otherwise. Both backends restart only on 75 (or death by signal):

===========================================  ==========
cause                                        exit code
===========================================  ==========
NCCL / gloo / c10d communication failure      75
a peer rank died (connection reset, EOF)      75
CUDA error pointing at the device (ECC, Xid,  75
"unspecified launch failure", device lost)
storage unreachable / 5xx (StorageUnavailable) 75
no step within ``hangTimeout`` (watchdog)     75
CUDA out of memory                            1 (the config does not fit; a restart repeats it)
spec / input errors (SpecError, shards)       2
anything else (a bug)                         1
===========================================  ==========
"""

from __future__ import annotations

import json
import os
import re
import sys
import traceback
from collections.abc import Callable
from typing import Any

from crucible.trainer.config.common import EXIT_APPLICATION_ERROR, EXIT_BAD_INPUT, EXIT_OK, EXIT_RETRIABLE


class SpecError(ValueError):
    """The spec or an input is wrong; the message names the file, the dotted field and the fix."""


class RetriableError(RuntimeError):
    """An infrastructure fault the trainer detected itself."""


_COMMUNICATION = re.compile(
    r"NCCL|ProcessGroupGloo|gloo|c10d|DistNetworkError|DistBackendError|Connection reset by peer|"
    r"Connection closed by peer|Broken pipe|Socket Timeout|timed out|Timeout|ECONNRESET|EOF",
    re.IGNORECASE,
)
_CUDA_DEVICE = re.compile(
    r"uncorrectable ECC|ECC error|Xid|unspecified launch failure|device-side assert.*?device lost|"
    r"CUDA error: (?:an illegal instruction|unknown error|misaligned address|"
    r"the launch timed out|CUDA-capable device|device not ready|invalid device ordinal)|"
    r"cudaErrorDevicesUnavailable|GPU is lost|fell off the bus",
    re.IGNORECASE,
)


def classify(exc: BaseException) -> tuple[int, str]:
    """Exit code and a one-line reason for an exception that ended the stage."""
    from crucible.trainer.config.receipt import ForeignResultError
    from crucible.trainer.data.shards import ShardFormatError
    from crucible.trainer.storage import StorageNotFound, StorageUnavailable

    name = type(exc).__name__
    text = f"{name}: {exc}"
    if isinstance(exc, RetriableError | StorageUnavailable):
        return EXIT_RETRIABLE, text
    if isinstance(exc, SpecError | ShardFormatError | StorageNotFound | ForeignResultError):
        return EXIT_BAD_INPUT, text
    if "OutOfMemoryError" in name or "out of memory" in str(exc).lower():
        return EXIT_APPLICATION_ERROR, text + " (reduce training.microBatchSize or enable activationCheckpointing)"
    if name in ("DistBackendError", "DistNetworkError", "DistStoreError"):
        return EXIT_RETRIABLE, text
    if isinstance(exc, RuntimeError | OSError | ConnectionError):
        if _CUDA_DEVICE.search(str(exc)):
            return EXIT_RETRIABLE, text
        if _COMMUNICATION.search(str(exc)) and isinstance(exc, RuntimeError | ConnectionError):
            return EXIT_RETRIABLE, text
    return EXIT_APPLICATION_ERROR, text


def write_termination_message(code: int, reason: str) -> None:
    """Leave the exit reason where Kubernetes reads it (the container's terminationMessagePath).

    Under torchrun the pod's exit status is torchrun's (1 on any worker failure), so the
    backends read this message to see that a rank exited retriable. Path: env
    ``CRUCIBLE_TERMINATION_LOG``, else ``/dev/termination-log`` when it exists.
    """
    path = os.environ.get("CRUCIBLE_TERMINATION_LOG") or "/dev/termination-log"
    if not os.environ.get("CRUCIBLE_TERMINATION_LOG") and not os.path.exists(path):
        return
    kind = {EXIT_RETRIABLE: "retriable", EXIT_BAD_INPUT: "bad-input"}.get(code, "application-error")
    try:
        with open(path, "a") as f:
            f.write(json.dumps({"exitCode": code, "kind": kind, "reason": reason[:2000]}) + "\n")
    except OSError:
        pass


def write_success_message(receipt: dict[str, Any]) -> None:
    """Leave a finished stage's results where Kubernetes reads them (rank 0's termination message).

    The operator copies ``results`` into ``status.results`` from this line, so a run whose
    output is on S3 still reports its numbers without the operator reading storage. Kubernetes
    keeps 4 KiB of the message: results are numbers and short strings, and a receipt too large
    is cut to its stage and a note rather than written torn.
    """
    path = os.environ.get("CRUCIBLE_TERMINATION_LOG") or "/dev/termination-log"
    if not os.environ.get("CRUCIBLE_TERMINATION_LOG") and not os.path.exists(path):
        return
    line = json.dumps({"stage": receipt.get("stage"), "results": receipt.get("results", {})}, default=str)
    if len(line) > 3500:
        line = json.dumps({"stage": receipt.get("stage"), "results": {"note": "results too large; see _SUCCESS"}})
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError:
        pass


def run_guarded(fn: Callable[[], int], log: Callable[[str], None] | None = None) -> int:
    """Run a stage body and turn any exception into the contract's exit code, logging why."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
        return int(fn() or EXIT_OK)
    except KeyboardInterrupt:
        raise
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else EXIT_APPLICATION_ERROR
    except BaseException as exc:
        code, reason = classify(exc)
        kind = {EXIT_RETRIABLE: "retriable", EXIT_BAD_INPUT: "bad input"}.get(code, "application error")
        if code == EXIT_APPLICATION_ERROR:
            traceback.print_exc()
        log(f"crucible.trainer: {kind} (exit {code}): {reason}")
        write_termination_message(code, reason)
        return code
