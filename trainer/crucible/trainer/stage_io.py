"""The stage I/O contract every stage (data, pretrain, finetune, preference, quantize) follows.

What a backend may rely on, whatever the stage:

* **Spec**: ``python -m crucible.trainer STAGE --spec FILE [stage options]``; FILE is the
  resource's spec as JSON. :func:`read_spec` parses it into the stage's config; any mistake is a
  :class:`SpecError` naming the file and the dotted field.
* **Exit status** (:mod:`crucible.trainer.config.common`): 0 ok, 1 application error, 2 bad spec
  or input, 75 retriable infrastructure fault. :func:`stage_main` maps every failure to one of
  them (classification in :mod:`crucible.trainer.faults`).
* **Termination message**: on failure each rank appends ``{"exitCode", "kind", "reason"}`` to
  ``$CRUCIBLE_TERMINATION_LOG`` (else ``/dev/termination-log`` when it exists); on success rank 0
  appends ``{"stage", "results"}``. The operator reads both from the pod, so it needs no
  credentials for the output bucket.
* **``_SUCCESS``** (:data:`SUCCESS`): written last and once, atomically, by
  :func:`write_success` only: ``{"stage", "finishedAt", "inputs", "results"}``. A stage whose
  output holds it exits 0 at once (:func:`finished`).

Nothing here imports torch, so the contract costs a stage nothing before it has parsed its spec.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from crucible.trainer.config.common import (
    EXIT_APPLICATION_ERROR,
    EXIT_BAD_INPUT,
    EXIT_OK,
    EXIT_RETRIABLE,
    StrictModel,
)

if TYPE_CHECKING:
    from pydantic import BaseModel

    from crucible.trainer.storage import Storage

__all__ = [
    "EXIT_APPLICATION_ERROR",
    "EXIT_BAD_INPUT",
    "EXIT_OK",
    "EXIT_RETRIABLE",
    "SUCCESS",
    "TERMINATION_LOG",
    "SpecError",
    "file_sha256",
    "finished",
    "input_receipt",
    "read_spec",
    "read_success",
    "receipt_sha256",
    "require_uri",
    "stage_main",
    "success_record",
    "success_uri",
    "write_success",
    "write_success_message",
    "write_termination_message",
]

SUCCESS = "_SUCCESS"
"""The name of the receipt a finished stage leaves in its output, the only place it is spelled."""

TERMINATION_LOG = "/dev/termination-log"
ENV_TERMINATION_LOG = "CRUCIBLE_TERMINATION_LOG"
MESSAGE_LIMIT = 3500  # Kubernetes keeps 4 KiB of the termination message; the rest of the budget is the failures'

Config = TypeVar("Config", bound=StrictModel)


class SpecError(ValueError):
    """The spec or an input is wrong; the message names the file, the dotted field and the fix (exit 2)."""


# -- spec -----------------------------------------------------------------------------------


def _dotted(loc: tuple[Any, ...]) -> str:
    return "spec" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)


_FIELD_PREFIX = re.compile(r"^([a-z][A-Za-z0-9]*(?:(?:\.[a-z][A-Za-z0-9]*)|\[\d+\])*): ")


def _problem(loc: tuple[Any, ...], msg: str) -> str:
    """One validation error as ``spec.<dotted field>: what to do``.

    A model validator's error has the model as its location and names the field itself at the start of
    its message (``groupSize: ...``); that name joins the location so every message names the full
    dotted field the user wrote.
    """
    msg = msg.removeprefix("Value error, ")
    named = _FIELD_PREFIX.match(msg)
    if named:
        return f"{_dotted(loc)}.{named.group(1)}: {msg[named.end():]}"
    return f"{_dotted(loc)}: {msg}"


def read_spec(
    stage: str,
    argv: list[str],
    expected: type[Config],
    options: Callable[[argparse.ArgumentParser], None] | None = None,
) -> tuple[Config, argparse.Namespace]:
    """Parse ``--spec FILE`` (and the stage's own ``options``) into the stage's config.

    Any mistake raises :class:`SpecError` naming the file and the dotted field.
    """
    from pydantic import ValidationError

    from crucible.trainer.config import parse_stage_spec

    parser = argparse.ArgumentParser(prog=f"python -m crucible.trainer {stage}")
    parser.add_argument("--spec", required=True, help="the resource spec as JSON, fromRun resolved to uri")
    if options is not None:
        options(parser)
    args = parser.parse_args(argv)
    try:
        raw = json.loads(Path(args.spec).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise SpecError(f"{args.spec}: no such spec file") from exc
    except OSError as exc:
        raise SpecError(f"{args.spec}: cannot read the spec ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise SpecError(f"{args.spec}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    except UnicodeDecodeError as exc:
        raise SpecError(f"{args.spec}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if not isinstance(raw, dict):
        raise SpecError(f"{args.spec}: the spec must be a JSON object")
    try:
        config = parse_stage_spec(stage, raw)
    except ValidationError as exc:
        problems = "; ".join(_problem(e["loc"], e["msg"]) for e in exc.errors())
        raise SpecError(f"{args.spec}: {problems}") from exc
    if not isinstance(config, expected):  # pragma: no cover - parse_stage_spec's contract
        raise SpecError(f"{args.spec}: not a {expected.__name__} spec")
    return config, args


def stage_main(
    stage: str,
    expected: type[Config],
    run: Callable[[Config], int],
    argv: list[str] | None,
) -> int:
    """The ``main`` of a stage: parse ``--spec``, run, map any failure to the contract's exit code."""
    return stage_main_with_options(stage, expected, None, lambda config, _args: run(config), argv)


def stage_main_with_options(
    stage: str,
    expected: type[Config],
    options: Callable[[argparse.ArgumentParser], None] | None,
    run: Callable[[Config, argparse.Namespace], int],
    argv: list[str] | None,
    log: Callable[[str], None] | None = None,
) -> int:
    """:func:`stage_main` for a stage with command-line options of its own (data: ``--shard``, ...).

    ``log`` receives the one-line reason of a failure (default: stderr).
    """
    from crucible.trainer.faults import run_guarded

    argv = list(sys.argv[1:] if argv is None else argv)

    def body() -> int:
        config, args = read_spec(stage, argv, expected, options)
        return run(config, args)

    return run_guarded(body, log)


def require_uri(value: str | None, field: str, what: str) -> str:
    """The resolved URI of an input or output, or a SpecError naming ``field``."""
    if not value:
        raise SpecError(f"{field} is empty: set it to {what} (the backends fill it in from fromRun/storage)")
    return value


# -- termination message ----------------------------------------------------------------------


def _termination_log() -> str | None:
    path = os.environ.get(ENV_TERMINATION_LOG)
    if path:
        return path
    return TERMINATION_LOG if os.path.exists(TERMINATION_LOG) else None


def _append_message(line: str) -> None:
    path = _termination_log()
    if path is None:
        return
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError:
        pass


def write_termination_message(code: int, reason: str) -> None:
    """Leave the exit reason where Kubernetes reads it (the container's terminationMessagePath).

    Under torchrun the pod's exit status is torchrun's (1 on any worker failure), so the
    backends read this message to see that a rank exited retriable.
    """
    kind = {EXIT_RETRIABLE: "retriable", EXIT_BAD_INPUT: "bad-input"}.get(code, "application-error")
    _append_message(json.dumps({"exitCode": code, "kind": kind, "reason": reason[:2000]}))


def write_success_message(receipt: dict[str, Any]) -> None:
    """Leave a finished stage's results where Kubernetes reads them (rank 0's termination message).

    The operator copies ``results`` into ``status.results`` from this line, so a run whose
    output is on S3 still reports its numbers without the operator reading storage. Results are
    numbers and short strings; a receipt too large is cut to its stage and a note rather than
    written torn.
    """
    line = json.dumps({"stage": receipt.get("stage"), "results": receipt.get("results", {})}, default=str)
    if len(line) > MESSAGE_LIMIT:
        line = json.dumps({"stage": receipt.get("stage"), "results": {"note": f"results too large; see {SUCCESS}"}})
    _append_message(line)


# -- _SUCCESS -------------------------------------------------------------------------------


def success_uri(output_uri: str) -> str:
    from crucible.trainer.storage import join

    return join(output_uri, SUCCESS)


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: a non-finite number is recorded as null rather than failing the stage."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def success_record(stage: str, inputs: dict[str, Any], results: dict[str, Any], config: BaseModel) -> dict[str, Any]:
    """The ``_SUCCESS`` JSON: every field a stage reports, in one place (whose result it is:
    :func:`crucible.trainer.config.receipt.identity`)."""
    from crucible.trainer.config.receipt import identity

    return {
        "stage": stage,
        **identity(config),
        "finishedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "inputs": _finite(inputs),
        "results": _finite(results),
    }


# Not part of the artefact: a training run's checkpoints and a DataPipeline's intermediates.
_NOT_OUTPUTS = ("checkpoints", "_work")
_HASHED: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a local file, read once per (path, size, mtime) in this process.

    A stage whose model and reference are one folder, or whose outputs are hashed after an input
    hashed the same files, streams each file once (the shards module's one ``sha256_file``).
    """
    from crucible.trainer.data.shards import sha256_file

    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    digest = _HASHED.get(key)
    if digest is None:
        digest = _HASHED[key] = sha256_file(path)
    return digest


def folder_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under a local folder (relative path -> hash), less receipts,
    checkpoints, intermediates and temporary files."""
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if not path.is_file() or rel == SUCCESS or rel.split("/")[0] in _NOT_OUTPUTS or path.name.endswith(".tmp"):
            continue
        out[rel] = file_sha256(path)
    return out


def output_hashes(output_uri: str) -> dict[str, str]:
    """sha256 of every file of a local output (relative path -> hash), for the receipt.

    ``crucible lineage`` re-hashes them to tell whether a model or its shards changed after the
    run. S3 outputs are not re-read here (empty: an input receipt of one hashes its files instead).
    """
    root = Path(output_uri)
    if output_uri.startswith("s3://") or not root.is_dir():
        return {}
    return folder_hashes(root)


def files_digest(files: dict[str, str]) -> str:
    """One sha256 for a folder: of its sorted ``relative path -> sha256`` listing."""
    return hashlib.sha256(json.dumps(files, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


_FILE_SUFFIXES = (".jsonl", ".json", ".txt", ".md", ".gguf", ".parquet", ".gz", ".zst", ".bin", ".safetensors")


def _read_or_none(store: Storage, uri: str) -> bytes | None:
    from crucible.trainer.storage import StorageNotFound

    try:
        return store.read_bytes(uri)
    except (StorageNotFound, FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def input_receipt(store: Storage, uri: str, field: str, local: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """``{uri, field, sha256, hashOf}`` of one input, by content: what ``crucible lineage`` re-checks.

    ``hashOf`` says what the sha256 is of: ``file`` (the input is one file), ``manifest.json`` (a
    DataPipeline output: its manifest lists every shard with its own sha256), ``_SUCCESS`` (the
    output of a Crucible stage whose receipt lists the sha256 of each of its files) or ``files``
    (any other folder: each file is hashed and listed under ``files``; the sha256 is of that
    listing). ``local`` is a copy the stage already has on disk (an S3 model it downloaded): it is
    hashed instead of reading the bucket again. ``field`` is the spec field the input came from.
    """
    from crucible.trainer.storage import is_s3, join

    entry: dict[str, Any] = {"uri": uri, "field": field}
    path = Path(local) if local is not None else (None if is_s3(uri) else Path(uri))
    if path is not None and path.is_file():
        return {**entry, "sha256": file_sha256(path), "hashOf": "file"}
    if path is None and Path(uri.rstrip("/")).suffix in _FILE_SUFFIXES:
        data = _read_or_none(store, uri)
        if data is not None:
            return {**entry, "sha256": hashlib.sha256(data).hexdigest(), "hashOf": "file"}
    manifest = _read_or_none(store, join(uri, "manifest.json"))
    if manifest is not None:
        return {**entry, "sha256": hashlib.sha256(manifest).hexdigest(), "hashOf": "manifest.json"}
    receipt = _read_or_none(store, join(uri, SUCCESS))
    if receipt is not None and _lists_outputs(receipt):
        return {**entry, "sha256": hashlib.sha256(receipt).hexdigest(), "hashOf": SUCCESS}
    if path is not None and path.is_dir():
        files = folder_hashes(path)
    else:  # a folder on S3 with no copy here: each object streamed once
        prefix = uri.rstrip("/") + "/"
        files = {}
        for object_uri in store.list(uri):
            rel = object_uri[len(prefix):]
            if rel == SUCCESS or rel.split("/")[0] in _NOT_OUTPUTS:
                continue
            files[rel] = hashlib.sha256(store.read_bytes(object_uri)).hexdigest()
    if not files:
        return {**entry, "sha256": None, "hashOf": "missing"}
    out = {**entry, "sha256": files_digest(files), "hashOf": "files", "files": files}
    if receipt is not None:
        out["receiptSha256"] = hashlib.sha256(receipt).hexdigest()
    return out


def _lists_outputs(raw: bytes) -> bool:
    try:
        record = json.loads(raw)
    except ValueError:
        return False
    return isinstance(record, dict) and isinstance(record.get("outputs"), dict) and bool(record["outputs"])


def write_success(
    store: Storage,
    output_uri: str,
    stage: str,
    inputs: dict[str, Any],
    results: dict[str, Any],
    config: BaseModel,
) -> dict[str, Any]:
    """Write ``<output_uri>/_SUCCESS`` atomically (local rename or one S3 PUT) and report the results.

    Call it once, after every other file of the output is in place: a reader that sees
    ``_SUCCESS`` sees the whole output. ``config`` is the stage's parsed spec (its hash is
    recorded). Returns the record written.
    """
    record = success_record(stage, inputs, results, config)
    outputs = output_hashes(output_uri)
    if outputs:
        record["outputs"] = outputs
    raw = json.dumps(record, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False, default=str) + "\n"
    store.write_bytes(success_uri(output_uri), raw.encode("utf-8"))
    write_success_message(record)
    return record


def read_success(store: Storage, output_uri: str) -> dict[str, Any] | None:
    """The ``_SUCCESS`` record of a finished output, None when the stage has not finished there."""
    from crucible.trainer.storage import StorageNotFound

    try:
        raw = store.read_bytes(success_uri(output_uri))
    except (StorageNotFound, FileNotFoundError, NotADirectoryError):
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def finished(store: Storage, output_uri: str, config: BaseModel) -> bool:
    """Whether this stage already finished into ``output_uri`` (it then exits 0 at once).

    A ``_SUCCESS`` of another spec or run raises ForeignResultError (exit 2) rather than being
    taken as this run's result.
    """
    from crucible.trainer.config.receipt import check_existing

    where = success_uri(output_uri)
    if not store.exists(where):
        return False
    check_existing(store.read_bytes(where), config, where)
    return True


def receipt_sha256(store: Storage, uri: str) -> str | None:
    """The sha256 :func:`input_receipt` records for ``uri`` (None when nothing is there)."""
    return input_receipt(store, uri, "").get("sha256")
