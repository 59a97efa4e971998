"""Our own Llama: the module a fresh ``architecture: llama`` PretrainRun trains, without importing transformers.

Importing ``transformers.models.llama.modeling_llama`` costs ≈ 3.3 s of CPU on an idle core here
(``torch._dynamo``, the hub-kernel and quantizer integrations, ``scipy.optimize`` through the
loss registry, ``torchao``), on the critical path of every attempt's start — first and restarted.
A fresh Llama needs none of it: this module is Hugging Face's ``LlamaForCausalLM`` (transformers
5.x, SDPA attention) rewritten with the same module tree, parameter names, signatures,
construction-time and ``post_init`` random draws (in the same order) and the same floating-point
operations, so

* a model built here from one seed holds bit for bit the weights transformers' would, and its
  per-step losses and gradients are bit for bit transformers' (``tests/trainer/test_llama.py``);
* every layout that walks the Hugging Face tree works on it unchanged: DDP, FSDP2
  (``model.layers`` as units), tensor and pipeline parallelism (:mod:`crucible.trainer.parallel.llama`
  calls ``rotary_emb`` and the decoder layers with transformers' keyword arguments and plans
  ``self_attn.q_proj`` … by name), DeepSpeed, activation checkpointing, the meta-device init
  (:mod:`crucible.trainer.meta_init`: ``_init_weights`` per module, as transformers has it);
* the export is a Hugging Face folder: :meth:`LlamaSettings.write_hf_config` writes the
  ``config.json`` and ``generation_config.json`` transformers writes for this model (byte for
  byte, tested), next to the safetensors :func:`crucible.trainer.output.write_hf_model` streams.

Anything beyond next-token training and scoring — ``generate``, a padded ``attention_mask``, a
KV cache, ``inputs_embeds`` — runs through :meth:`LlamaForCausalLM.transformers_view`: a
transformers ``LlamaForCausalLM`` sharing this module's parameters (transformers is imported then,
and only then). Mixtral (MoE) models and models read from a ``model.source`` stay transformers'.
"""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class LlamaSettings:
    """The fields of transformers' ``LlamaConfig`` a fresh Crucible Llama sets (the rest are its defaults)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rope_theta: float
    tie_word_embeddings: bool
    initializer_range: float
    eos_token_id: int | None = None
    rms_norm_eps: float = 1e-6
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    use_cache: bool = False

    model_type = "llama"
    hidden_act = "silu"
    attention_bias = False
    mlp_bias = False
    attention_dropout = 0.0
    pretraining_tp = 1
    _attn_implementation = "sdpa"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rope_parameters(self) -> dict[str, Any]:
        return {"rope_theta": float(self.rope_theta), "rope_type": "default"}

    def to_dict(self) -> dict[str, Any]:
        """``LlamaConfig(...).to_dict()``'s model fields (what ``config.json`` holds besides its header)."""
        return {
            "attention_bias": self.attention_bias, "attention_dropout": self.attention_dropout,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "head_dim": self.head_dim,
            "hidden_act": self.hidden_act, "hidden_size": self.hidden_size,
            "initializer_range": self.initializer_range, "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings, "mlp_bias": self.mlp_bias,
            "model_type": self.model_type, "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers, "num_key_value_heads": self.num_key_value_heads,
            "pad_token_id": self.pad_token_id, "pretraining_tp": self.pretraining_tp,
            "rms_norm_eps": self.rms_norm_eps, "rope_parameters": self.rope_parameters,
            "tie_word_embeddings": self.tie_word_embeddings, "use_cache": self.use_cache,
            "vocab_size": self.vocab_size,
        }

    def to_transformers(self) -> Any:
        """The same configuration as transformers' ``LlamaConfig`` (imports transformers)."""
        from transformers import LlamaConfig

        fields = self.to_dict()
        for derived in ("model_type", "head_dim"):
            fields.pop(derived)
        return LlamaConfig(**fields)

    def write_hf_config(self, out: Path, dtype: torch.dtype | None) -> None:
        """``config.json`` and ``generation_config.json`` as transformers' ``save_pretrained`` writes them
        for this model (``use_cache: true`` in the model config, as the export sets it)."""
        version = importlib.metadata.version("transformers")
        config = {**self.to_dict(), "architectures": ["LlamaForCausalLM"], "use_cache": True,
                  "transformers_version": version}
        if dtype is not None:
            config["dtype"] = str(dtype).removeprefix("torch.")
        generation: dict[str, Any] = {"_from_model_config": True}
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(self, key) is not None:
                generation[key] = getattr(self, key)
        generation.update({"output_attentions": False, "output_hidden_states": False,
                           "transformers_version": version, "use_cache": self.use_cache})
        out.mkdir(parents=True, exist_ok=True)
        for name, body in (("config.json", config), ("generation_config.json", generation)):
            (out / name).write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")


@dataclass
class CausalLMOutput:
    """What the training and scoring code reads of transformers' ``CausalLMOutputWithPast``."""

    loss: torch.Tensor | None
    logits: torch.Tensor


class LlamaRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def default_inv_freq(config: LlamaSettings) -> torch.Tensor:
    dim = config.head_dim
    return 1.0 / (float(config.rope_theta) ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


class LlamaRotaryEmbedding(nn.Module):
    def __init__(self, config: LlamaSettings) -> None:
        super().__init__()
        self.config = config
        self.rope_type = "default"
        self.attention_scaling = 1.0
        inv_freq = default_inv_freq(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaSettings) -> None:
        super().__init__()
        self.hidden_size, self.intermediate_size = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LlamaAttention(nn.Module):
    """Causal self-attention through ``F.scaled_dot_product_attention``, as transformers' ``sdpa`` path
    runs it without a mask (``is_causal``; grouped-query heads via ``enable_gqa``)."""

    def __init__(self, config: LlamaSettings, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim ** -0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        heads, kv = config.num_attention_heads, config.num_key_value_heads
        self.q_proj = nn.Linear(config.hidden_size, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, **_: Any) -> tuple[torch.Tensor, None]:
        if attention_mask is not None:
            raise ValueError("crucible's Llama attends causally without a mask; a masked forward goes "
                             "through LlamaForCausalLM.transformers_view()")
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)  # -1: the heads this rank holds under TP
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        q_length = query.shape[2]
        gqa = {"enable_gqa": True} if self.num_key_value_groups > 1 and key.shape[-1] == value.shape[-1] <= 256 else {}
        if self.num_key_value_groups > 1 and not gqa:
            key, value = (repeat_kv(t, self.num_key_value_groups) for t in (key, value))
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, scale=self.scaling,
                                             is_causal=q_length > 1, **gqa)
        out = out.reshape(out.shape[0], -1, q_length, value.shape[-1]).transpose(1, 2).contiguous()
        out = out.reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), None


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    batch, kv_heads, slen, head_dim = hidden_states.shape
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, kv_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, kv_heads * n_rep, slen, head_dim)


class LlamaDecoderLayer(nn.Module):
    gradient_checkpointing = False

    def __init__(self, config: LlamaSettings, layer_idx: int) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs: Any) -> torch.Tensor:
        assert position_embeddings is not None
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            out: torch.Tensor = checkpoint(self._block, hidden_states, attention_mask, position_embeddings,
                                           use_reentrant=False)
            return out
        return self._block(hidden_states, attention_mask, position_embeddings)

    def _block(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
               position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask,
                                          position_embeddings=position_embeddings)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


def _init_weights(config: LlamaSettings, module: nn.Module) -> None:
    """transformers' ``PreTrainedModel._init_weights`` for the module types of a Llama."""
    std = config.initializer_range or 0.02
    with torch.no_grad():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                nn.init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, LlamaRMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, LlamaRotaryEmbedding):
            value = default_inv_freq(module.config)
            module.inv_freq.copy_(value)
            module.original_inv_freq.copy_(value)


def _initialize(config: LlamaSettings, root: nn.Module, done: set[int]) -> None:
    """transformers' ``initialize_weights``: children before parents (``smart_apply``), each module once."""
    for child in root.children():
        _initialize(config, child, done)
    if id(root) not in done:
        _init_weights(config, root)
        done.add(id(root))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaSettings, initialized: set[int]) -> None:
        super().__init__()
        self.config = config
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config)
        self.gradient_checkpointing = False
        _initialize(config, self, initialized)  # the sub-model's post_init, in the middle of its parent's build

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        if position_ids is None:
            position_ids = torch.arange(hidden_states.shape[1], device=hidden_states.device).unsqueeze(0)
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = layer(hidden_states, attention_mask=None, position_embeddings=position_embeddings,
                                  position_ids=position_ids)
        out: torch.Tensor = self.norm(hidden_states)
        return out


class LlamaForCausalLM(nn.Module):
    """transformers' ``LlamaForCausalLM`` for training and scoring: ``forward(input_ids, labels)`` →
    ``.logits``, ``.loss`` (the mean next-token cross-entropy, ``-100`` ignored)."""

    def __init__(self, config: LlamaSettings) -> None:
        super().__init__()
        self.config = config
        initialized: set[int] = set()
        self.model = LlamaModel(config, initialized)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        _initialize(config, self, initialized)
        self.all_tied_weights_keys = ({"lm_head.weight": "model.embed_tokens.weight"}
                                      if config.tie_word_embeddings else {})
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _init_weights(self, module: nn.Module) -> None:
        """One module's init (:func:`crucible.trainer.meta_init.init_non_random` calls it as transformers')."""
        _init_weights(self.config, module)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        kwargs = gradient_checkpointing_kwargs or {}
        if kwargs.get("use_reentrant", False):
            raise ValueError("crucible's Llama checkpoints activations without re-entrance (use_reentrant=False)")
        for layer in self.model.layers:
            assert isinstance(layer, LlamaDecoderLayer)
            layer.gradient_checkpointing = True

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, use_cache: bool | None = None,
                position_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        plain = (input_ids is not None and not use_cache and not kwargs
                 and (attention_mask is None or bool(attention_mask.all())))
        if not plain:  # padding, a cache, embeddings in, extra outputs: transformers' own forward
            return self.transformers_view()(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                                            use_cache=use_cache, position_ids=position_ids, **kwargs)
        assert input_ids is not None
        hidden_states = self.model(input_ids, position_ids=position_ids)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            flat = logits.float().view(-1, self.config.vocab_size)
            shifted = F.pad(labels, (0, 1), value=-100)[..., 1:].contiguous().view(-1).to(flat.device)
            loss = F.cross_entropy(flat, shifted, ignore_index=-100, reduction="mean")
        return CausalLMOutput(loss=loss, logits=logits)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.transformers_view().generate(*args, **kwargs)

    def transformers_view(self) -> Any:
        """A transformers ``LlamaForCausalLM`` over this module's own parameters and buffers (no copy):
        what it computes and what gradients it makes are this model's. Built per call (cheap once
        transformers is imported), so it follows parameters a strategy has replaced since."""
        from transformers import LlamaForCausalLM as HFLlama

        with torch.device("meta"):
            view = HFLlama(self.config.to_transformers())
        view.config.use_cache = self.config.use_cache
        mine = dict(self.named_modules())
        for name, module in view.named_modules():
            source = mine.get(name)
            if source is None:
                continue
            for pname, _ in list(module.named_parameters(recurse=False)):
                setattr(module, pname, getattr(source, pname))
            for bname, _ in list(module.named_buffers(recurse=False)):
                module._buffers[bname] = getattr(source, bname)
        leftover = [n for n, t in [*view.named_parameters(), *view.named_buffers()] if t.is_meta]
        if leftover:
            raise RuntimeError(f"transformers_view: {len(leftover)} tensors have no counterpart, e.g. {leftover[:3]}")
        view.train(self.training)
        return view

