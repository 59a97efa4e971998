"""A training stage's artefact: a Hugging Face model folder.

``<output.uri>`` holds ``config.json``, the weights, ``generation_config.json`` and the
tokenizer files, loadable by ``AutoModelForCausalLM.from_pretrained``. The weights are
``model.safetensors`` when they fit in one shard file (``SHARD_BYTES``), else
``model-0000K-of-0000N.safetensors`` with ``model.safetensors.index.json``, Hugging Face's
sharded layout. :func:`write_hf_model` streams them: each file's header is computed from the
shapes before any weight exists, then tensors are written one at a time as the strategy gathers
them (a decoder layer at a time where tensors must be renamed together, MoE → Mixtral), so the
writing rank never holds more than one layer. The
``_SUCCESS`` receipt is written last by :func:`crucible.trainer.stage_io.write_success`;
its ``inputs`` record the sha256 of the input's ``manifest.json`` (the DataPipeline receipt,
:func:`manifest_sha256`), so a model names exactly the data it was trained on.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from crucible.trainer import storage as st

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def save_hf_model(module: torch.nn.Module, state: dict[str, torch.Tensor], out_dir: str | Path, tokenizer: Any) -> None:
    """Write ``state`` as a Hugging Face model of ``module``'s class and config, plus the tokenizer."""
    from transformers import AutoModelForCausalLM

    config: Any = module.config
    if hasattr(config, "to_transformers"):  # crucible.trainer.llama's own Llama
        config = config.to_transformers()
    if getattr(config, "crucible_moe", None):  # Llama blocks with MoE MLPs: written as a Mixtral
        from crucible.trainer.moe import mixtral_config, to_mixtral_state

        state = to_mixtral_state(dict(state), config)
        config = mixtral_config(config)
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(state, assign=True, strict=False)
    missing = [k for k, v in fresh.state_dict().items() if v.is_meta]
    if missing:
        raise RuntimeError(f"the exported state lacks {len(missing)} tensors, e.g. {missing[:3]}")
    fresh.config.use_cache = True
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fresh.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        if isinstance(tokenizer, str | Path):
            copy_tokenizer_files(Path(tokenizer), Path(out_dir))
        else:
            tokenizer.save_pretrained(out_dir)


#: the largest weights file of an export; a model that fits is one ``model.safetensors``
SHARD_BYTES = 2 * 1024**3

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}

Spec = tuple[str, tuple[int, ...], torch.dtype]


def _group_key(name: str) -> str:
    """Tensors renamed together: a decoder layer's, else each on its own."""
    parts = name.split(".")
    if len(parts) > 3 and parts[0] == "model" and parts[1] == "layers":
        return ".".join(parts[:3])
    return name


def export_transform(config: Any) -> tuple[Any, Any]:
    """(the config written, group → group of exported tensors): MoE blocks become a Mixtral."""
    if getattr(config, "crucible_moe", None):
        from crucible.trainer.moe import mixtral_config, to_mixtral_state

        def to_mixtral(group: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            layers = sorted({int(k.split(".")[2]) for k in group if k.startswith("model.layers.")})
            return to_mixtral_state(dict(group), config, layers=layers)

        return mixtral_config(config), to_mixtral
    return config, lambda group: group


def _tied_targets(module: torch.nn.Module) -> set[str]:
    tied = getattr(module, "all_tied_weights_keys", None) or {}
    return set(tied) if getattr(module.config, "tie_word_embeddings", False) else set()


def _grouped(items: Iterable[tuple[str, torch.Tensor | None]]) -> Iterator[dict[str, Any]]:
    group: dict[str, Any] = {}
    key = None
    for name, tensor in items:
        if group and _group_key(name) != key:
            yield group
            group = {}
        key = _group_key(name)
        group[name] = tensor
    if group:
        yield group


def plan_shards(specs: list[Spec], shard_bytes: int) -> list[list[Spec]]:
    """Files of at most ``shard_bytes`` (a larger tensor alone in its file), in order."""
    files: list[list[Spec]] = [[]]
    size = 0
    for spec in specs:
        nbytes = _nbytes(spec)
        if files[-1] and size + nbytes > shard_bytes:
            files.append([])
            size = 0
        files[-1].append(spec)
        size += nbytes
    return files


def _nbytes(spec: Spec) -> int:
    n = 1
    for d in spec[1]:
        n *= d
    return n * torch.empty((), dtype=spec[2]).element_size()


def _header(specs: list[Spec]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in specs:
        end = offset + _nbytes((name, shape, dtype))
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def write_hf_model(module: torch.nn.Module, specs: list[Spec], items: Iterable[tuple[str, torch.Tensor | None]],
                   out_dir: str | Path | None, tokenizer: Any, shard_bytes: int = SHARD_BYTES) -> dict[str, int]:
    """Stream a model's weights into ``out_dir`` as Hugging Face safetensors, plus config and tokenizer.

    ``specs`` are the (name, global shape, dtype) of ``module``'s state in the order ``items``
    yields them; ``items`` yields each tensor in full where ``out_dir`` is set (the writing rank)
    and None elsewhere, one at a time: it may run a collective per tensor, so every rank
    iterates it. Returns {"files", "bytes", "peakGroupBytes"}.
    """
    config, transform = export_transform(module.config)
    skip = _tied_targets(module)
    with torch.device("meta"):  # the exported names and shapes, computed without any weight
        planned: list[Spec] = []
        by_name = {name: (shape, dtype) for name, shape, dtype in specs}
        for group in _grouped((n, None) for n, _, _ in specs):
            fake = {n: torch.empty(by_name[n][0], dtype=by_name[n][1]) for n in group if n not in skip}
            planned.extend((n, tuple(t.shape), t.dtype) for n, t in transform(fake).items())
    files = plan_shards(planned, shard_bytes)
    names = ([f"model-{k + 1:05d}-of-{len(files):05d}.safetensors" for k in range(len(files))]
             if len(files) > 1 else ["model.safetensors"])
    where = {spec[0]: k for k, file in enumerate(files) for spec in file}
    peak = 0
    handles: dict[int, Any] = {}
    expected = {spec[0]: spec for spec in planned}
    remaining = [len(file) for file in files]
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    try:
        for group in _grouped(items):
            if out is None:
                continue
            kept = {n: t for n, t in group.items() if n not in skip}
            peak = max(peak, sum(t.numel() * t.element_size() for t in kept.values()))
            for name, tensor in transform(kept).items():
                k = where[name]
                if k not in handles:
                    handles[k] = open(out / names[k], "wb")  # noqa: SIM115 - closed when its last tensor is in
                    handles[k].write(_header(files[k]))
                want = expected[name]
                if tuple(tensor.shape) != want[1] or tensor.dtype != want[2]:
                    raise RuntimeError(f"export: {name} is {tuple(tensor.shape)} {tensor.dtype}, planned {want[1:]}")
                handles[k].write(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
                remaining[k] -= 1
                if remaining[k] == 0:
                    handles.pop(k).close()
    finally:
        for handle in handles.values():
            handle.close()
    total = sum(_nbytes(spec) for spec in planned)
    if out is None:
        return {"files": len(files), "bytes": total, "peakGroupBytes": 0}
    if any(remaining):
        raise RuntimeError(f"export: {sum(remaining)} planned tensors never arrived")
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {n: names[k] for n, k in where.items()}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    floating = [dtype for _, _, dtype in planned if dtype.is_floating_point]
    if hasattr(config, "write_hf_config"):  # crucible.trainer.llama's own Llama: no transformers import
        config.write_hf_config(out, floating[0] if floating else None)
    else:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            fresh = AutoModelForCausalLM.from_config(config)
        fresh.config.use_cache = True
        fresh.config.architectures = [type(fresh).__name__]  # what save_pretrained records
        if floating:
            fresh.config.dtype = floating[0]
        fresh.config.save_pretrained(out)
        if fresh.can_generate() and fresh.generation_config is not None:
            fresh.generation_config.save_pretrained(out)
    if tokenizer is not None:
        if isinstance(tokenizer, str | Path):
            copy_tokenizer_files(Path(tokenizer), out)
        else:
            tokenizer.save_pretrained(out)
    return {"files": len(files), "bytes": total, "peakGroupBytes": peak}


def copy_tokenizer_files(src: Path, dest: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dest / name)


def manifest_sha256(uri: str, store: st.Storage) -> str | None:
    """sha256 of ``<uri>/manifest.json`` (the DataPipeline receipt), None when there is none."""
    try:
        return hashlib.sha256(store.read_bytes(st.join(uri, "manifest.json"))).hexdigest()
    except st.StorageNotFound:
        return None


def publish(local_dir: str | Path, out_uri: str, store: st.Storage) -> None:
    """Copy a finished local folder to ``out_uri`` (nothing to do when it is the same path)."""
    if not st.is_s3(out_uri) and Path(out_uri).resolve() == Path(local_dir).resolve():
        return
    store.upload_dir(local_dir, out_uri)
