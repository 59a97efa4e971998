"""GGUF files as model sources: converted once into a Hugging Face directory, cached by sha256.

A ``model.source.uri`` (or ``tokenizer.source.uri``, or a FinetuneRun's ``model.uri``) that names
a ``.gguf`` file — local or ``s3://`` — is read with ``transformers``' GGUF loader (which needs the
``gguf`` package), dequantised to fp32 and written as ``config.json`` + safetensors + tokenizer
files. The result is cached under ``$CRUCIBLE_CACHE_DIR/gguf/<sha256>/`` (default
``~/.cache/crucible``), so every later stage and rerun on the node reads the converted folder;
concurrent ranks of one node convert once (a file lock) and the folder appears atomically (a
rename). ``gguf-source.json`` in it records the file's uri, sha256 and size: the receipts carry it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from crucible.trainer.faults import SpecError

GGUF_SUFFIX = ".gguf"
GGUF_MAGIC = b"GGUF"
SOURCE_RECORD = "gguf-source.json"


def is_gguf(uri: str | os.PathLike[str]) -> bool:
    return str(uri).lower().endswith(GGUF_SUFFIX)


def cache_root() -> Path:
    explicit = os.environ.get("CRUCIBLE_CACHE_DIR", "").strip()
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or str(Path.home() / ".cache")
    return Path(base) / "crucible"


def sha256_file(path: Path) -> str:
    from crucible.trainer.data.shards import sha256_file as streamed

    return streamed(path)


def source_record(model_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The GGUF file a converted model directory came from (None for any other directory)."""
    path = Path(model_dir) / SOURCE_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _architecture(path: Path, uri: str, field: str) -> str:
    """``general.architecture`` of the file, with a clear error when it is not a GGUF file at all."""
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise SpecError(f"{field}: {uri} is not a GGUF file (it does not start with 'GGUF'); "
                        "point it at a .gguf model file or a Hugging Face model folder")
    try:
        from gguf import GGUFReader
    except ImportError as exc:  # pragma: no cover - the trainer extra installs gguf
        raise SpecError(f"{field}: {uri} is a GGUF file but the `gguf` package is not installed; "
                        "pip install 'crucible[trainer]'") from exc
    try:
        reader = GGUFReader(str(path))
        arch_field = reader.fields.get("general.architecture")
        arch = str(arch_field.contents()) if arch_field is not None else ""
    except Exception as exc:  # gguf raises bare ValueError/struct errors on torn files
        raise SpecError(f"{field}: {uri} cannot be read as GGUF ({exc}); the file is torn or corrupt — "
                        "download it again") from exc
    if not arch:
        raise SpecError(f"{field}: {uri} names no general.architecture; it is not a model GGUF file")
    return arch


def _check_supported(arch: str, uri: str, field: str) -> None:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    supported = [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]
    if arch not in supported and arch.replace("-", "_") not in supported:
        raise SpecError(
            f"{field}: {uri} holds a '{arch}' model, which transformers cannot load from GGUF "
            f"(it reads: {', '.join(sorted(supported))}); convert it to a Hugging Face folder with "
            "llama.cpp's tools and point the field at that folder"
        )


def _convert(gguf_path: Path, out: Path, uri: str, field: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except ValueError as exc:
        raise SpecError(f"{field}: transformers cannot load {uri}: {exc}") from exc
    # A GGUF-loaded model carries a GGUF quantization_config; the weights are already dequantised
    # fp32 here and save_pretrained must not advertise a quantization it does not have.
    model.config.__dict__.pop("quantization_config", None)
    if hasattr(model, "hf_quantizer"):
        setattr(model, "hf_quantizer", None)  # noqa: B010 - transformers types it as a Module attribute
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("quantization_config", None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def materialize(uri: str, store: Any, download_dir: str | os.PathLike[str], field: str = "model.source.uri") -> Path:
    """The Hugging Face directory converted from the GGUF file at ``uri`` (converted on first use).

    ``store`` is a :class:`crucible.trainer.storage.Storage` (used for ``s3://`` files);
    ``download_dir`` holds the downloaded file when ``uri`` is remote.
    """
    from crucible.trainer import storage as st

    if st.is_s3(uri):
        local_file = Path(download_dir) / Path(uri.rstrip("/")).name
        if not local_file.is_file():
            try:
                store.download_file(uri, local_file)
            except st.StorageNotFound as exc:
                raise SpecError(f"{field}: {exc}; point it at a .gguf file") from exc
    else:
        local_file = Path(uri)
        if not local_file.is_file():
            raise SpecError(f"{field}: {uri}: no such file; point it at a .gguf model file")
    arch = _architecture(local_file, uri, field)
    _check_supported(arch, uri, field)
    digest = sha256_file(local_file)
    root = cache_root() / "gguf"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home in a pod: convert next to the download instead
        root = Path(download_dir) / "gguf"
    target = root / digest
    with _locked(root / f".{digest}.lock"):
        if source_record(target) is not None:
            return target
        if target.exists():  # a folder without its record is a conversion cut short: redo it
            shutil.rmtree(target)
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:12]}-", dir=root))
        tmp.chmod(0o755)  # mkdtemp makes it private; the converted model is shared by the node's processes
        try:
            _convert(local_file, tmp, uri, field)
            record = {"uri": uri, "sha256": digest, "size": local_file.stat().st_size, "architecture": arch}
            (tmp / SOURCE_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True))
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target
