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

Expert parallelism (``parallelism.expert`` = EP) leaves the model states per GPU as they are —
the experts were already sharded over ``dataShard`` by FSDP; with EP each rank holds
numExperts / EP whole experts, FSDP-sharded over dataShard / EP ranks: the same bytes — but FSDP
gathers only a rank's own experts, so the experts' share of the gathered blocks is divided by EP
(and the routed tokens travel by all-to-all instead of all experts' weights by all-gather).

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


def expert_parameters(model: ModelConfig) -> int:
    """Parameters of all MoE experts (router excluded): the part expert parallelism splits."""
    moe = model.moe_config
    if moe is None:
        return 0
    blocks = sum(1 for i in range(model.num_layers) if (i + 1) % moe.every_n_layers == 0)
    return blocks * moe.num_experts * 3 * model.hidden_size * (moe.expert_intermediate_size or dense_width(model))


def _expert_degree(training: Any) -> int:
    par = getattr(training, "parallelism", None)
    return int(getattr(par, "expert", 1) or 1) if par is not None else 1


def _gathered_block(model: ModelConfig, total: int, vocab: int, expert: int) -> float:
    """Parameters FSDP gathers for one block (on average), the experts counted 1/expert."""
    experts = expert_parameters(model)
    return (total - 2 * vocab * model.hidden_size - experts * (1 - 1 / expert)) / max(model.num_layers, 1)


@dataclass(frozen=True)
class LayoutMemory:
    layout: tuple[int, int, int, int]  # (dataReplicate, dataShard, pipeline, tensor)
    states_gib: float
    gathered_gib: float
    activations_gib: float
    expert: int = 1

    @property
    def total_gib(self) -> float:
        return self.states_gib + self.gathered_gib + self.activations_gib

    def describe(self) -> str:
        r, s, p, t = self.layout
        return f"dataReplicate {r} × dataShard {s} × pipeline {p} × tensor {t}" + (
            f" (expert {self.expert})" if self.expert > 1 else "")


def layout_memory(model: ModelConfig, vocab: int, training: Any, layout: tuple[int, int, int, int],
                  expert: int | None = None) -> LayoutMemory:
    """Estimated peak memory per GPU of ``layout`` for this model and ``training`` (a TrainingConfig);
    ``expert``: the expert-parallel degree (None: ``training.parallelism.expert``)."""
    _, shard, pipeline, tensor = layout
    expert = _expert_degree(training) if expert is None else expert
    total, _, _ = model_parameters(model, vocab)
    per_rank = total / (tensor * pipeline)
    states = 16.0 * per_rank / shard
    block = _gathered_block(model, total, vocab, expert)
    gathered = 2 * 2.0 * block / tensor  # bf16, the computing block and the prefetched one
    s, b, h = training.seq_len, training.micro_batch_size, model.hidden_size
    per_block = (2.0 if training.activation_checkpointing else 34.0) * s * b * h / tensor
    blocks_per_stage = -(-model.num_layers // pipeline)
    in_flight = pipeline if pipeline > 1 else 1
    activations = per_block * blocks_per_stage * in_flight + 4.0 * s * b * vocab / tensor
    return LayoutMemory(layout, states / GIB, gathered / GIB, activations / GIB, expert)


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
            expert = _expert_degree(training)  # the spec's expert degree where this layout allows it
            expert = expert if shard % expert == 0 else 1
            estimate = layout_memory(model, vocab, training, (1, shard, pipeline, tensor), expert=expert)
            if estimate.total_gib <= headroom * gpu_memory_gib:
                options.append((tensor * pipeline, pipeline, estimate))
    if not options:
        return None
    return min(options, key=lambda o: (o[0], o[1]))[2]


# -- memory per GPU of any strategy (``crucible plan``) ------------------------------------------


@dataclass(frozen=True)
class MemoryBreakdown:
    """Estimated peak memory per GPU (GiB) of one training configuration, part by part.

    ``activations_gib`` is for the spec's ``activationCheckpointing`` setting and
    ``activations_other_gib`` for the other one, so the plan can say what the switch buys.
    ``staging_host_gib`` is host memory (pinned CPU buffers the asynchronous checkpoint copies
    this rank's state into), not GPU memory, and is not part of ``total_gib``.
    """

    setup: str  # e.g. "fsdp over 16 GPUs, bf16"
    parameters_gib: float
    gradients_gib: float
    optimizer_gib: float
    gathered_gib: float
    activations_gib: float
    activations_other_gib: float
    staging_host_gib: float
    activation_checkpointing: bool

    @property
    def total_gib(self) -> float:
        return (self.parameters_gib + self.gradients_gib + self.optimizer_gib + self.gathered_gib
                + self.activations_gib)

    def to_json(self) -> dict[str, Any]:
        return {
            "setup": self.setup, "parameters": round(self.parameters_gib, 2), "gradients": round(self.gradients_gib, 2),
            "optimizer": round(self.optimizer_gib, 2), "gathered": round(self.gathered_gib, 2),
            "activations": round(self.activations_gib, 2),
            "activationsWithCheckpointing" if not self.activation_checkpointing else "activationsWithoutCheckpointing":
                round(self.activations_other_gib, 2),
            "checkpointStagingHost": round(self.staging_host_gib, 2), "total": round(self.total_gib, 2),
        }


def _activations(model: ModelConfig, vocab: int, training: Any, tensor: int, pipeline: int, checkpointing: bool,
                 act_bytes: float) -> float:
    """Bytes of activations per GPU (Korthikanti et al. 2022; ``act_bytes`` 2 for 16-bit, 4 for fp32)."""
    s, b, h = training.seq_len, training.micro_batch_size, model.hidden_size
    per_block = (1.0 if checkpointing else 17.0) * act_bytes * s * b * h / tensor
    blocks_per_stage = -(-model.num_layers // pipeline)
    in_flight = pipeline if pipeline > 1 else 1
    return per_block * blocks_per_stage * in_flight + 4.0 * s * b * vocab / tensor


def memory_breakdown(model: ModelConfig, vocab: int, training: Any, world: int) -> MemoryBreakdown:
    """Memory per GPU of ``training`` (strategy, ZeRO stage, parallelism, precision, micro-batch,
    activation checkpointing) for ``world`` GPUs.

    Per parameter: ``ddp`` replicates fp32 weights, gradients and AdamW's two moments (16 bytes)
    and, under bf16/fp16 autocast, caches a 16-bit copy of the weights during the forward pass;
    ``fsdp`` shards the 16 bytes over the data-parallel ranks (and tensor × pipeline split the
    model first) and gathers 16-bit copies of two blocks at a time; DeepSpeed ZeRO keeps 16-bit
    weights and gradients and fp32 master weights + moments (2 + 2 + 12 bytes), sharding the 12
    (stage 1), the 12 and the gradients (stage 2) or all of them (stage 3). Checkpoint staging
    is the rank's shard of fp32 weights and moments (12 bytes per parameter) on the host.
    """
    total, _, _ = model_parameters(model, vocab)
    precision = "bf16" if training.precision == "auto" else training.precision
    low = precision in ("bf16", "fp16")
    act_bytes = 2.0 if low else 4.0
    tensor = pipeline = 1
    shard = world
    if training.strategy == "fsdp" and training.parallelism is not None:
        _, shard, pipeline, tensor = training.parallelism.resolve(world)
    per_rank = total / (tensor * pipeline)
    expert = _expert_degree(training) if training.strategy == "fsdp" else 1
    block = _gathered_block(model, total, vocab, expert) / tensor
    gathered = 0.0
    if training.strategy == "ddp":
        params, grads, optim = 4.0 * per_rank, 4.0 * per_rank, 8.0 * per_rank
        gathered = 2.0 * per_rank if low else 0.0  # autocast's cached 16-bit weights
        staging = 12.0 * per_rank
        setup = f"ddp on {world} GPU{'s' if world > 1 else ''} (replicated)"
    elif training.strategy == "fsdp":
        params, grads, optim = 4.0 * per_rank / shard, 4.0 * per_rank / shard, 8.0 * per_rank / shard
        gathered = 2 * (2.0 if low else 4.0) * block  # the computing block and the prefetched one
        staging = 12.0 * per_rank / shard
        setup = f"fsdp, {shard}-way sharded" + (f" × pipeline {pipeline} × tensor {tensor}" if tensor * pipeline > 1 else "")
        setup += f", expert parallel {expert}" if expert > 1 else ""
    else:
        stage = training.zero_stage
        weight_bytes = 2.0 if low else 4.0
        params = weight_bytes * per_rank / (world if stage == 3 else 1)
        grads = weight_bytes * per_rank / (world if stage >= 2 else 1)
        optim = (12.0 if low else 8.0) * per_rank / world
        gathered = 2 * weight_bytes * block if stage == 3 else 0.0
        staging = optim + (params if stage == 3 else params / world)
        setup = f"deepspeed ZeRO-{stage} over {world} GPU{'s' if world > 1 else ''}"
    checkpointing = bool(training.activation_checkpointing)
    act = _activations(model, vocab, training, tensor, pipeline, checkpointing, act_bytes)
    other = _activations(model, vocab, training, tensor, pipeline, not checkpointing, act_bytes)
    return MemoryBreakdown(f"{setup}, {precision}", params / GIB, grads / GIB, optim / GIB, gathered / GIB,
                           act / GIB, other / GIB, staging / GIB, checkpointing)


def fit_advice(model: ModelConfig, vocab: int, training: Any, world: int, gpu_memory_gib: float,
               headroom: float = 0.85) -> tuple[str, float] | None:
    """The field to change (and the memory per GPU after it) when ``training`` does not fit
    ``headroom`` of the GPU; None when it fits. Tried in order of least cost to the run:
    activation checkpointing, a sharding strategy, a smaller micro-batch (global batch kept by
    gradient accumulation), then more GPUs."""
    limit = headroom * gpu_memory_gib
    now = memory_breakdown(model, vocab, training, world)
    if now.total_gib <= limit:
        return None
    # (pipeline stages and activation checkpointing do not compose in the trainer)
    can_checkpoint = training.parallelism is None or training.parallelism.pipeline == 1
    tries: list[tuple[str, Any]] = []
    if not training.activation_checkpointing and can_checkpoint:
        tries.append(("training.activationCheckpointing: true", training.model_copy(update={"activation_checkpointing": True})))
    if training.strategy == "ddp":
        tries.append(("training.strategy: fsdp", training.model_copy(update={"strategy": "fsdp"})))
    elif training.strategy == "deepspeed" and training.zero_stage < 3:
        tries.append(("training.zeroStage: 3", training.model_copy(update={"zero_stage": 3})))
    for micro in (training.micro_batch_size // 2, training.micro_batch_size // 4, 1):
        if 1 <= micro < training.micro_batch_size:
            tries.append((f"training.microBatchSize: {micro} (globalBatchTokens kept by gradient accumulation)",
                          training.model_copy(update={"micro_batch_size": micro})))
    for label, changed in tries:
        after = memory_breakdown(model, vocab, changed, world)
        if after.total_gib <= limit:
            return label, after.total_gib
    # no one change is enough: the changes together, in the same order, as few as fit
    updates: dict[str, Any] = {}
    labels: list[str] = []
    for label, changed in tries:
        if "micro_batch_size" in updates and "microBatchSize" in label:
            labels.pop()
        updates.update({k: getattr(changed, k) for k in ("activation_checkpointing", "strategy", "zero_stage",
                                                           "micro_batch_size") if getattr(changed, k) != getattr(training, k)})
        labels.append(label)
        after = memory_breakdown(model, vocab, training.model_copy(update=updates), world)
        if after.total_gib <= limit:
            return " and ".join(labels), after.total_gib
    combined = training.model_copy(update=updates)
    for factor in (2, 4, 8, 16, 32, 64):
        if training.parallelism is not None:
            break  # the layout's degrees are tied to the world: crucible plan suggests a layout instead
        after = memory_breakdown(model, vocab, combined, world * factor)
        if after.total_gib <= limit:
            return (f"resources.nodes (or gpusPerNode): {factor}× as many GPUs ({world * factor}), with "
                    + (" and ".join(labels) if labels else "this setup")), after.total_gib
    return "training.parallelism (tensor / pipeline): see the suggested layout", now.total_gib
