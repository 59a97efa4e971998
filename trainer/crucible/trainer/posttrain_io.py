"""What the post-training stages (finetune, preference, quantize) share at their edges.

Reading the spec file into its typed config (errors name the file and the dotted field), the
``_SUCCESS`` receipt written last, a local staging folder for an output that may live on S3,
and the on-disk size of a Hugging Face model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from crucible.trainer.config import parse_stage_spec
from crucible.trainer.config.common import StrictModel
from crucible.trainer.config.receipt import check_existing, identity
from crucible.trainer.faults import SpecError, run_guarded, write_success_message
from crucible.trainer.storage import Storage, StorageNotFound, is_s3, join

SUCCESS = "_SUCCESS"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")

Config = TypeVar("Config", bound=StrictModel)


def _dotted(loc: tuple[Any, ...]) -> str:
    return "spec" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)


def read_spec(stage: str, argv: list[str], expected: type[Config]) -> tuple[Config, argparse.Namespace]:
    """Parse ``--spec FILE`` into the stage's config; any mistake raises SpecError naming file and field."""
    parser = argparse.ArgumentParser(prog=f"python -m crucible.trainer {stage}")
    parser.add_argument("--spec", required=True, help="the resource spec as JSON, fromRun resolved to uri")
    args = parser.parse_args(argv)
    try:
        raw = json.loads(Path(args.spec).read_text())
    except FileNotFoundError as exc:
        raise SpecError(f"{args.spec}: no such spec file") from exc
    except json.JSONDecodeError as exc:
        raise SpecError(f"{args.spec}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(raw, dict):
        raise SpecError(f"{args.spec}: the spec must be a JSON object")
    try:
        config = parse_stage_spec(stage, raw)
    except ValidationError as exc:
        problems = "; ".join(f"{_dotted(e['loc'])}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors())
        raise SpecError(f"{args.spec}: {problems}") from exc
    assert isinstance(config, expected)
    return config, args


def stage_main(stage: str, expected: type[Config], run: Callable[[Config], int], argv: list[str] | None) -> int:
    """The ``main`` of every model stage: parse ``--spec``, run, map any failure to the contract's exit code."""
    return run_guarded(lambda: run(read_spec(stage, list(sys.argv[1:] if argv is None else argv), expected)[0]))


def require_uri(value: str | None, field: str, what: str) -> str:
    """The resolved URI of an input or output, or a SpecError naming ``field``."""
    if not value:
        raise SpecError(f"{field} is empty: set it to {what} (the backends fill it in from fromRun/storage)")
    return value


def success_uri(output_uri: str) -> str:
    return join(output_uri, SUCCESS)


def already_done(store: Storage, output_uri: str, config: BaseModel) -> bool:
    """True when ``output_uri`` holds this run's ``_SUCCESS``; ForeignResultError when another's."""
    where = success_uri(output_uri)
    if not store.exists(where):
        return False
    check_existing(store.read_bytes(where), config, where)
    return True


def receipt_sha256(store: Storage, uri: str) -> str | None:
    """sha256 of an input file, or of a folder's ``_SUCCESS`` receipt (else manifest/config), tying outputs to inputs."""
    if Path(uri.rstrip("/")).suffix in (".jsonl", ".json", ".txt", ".md"):
        try:
            return hashlib.sha256(store.read_bytes(uri)).hexdigest()
        except (StorageNotFound, FileNotFoundError):
            return None
    for name in (SUCCESS, "manifest.json", "config.json"):
        try:
            return hashlib.sha256(store.read_bytes(join(uri, name))).hexdigest()
        except (StorageNotFound, FileNotFoundError, IsADirectoryError, NotADirectoryError):
            continue
    return None


def success_record(stage: str, inputs: dict[str, Any], results: dict[str, Any], config: BaseModel) -> dict[str, Any]:
    return {
        "stage": stage,
        **identity(config),
        "finishedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "inputs": inputs,
        "results": results,
    }


@contextmanager
def staged_output(store: Storage, output_uri: str) -> Iterator[Path]:
    """A local folder to write the output into; uploaded to ``output_uri`` (``_SUCCESS`` last) on exit.

    A local output is written in place. Nothing is uploaded when the body raises.
    """
    if not is_s3(output_uri):
        path = Path(output_uri)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    staging = Path(tempfile.mkdtemp(prefix="crucible-out-"))
    try:
        yield staging
        store.upload_dir(staging, output_uri, last=(SUCCESS,))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_success(directory: Path, record: dict[str, Any]) -> None:
    """Write ``_SUCCESS`` atomically; call it after every other file of the output is in place."""
    tmp = directory / f".{SUCCESS}.tmp"
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
    os.replace(tmp, directory / SUCCESS)
    write_success_message(record)


def model_size_bytes(directory: str | os.PathLike[str]) -> int:
    """Bytes of a model's weight files (safetensors/bin) at its top level: not tokenizer and config,
    and not a training run's checkpoints/ folder that may sit inside its output."""
    return sum(p.stat().st_size for p in Path(directory).iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def local_model(store: Storage, uri: str, field: str, cache: Path) -> Path:
    """A local Hugging Face model directory for ``uri`` (downloaded from S3 when needed)."""
    try:
        path = store.local_path(uri, cache / "model", field=field)
    except StorageNotFound as exc:
        raise SpecError(f"{field}: {exc}; point it at a Hugging Face model directory") from exc
    if not (path / "config.json").exists():
        raise SpecError(
            f"{field}: {uri} holds no config.json; it must be a Hugging Face model directory "
            "(a PretrainRun/FinetuneRun output or save_pretrained folder)"
        )
    return path
