"""The causal LM: a Llama built from :class:`ModelConfig`, or a Hugging Face model from a dir / s3 prefix."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from crucible.trainer import storage as st
from crucible.trainer.config.training import ModelConfig
from crucible.trainer.faults import SpecError


def intermediate_size(cfg: ModelConfig) -> int:
    if cfg.intermediate_size:
        return cfg.intermediate_size
    return int(64 * round(8 * cfg.hidden_size / 3 / 64)) or 64


def llama_config(cfg: ModelConfig, vocab_size: int, eos_id: int | None = None) -> Any:
    """transformers' ``LlamaConfig`` of :func:`llama_settings` (one list of fields for both models)."""
    return llama_settings(cfg, vocab_size, eos_id).to_transformers()


def llama_settings(cfg: ModelConfig, vocab_size: int, eos_id: int | None = None) -> Any:
    """The Llama shape of ``cfg`` for :mod:`crucible.trainer.llama`'s own Llama (no transformers import)."""
    from crucible.trainer.llama import LlamaSettings

    return LlamaSettings(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=intermediate_size(cfg),
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=float(cfg.rope_theta),
        tie_word_embeddings=cfg.tie_word_embeddings,
        initializer_range=cfg.initializer_range,
        eos_token_id=eos_id,
    )


def _check_vocab(cfg: ModelConfig, vocab_size: int) -> None:
    if cfg.vocab_size is not None and cfg.vocab_size < vocab_size:
        raise SpecError(
            f"model.vocabSize ({cfg.vocab_size}) is smaller than the data's vocabulary ({vocab_size}); "
            "leave it empty to take the tokenizer's size"
        )


def build_model(cfg: ModelConfig, vocab_size: int, seed: int, eos_id: int | None = None) -> torch.nn.Module:
    """A freshly initialised causal LM (fp32, CPU); identical on every rank for one seed.

    ``architecture: llama``: :mod:`crucible.trainer.llama`'s Llama (bit for bit transformers'
    ``LlamaForCausalLM``, without importing transformers); ``mixtral``: transformers' Llama with
    MoE blocks. The same weights as :func:`build_meta_model` followed by materialising it (tested).
    """
    _check_vocab(cfg, vocab_size)
    torch.manual_seed(seed)
    if cfg.architecture == "llama":
        from crucible.trainer.llama import LlamaForCausalLM as NativeLlama

        return NativeLlama(llama_settings(cfg, cfg.vocab_size or vocab_size, eos_id))
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(llama_config(cfg, cfg.vocab_size or vocab_size, eos_id))
    model.config.use_cache = False
    if cfg.architecture == "mixtral":
        from crucible.trainer.moe import expert_width, install_moe

        moe = cfg.moe_config
        assert moe is not None
        install_moe(model, moe, expert_width(cfg), cfg.initializer_range, seed)
    return model


def build_meta_model(cfg: ModelConfig, vocab_size: int, seed: int, eos_id: int | None = None) -> torch.nn.Module:
    """:func:`build_model`'s model on the ``meta`` device, holding no memory.

    The strategy shards it first and then materialises it (:mod:`crucible.trainer.meta_init`):
    every rank allocates only its own shards and fills them with exactly the values
    :func:`build_model` would give, one full tensor at a time.
    """
    from crucible.trainer.meta_init import DeferredInit, record_construction

    _check_vocab(cfg, vocab_size)
    if cfg.architecture == "llama":  # ours: no transformers import on the way to the first step
        from crucible.trainer.llama import LlamaForCausalLM as NativeLlama

        settings = llama_settings(cfg, cfg.vocab_size or vocab_size, eos_id)
        native, native_draws = record_construction(lambda: NativeLlama(settings), transformers_model=False)

        def native_twin() -> torch.nn.Module:
            with torch.device("meta"):
                return NativeLlama(settings)

        native._crucible_deferred_init = DeferredInit(native_draws, native_twin, seed)  # type: ignore[assignment]
        return native
    from transformers import LlamaForCausalLM

    config = llama_config(cfg, cfg.vocab_size or vocab_size, eos_id)
    model: Any
    model, draws = record_construction(lambda: LlamaForCausalLM(config))
    model.config.use_cache = False

    def twin() -> torch.nn.Module:
        with torch.device("meta"):
            return LlamaForCausalLM(llama_config(cfg, cfg.vocab_size or vocab_size, eos_id))

    init = DeferredInit(draws, twin, seed)
    if cfg.architecture == "mixtral":
        from crucible.trainer.moe import expert_width, install_moe, seeded_moe_init

        moe = cfg.moe_config
        assert moe is not None
        with torch.device("meta"):
            install_moe(model, moe, expert_width(cfg), cfg.initializer_range, seed=None)
        init.then(seeded_moe_init(model, cfg.initializer_range, seed))
    model._crucible_deferred_init = init  # type: ignore[assignment]
    return model


def adopt_source(model: torch.nn.Module, cfg: ModelConfig, uri: str) -> torch.nn.Module:
    """A loaded source model as the trainer's module for ``model.architecture``.

    A Mixtral becomes a Llama with MoE blocks (our routing: capacity, auxiliary losses, counters);
    a Llama stays as it is. A family the spec did not ask for is refused.
    """
    family = getattr(model.config, "model_type", "")
    if family == "mixtral":
        if cfg.architecture != "mixtral":
            raise SpecError(
                f"model.architecture: the source {uri} is a Mixtral (mixture-of-experts) model; set "
                "architecture: mixtral"
            )
        from crucible.trainer.moe import from_mixtral

        return from_mixtral(model, cfg.moe)
    if cfg.architecture == "mixtral":
        raise SpecError(
            f"model.architecture: mixtral, but the source {uri} is a {family or 'non-Mixtral'} model; "
            "set architecture: llama (or start a Mixtral from scratch without source)"
        )
    return model


def source_meta_model(local: Path, uri: str) -> torch.nn.Module | None:
    """A Hugging Face Llama folder's model on ``meta``, to be filled from its safetensors slice by slice.

    The strategy shards it, then each rank reads only the slices of the tensors it holds
    (:class:`crucible.trainer.meta_init.SafetensorsInit`; ``.bytes_read`` counts them). None when
    the folder needs the whole-model path: no safetensors, or not a Llama (a Mixtral is converted).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from crucible.trainer.meta_init import SafetensorsInit

    if not (local / "config.json").is_file():
        raise SpecError(f"model.source.uri {uri}: no config.json there; point it at a Hugging Face model folder")
    if not ((local / "model.safetensors.index.json").is_file() or (local / "model.safetensors").is_file()):
        return None
    config = AutoConfig.from_pretrained(local)
    if getattr(config, "model_type", "") != "llama":
        return None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.use_cache = False

    def twin() -> torch.nn.Module:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=torch.float32)

    model._crucible_deferred_init = SafetensorsInit(local, twin, uri)  # type: ignore[assignment]
    return model


def load_pretrained(uri: str, store: st.Storage, cache_dir: str | None = None,
                    label: str | None = None) -> tuple[torch.nn.Module, Path]:
    """A Hugging Face causal LM, whole, from a local directory or an ``s3://`` prefix (fp32 for training).

    ``label``: the URI the user gave, for messages, when ``uri`` is already a local copy of it.
    """
    from transformers import AutoModelForCausalLM

    local = store.local_path(uri, cache_dir or tempfile.mkdtemp(prefix="crucible-model-"), field="model.source.uri")
    if not (Path(local) / "config.json").is_file():
        raise SpecError(f"model.source.uri {label or uri}: no config.json there; point it at a Hugging Face "
                        "model folder")
    model = AutoModelForCausalLM.from_pretrained(local, dtype=torch.float32)
    model.config.use_cache = False
    return model, Path(local)
