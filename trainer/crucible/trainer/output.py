"""A training stage's artefact: a Hugging Face model folder.

``<output.uri>`` holds ``config.json``, ``model.safetensors``, ``generation_config.json``
and the tokenizer files, loadable by ``AutoModelForCausalLM.from_pretrained``. The
``_SUCCESS`` receipt is written last by :func:`crucible.trainer.stage_io.write_success`;
its ``inputs`` record the sha256 of the input's ``manifest.json`` (the DataPipeline receipt,
:func:`manifest_sha256`), so a model names exactly the data it was trained on.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import torch

from crucible.trainer import storage as st

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


def publish(local_dir: str | Path, out_uri: str, store: st.Storage) -> None:
    """Copy a finished local folder to ``out_uri`` (nothing to do when it is the same path)."""
    if not st.is_s3(out_uri) and Path(out_uri).resolve() == Path(local_dir).resolve():
        return
    store.upload_dir(local_dir, out_uri)
