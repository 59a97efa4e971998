"""The stage's artefact: a Hugging Face model folder and the ``_SUCCESS`` lineage receipt.

``<output.uri>`` holds ``config.json``, ``model.safetensors``, ``generation_config.json``
and the tokenizer files, loadable by ``AutoModelForCausalLM.from_pretrained``. ``_SUCCESS``
is written LAST: ``{"stage", "finishedAt", "inputs": {...}, "results": {...}}`` where
``inputs`` records each input URI and the sha256 of the input's ``manifest.json`` (the
DataPipeline receipt), so a model names exactly the data it was trained on.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from crucible.trainer import storage as st
from crucible.trainer.config.receipt import check_existing, identity
from crucible.trainer.faults import write_success_message

SUCCESS = "_SUCCESS"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def save_hf_model(module: torch.nn.Module, state: dict[str, torch.Tensor], out_dir: str | Path, tokenizer: Any) -> None:
    """Write ``state`` as a Hugging Face model of ``module``'s class and config, plus the tokenizer."""
    from transformers import AutoModelForCausalLM

    config = module.config
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


def success_exists(out_uri: str, store: st.Storage, config: BaseModel) -> bool:
    """True when ``out_uri`` holds this run's ``_SUCCESS``; ForeignResultError when another's."""
    where = st.join(out_uri, SUCCESS)
    if not store.exists(where):
        return False
    check_existing(store.read_bytes(where), config, where)
    return True


def publish(local_dir: str | Path, out_uri: str, store: st.Storage) -> None:
    """Copy a finished local folder to ``out_uri`` (nothing to do when it is the same path)."""
    if not st.is_s3(out_uri) and Path(out_uri).resolve() == Path(local_dir).resolve():
        return
    store.upload_dir(local_dir, out_uri)


def write_success(
    out_uri: str,
    store: st.Storage,
    stage: str,
    inputs: dict[str, Any],
    results: dict[str, Any],
    config: BaseModel,
) -> dict[str, Any]:
    receipt = {
        "stage": stage,
        **identity(config),
        "finishedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "inputs": inputs,
        "results": results,
    }
    store.write_bytes(st.join(out_uri, SUCCESS), json.dumps(receipt, indent=2, allow_nan=False, default=str).encode())
    write_success_message(receipt)
    return receipt
