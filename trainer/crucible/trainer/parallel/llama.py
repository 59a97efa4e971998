"""A Hugging Face Llama (dense or with MoE blocks) cut into pipeline stages and split by tensor.

:class:`LlamaStage` runs a Llama's own modules (embedding, decoder blocks, norm, head) with our
forward, so a stage may hold any run of blocks and the sequence may arrive sharded (sequence
parallel): positions come from the full length. Parameter names stay the Hugging Face ones
(``model.layers.7.self_attn.q_proj.weight``) whatever the layout, so checkpoints of every layout
are interchangeable and the export is the usual one.

The tensor-parallel plan (Megatron-style, as torchtitan writes it for Llama): the embedding is
split by vocabulary rows and hands on sequence shards; RMSNorms run sequence-parallel on their
shard; q/k/v and gate/up are column-wise (whole heads per rank), o and down row-wise with a
reduce-scatter back to sequence shards; the output projection is column-wise and the loss is
computed on the vocabulary shards (``loss_parallel``), so full logits never exist on one rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def split_layers(num_layers: int, chunks: int) -> list[list[int]]:
    """Decoder blocks of each pipeline chunk, as even as possible (earlier chunks one more)."""
    base, extra = divmod(num_layers, chunks)
    out, start = [], 0
    for c in range(chunks):
        n = base + (1 if c < extra else 0)
        out.append(list(range(start, start + n)))
        start += n
    return out


class LlamaStage(nn.Module):
    """Blocks ``layer_ids`` of a LlamaForCausalLM, with the embedding if first, norm and head if last."""

    def __init__(self, hf: nn.Module, layer_ids: list[int], first: bool, last: bool) -> None:
        super().__init__()
        inner: Any = hf.model  # type: ignore[union-attr]
        self.config = hf.config
        layers = inner.layers
        inner.layers = nn.ModuleDict({str(i): layers[i] for i in layer_ids})  # names stay layers.<i>
        if not first:
            inner.embed_tokens = None
        if not last:
            inner.norm = None
        self.model = inner
        self.lm_head = hf.lm_head if last else None  # type: ignore[union-attr]
        self.first, self.last = first, last
        self.sequence_shards = 1  # tensor degree when the residual stream is sequence-sharded
        self.loss_parallel = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """input ids (B, T) on the first stage, else hidden (B, T/sp, H); logits (B, T, V) on the last."""
        inner: Any = self.model
        h = inner.embed_tokens(x) if self.first else x  # (B, T/sp, H)
        seq = h.shape[1] * self.sequence_shards
        position_ids = torch.arange(seq, device=h.device).unsqueeze(0)
        position_embeddings = inner.rotary_emb(h, position_ids=position_ids)
        for layer in inner.layers.values():
            h = layer(h, attention_mask=None, position_embeddings=position_embeddings, position_ids=position_ids)
        if not self.last:
            return h
        head: Any = self.lm_head
        return head(inner.norm(h))  # (B, T, V), vocabulary-sharded under TP

    def loss_context(self) -> contextlib.AbstractContextManager[Any]:
        if self.loss_parallel:
            from torch.distributed.tensor.parallel import loss_parallel

            return loss_parallel()
        return contextlib.nullcontext()


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting labels[t+1] at t — what Hugging Face's causal-LM loss computes."""
    shifted = F.pad(labels, (0, 1), value=-100)[..., 1:]  # (B, T)
    return F.cross_entropy(logits.flatten(0, 1).float(), shifted.flatten().to(logits.device), ignore_index=-100)


class WholeModel(nn.Module):
    """A single-stage model with the Hugging Face call signature the objectives use."""

    def __init__(self, stage: LlamaStage) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **_: Any) -> Any:
        logits = self.stage(input_ids)
        loss = None
        if labels is not None:
            with self.stage.loss_context():
                loss = next_token_loss(logits, labels)
            if hasattr(loss, "full_tensor"):
                loss = loss.full_tensor()
        return SimpleNamespace(loss=loss, logits=logits)


def tensor_parallel(stage: LlamaStage, tp_mesh: Any) -> None:
    """Apply the Llama TP plan above to ``stage`` in place (sequence parallel + loss parallel)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    from crucible.trainer.moe import MoEBlock

    tp = tp_mesh.size()
    plan: dict[str, Any] = {}
    if stage.first:
        plan["model.embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if stage.last:
        plan["model.norm"] = SequenceParallel()
        plan["lm_head"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False)
    parallelize_module(stage, tp_mesh, plan)
    for layer in stage.model.layers.values():
        if isinstance(layer.mlp, MoEBlock):
            raise NotImplementedError("MoE blocks are not tensor-parallel")
        attn = layer.self_attn
        for name in ("num_heads", "num_key_value_heads"):
            if hasattr(attn, name):
                setattr(attn, name, getattr(attn, name) // tp)
        parallelize_module(layer, tp_mesh, {
            "input_layernorm": SequenceParallel(),
            "self_attn": PrepareModuleInput(
                input_kwarg_layouts={"hidden_states": Shard(1)},
                desired_input_kwarg_layouts={"hidden_states": Replicate()},
            ),
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
            "post_attention_layernorm": SequenceParallel(),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
        })
    stage.sequence_shards = tp
    stage.loss_parallel = stage.last


def stage_modules(stage_root: nn.Module) -> Iterator[nn.Module]:
    """The decoder blocks (FSDP units)."""
    inner: Any = getattr(stage_root, "model", None)
    yield from (inner.layers.values() if inner is not None else [])
