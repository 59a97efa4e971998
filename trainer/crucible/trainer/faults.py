"""Which failures are the infrastructure's fault: the retriable exit code and its classifier.

The trainer exits with :data:`EXIT_RETRIABLE` (75, ``EX_TEMPFAIL``) when it detects a fault
that a restart on other hardware can cure, and with 1 (application) or 2 (bad spec/input)
otherwise. Both backends restart only on 75 (or death by signal):

===========================================  ==========
cause                                        exit code
===========================================  ==========
NCCL / gloo / c10d communication failure      75
a peer rank died (connection reset by peer)   75
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

import re
import sys
import traceback
from collections.abc import Callable

from crucible.trainer.config.common import EXIT_APPLICATION_ERROR, EXIT_BAD_INPUT, EXIT_OK, EXIT_RETRIABLE

# The stage I/O contract owns these; they are re-exported for the stages that import them from here.
from crucible.trainer.stage_io import SpecError, write_success_message, write_termination_message

__all__ = ["RetriableError", "SpecError", "classify", "run_guarded", "write_success_message", "write_termination_message"]


class RetriableError(RuntimeError):
    """An infrastructure fault the trainer detected itself."""


_COMMUNICATION = re.compile(
    r"NCCL|ProcessGroupGloo|\bgloo\b|\bc10d\b|DistNetworkError|DistBackendError|"
    r"DistStoreError|TCPStore|Connection reset by peer|Connection closed by peer|ECONNRESET",
)
"""Text that names the collective-communication layer (or a peer that went away): retriable.

A bare "Timeout", "timed out" or "EOF" is not enough: a tokenizer lock that timed out or a data file
that ended early is the application's problem, and restarting would only repeat it."""
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
        from_distributed = type(exc).__module__.startswith("torch.distributed")
        if isinstance(exc, RuntimeError | ConnectionError) and (from_distributed or _COMMUNICATION.search(str(exc))):
            return EXIT_RETRIABLE, text
    return EXIT_APPLICATION_ERROR, text


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
