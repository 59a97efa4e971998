"""LoRA / QLoRA through PEFT: wrap a base model, check the environment, export merged or adapter.

* :func:`check_method` runs before anything is loaded: QLoRA needs CUDA and bitsandbytes, and a
  machine without them gets an error saying so (exit 2) instead of a crash mid-run.
* :func:`load_base` loads the base model for a method (4-bit NF4 with double quantization and
  bf16 compute for QLoRA, full precision otherwise); :func:`wrap` adds the adapters. Only
  adapter weights have ``requires_grad``, so the engine's optimizer covers exactly them.
* :func:`export` writes what ``mergeAdapter`` asks for from the trained state (gathered on rank 0
  by the engine's strategy): the merged model (base reloaded in full precision — never merged
  into 4-bit weights — adapters applied, ``merge_and_unload``), a plain Hugging Face model; or
  the adapter alone (``adapter_config.json`` + ``adapter_model.safetensors``, loadable with
  ``peft.AutoPeftModelForCausalLM`` or ``transformers`` with peft installed).
* Target modules that the model does not have are an error naming ``spec.lora.targetModules``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from crucible.trainer.config.stages import LoraConfig
from crucible.trainer.faults import SpecError


def check_method(method: str, field: str = "spec.method") -> None:
    """Fail before loading anything when ``method`` cannot run on this machine."""
    if method != "qlora":
        return
    if not torch.cuda.is_available():
        raise SpecError(
            f"{field}: qlora needs a CUDA GPU (bitsandbytes 4-bit kernels) and this machine has none; "
            "use method lora, or request GPUs in spec.resources"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise SpecError(f"{field}: qlora needs bitsandbytes, which this image lacks: pip install bitsandbytes")


def load_base(model_dir: str | Path, method: str, model_class: Any = None, **kwargs: Any) -> Any:
    """The base model for ``method`` (fp32 on CPU / full precision; NF4 4-bit for qlora)."""
    from transformers import AutoModelForCausalLM

    cls = model_class or AutoModelForCausalLM
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        local_rank = int(__import__("os").environ.get("LOCAL_RANK", "0"))
        model = cls.from_pretrained(
            str(model_dir), quantization_config=quant, dtype=torch.bfloat16, device_map={"": local_rank}, **kwargs
        )
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = cls.from_pretrained(str(model_dir), dtype=torch.float32, **kwargs)
    model.config.use_cache = False
    return model


def peft_config(lora: LoraConfig, task_type: str = "CAUSAL_LM") -> Any:
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft annotates int, accepts float
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type=task_type,
    )


def check_targets(model: torch.nn.Module, lora: LoraConfig, field: str = "spec.lora.targetModules") -> None:
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in lora.target_modules if t not in names]
    if len(missing) == len(lora.target_modules):
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise SpecError(f"{field}: none of {missing} is a module of this model; its linear layers are {linear}")
    if missing:
        raise SpecError(f"{field}: {missing} are not modules of this model; remove them")


def wrap(model: torch.nn.Module, lora: LoraConfig, task_type: str = "CAUSAL_LM", seed: int = 0) -> Any:
    """The PEFT model with adapters on ``lora.targetModules``; only adapter weights train."""
    from peft import get_peft_model

    check_targets(model, lora)
    torch.manual_seed(seed)  # adapter init identical on every rank
    # With task_type SEQ_CLS, PEFT keeps the new reward head ("score") trainable itself
    # (modules_to_save), so only the adapters and that head train.
    return get_peft_model(model, peft_config(lora, task_type))


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def export(
    state: dict[str, torch.Tensor],
    out_dir: str | Path,
    base_dir: str | Path,
    base_uri: str,
    lora: LoraConfig | None,
    merge: bool,
    tokenizer: Any,
    model_class: Any = None,
    task_type: str = "CAUSAL_LM",
    config_overrides: dict[str, Any] | None = None,
) -> str:
    """Write the trained model into ``out_dir`` from its full state dict; returns what was written.

    ``state`` has the keys of the trained module (a PeftModel's when ``lora`` is set). The base is
    reloaded in full precision from ``base_dir`` so merging never touches quantized weights.
    """
    from transformers import AutoModelForCausalLM

    cls = model_class or AutoModelForCausalLM
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kwargs = dict(config_overrides or {})
    if lora is None:
        with torch.device("meta"):
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(str(base_dir), **kwargs)
            fresh = cls.from_config(config)
        fresh.load_state_dict(state, assign=True, strict=True)
        written = "model"
    else:
        base = cls.from_pretrained(str(base_dir), dtype=torch.float32, **kwargs)
        peft_model = wrap(base, lora, task_type)
        result = peft_model.load_state_dict(state, strict=False)
        adapter_missing = [k for k in result.missing_keys if "lora_" in k or "score" in k]
        if adapter_missing or result.unexpected_keys:
            raise RuntimeError(
                f"the trained state does not fit the adapter layout: missing {adapter_missing[:3]}, "
                f"unexpected {result.unexpected_keys[:3]}"
            )
        if merge:
            fresh = peft_model.merge_and_unload()
            written = "merged model"
        else:
            peft_model.peft_config["default"].base_model_name_or_path = base_uri
            peft_model.save_pretrained(str(out))  # a reward head travels as a PEFT modules_to_save weight
            if tokenizer is not None:
                tokenizer.save_pretrained(str(out))
            return "adapter"
    fresh.config.use_cache = True
    fresh.save_pretrained(str(out), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return written
