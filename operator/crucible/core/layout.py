"""Parallel layouts for ``crucible plan``: parameters (total and active for MoE), memory per GPU of a
``training.parallelism`` layout, and a suggested layout for a model and a cluster. Pure; no torch.

Memory per GPU (bf16 compute with fp32 master weights, as the trainer runs on CUDA):

* model states: fp32 weights + fp32 gradients + AdamW's two fp32 moments = 16 bytes per
  parameter, over ``tensor × pipeline`` (each rank holds one stage's tensor shard) and sharded by
  FSDP over ``dataShard``; plus the bf16 copy of the two blocks FSDP gathers (one computing, one
  prefetched);
* activations (Korthikanti et al. 2022, sequence parallel + flash attention): ``34·s·b·h / t``
  bytes per block and micro-batch, or ``2·s·b·h / t`` with activation checkpointing (the block
  input), for the blocks of a stage times the micro-batches 1F1B keeps in flight on the first
  stage (``pipeline``), plus the fp32 logits of one micro-batch on the last stage (``4·s·b·V / t``).

It is an estimate for choosing a layout (allocator slack, NCCL buffers and fragmentation come on
top: keep ~10–15% free), not a promise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from crucible.trainer.config.training import ModelConfig

GIB = 1024**3
#: HBM per GPU (GiB as sold, GB on the data sheets)
GPU_MEMORY_GIB = {"h100": 80, "h200": 141, "b200": 180, "a100": 80, "l40s": 48, "l4": 24, "a10g": 24, "mi300x": 192}


def dense_width(model: ModelConfig) -> int:
    return model.intermediate_size or (int(64 * round(8 * model.hidden_size / 3 / 64)) or 64)


def model_parameters(model: ModelConfig, vocab: int) -> tuple[int, int, int]:
    """(total, active per token, active in matmuls) parameters of a Llama or Mixtral shape.

    Active counts ``topK`` of each MoE block's experts (plus its router); the matmul count leaves
    out the input embedding (a lookup) but keeps the output projection even when tied.
    """
    d = model.hidden_size
    heads = model.num_heads
    kv = model.num_kv_heads or heads
    head_dim = d // heads
    attention = d * heads * head_dim + 2 * d * kv * head_dim + heads * head_dim * d
    dense_mlp = 3 * d * dense_width(model)
    moe = model.moe_config
    total_body = active_body = 0
    for i in range(model.num_layers):
        norms = 2 * d
        if moe is not None and (i + 1) % moe.every_n_layers == 0:
            expert = 3 * d * (moe.expert_intermediate_size or dense_width(model))
            router = moe.num_experts * d
            total_body += attention + norms + router + moe.num_experts * expert
            active_body += attention + norms + router + moe.top_k * expert
        else:
            total_body += attention + norms + dense_mlp
            active_body += attention + norms + dense_mlp
    total_body += d
    active_body += d
    embedding = vocab * d
    output = 0 if model.tie_word_embeddings else vocab * d
    return total_body + embedding + output, active_body + embedding + output, active_body + vocab * d


@dataclass(frozen=True)
class LayoutMemory:
    layout: tuple[int, int, int, int]  # (dataReplicate, dataShard, pipeline, tensor)
    states_gib: float
    gathered_gib: float
    activations_gib: float

    @property
    def total_gib(self) -> float:
        return self.states_gib + self.gathered_gib + self.activations_gib

    def describe(self) -> str:
        r, s, p, t = self.layout
        return f"dataReplicate {r} × dataShard {s} × pipeline {p} × tensor {t}"


def layout_memory(model: ModelConfig, vocab: int, training: Any, layout: tuple[int, int, int, int]) -> LayoutMemory:
    """Estimated peak memory per GPU of ``layout`` for this model and ``training`` (a TrainingConfig)."""
    _, shard, pipeline, tensor = layout
    total, _, _ = model_parameters(model, vocab)
    per_rank = total / (tensor * pipeline)
    states = 16.0 * per_rank / shard
    block = (total - 2 * vocab * model.hidden_size) / max(model.num_layers, 1)
    gathered = 2 * 2.0 * block / tensor  # bf16, the computing block and the prefetched one
    s, b, h = training.seq_len, training.micro_batch_size, model.hidden_size
    per_block = (2.0 if training.activation_checkpointing else 34.0) * s * b * h / tensor
    blocks_per_stage = -(-model.num_layers // pipeline)
    in_flight = pipeline if pipeline > 1 else 1
    activations = per_block * blocks_per_stage * in_flight + 4.0 * s * b * vocab / tensor
    return LayoutMemory(layout, states / GIB, gathered / GIB, activations / GIB)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def suggest_layout(model: ModelConfig, vocab: int, training: Any, nodes: int, gpus_per_node: int,
                   gpu_memory_gib: float, headroom: float = 0.85) -> LayoutMemory | None:
    """The layout with the least model parallelism whose estimate fits ``headroom`` of GPU memory.

    Tensor parallel first (inside a node, up to gpusPerNode, dividing the heads), then pipeline
    stages across nodes, the rest FSDP; ties go to fewer pipeline stages (no bubble). None: no
    layout fits (more GPUs, activation checkpointing or a smaller micro-batch).
    """
    world = nodes * gpus_per_node
    kv = model.num_kv_heads or model.num_heads
    moe = model.moe_config is not None
    options = []
    for tensor in _divisors(gpus_per_node):
        if model.num_heads % tensor or kv % tensor or training.seq_len % tensor or (moe and tensor > 1):
            continue
        for pipeline in _divisors(world // tensor):
            if pipeline > model.num_layers or (pipeline > 1 and model.tie_word_embeddings):
                continue
            shard = world // (tensor * pipeline)
            estimate = layout_memory(model, vocab, training, (1, shard, pipeline, tensor))
            if estimate.total_gib <= headroom * gpu_memory_gib:
                options.append((tensor * pipeline, pipeline, estimate))
    if not options:
        return None
    return min(options, key=lambda o: (o[0], o[1]))[2]
