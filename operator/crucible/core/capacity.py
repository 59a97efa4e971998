"""``crucible plan FILE``: what a PretrainRun will cost before it is applied. Pure; no torch.

For every PretrainRun in FILE (YAML, one or many documents):

* parameters of the Llama shape (total, and the non-embedding count the FLOPs use);
* training tokens (``maxTokens``, or ``maxSteps × globalBatchTokens``) and tokens per
  parameter against Chinchilla's compute-optimal ~20 (Hoffmann et al. 2022);
* training FLOPs ``6·N·D + 12·L·d·T·D`` (PaLM's count: matmuls forward+backward, plus
  attention scores and values);
* GPU-hours and wall time at a stated MFU on the requested GPUs
  (``resources.nodes × gpusPerNode``), the GPU type from ``--gpu`` or guessed from the node
  pool's name;
* energy in kWh at the GPUs' board power (× ``--pue`` for the facility).

A model continued from ``model.source`` has a shape the file does not state: pass
``--params`` to plan it.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from typing import Any

from crucible.trainer.config.training import ModelConfig

CHINCHILLA_TOKENS_PER_PARAM = 20.0


@dataclass(frozen=True)
class Gpu:
    name: str
    peak_bf16_flops: float  # dense, per GPU
    watts: float  # board power (TDP)


GPUS: dict[str, Gpu] = {
    g.name.lower(): g
    for g in (
        Gpu("H100", 989e12, 700),
        Gpu("H200", 989e12, 700),
        Gpu("B200", 2250e12, 1000),
        Gpu("A100", 312e12, 400),
        Gpu("L40S", 362e12, 350),
        Gpu("L4", 121e12, 72),
        Gpu("A10G", 125e12, 150),
        Gpu("MI300X", 1307e12, 750),
    )
}
DEFAULT_GPU = "h100"
DEFAULT_MFU = 0.40
DEFAULT_VOCAB = 32000


@dataclass(frozen=True)
class CapacityPlan:
    name: str
    parameters: int
    non_embedding_parameters: int
    tokens: int
    tokens_per_parameter: float
    chinchilla_tokens: int
    flops: float
    attention_flops_fraction: float
    gpu: str
    gpus: int
    mfu: float
    gpu_hours: float
    wall_hours: float
    energy_kwh: float
    vocab_size: int
    notes: tuple[str, ...] = ()
    active_parameters: int | None = None  # MoE: parameters one token touches
    layout: str | None = None  # training.parallelism as resolved for the world
    layout_memory_gib: float | None = None  # estimated peak memory per GPU of that layout
    suggested_layout: str | None = None
    suggested_memory_gib: float | None = None
    memory: dict[str, Any] | None = None  # MemoryBreakdown.to_json() of the spec's setup, per GPU
    gpu_memory_gib: float | None = None
    memory_advice: str | None = None  # the field to change when it does not fit; None: it fits

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["notes"] = list(self.notes)
        return out


def llama_parameters(model: ModelConfig, vocab: int) -> tuple[int, int]:
    """(total parameters, parameters that cost matmul FLOPs: all but the input embedding)."""
    d = model.hidden_size
    heads = model.num_heads
    kv = model.num_kv_heads or heads
    head_dim = d // heads
    ff = model.intermediate_size or (int(64 * round(8 * d / 3 / 64)) or 64)
    attention = d * heads * head_dim + 2 * d * kv * head_dim + heads * head_dim * d
    mlp = 3 * d * ff
    per_layer = attention + mlp + 2 * d  # two RMSNorm weights
    body = model.num_layers * per_layer + d  # final norm
    embedding = vocab * d
    output = 0 if model.tie_word_embeddings else vocab * d
    total = body + embedding + output
    flop_params = body + (vocab * d)  # the output projection is a matmul even when tied
    return total, flop_params


def estimate(
    name: str,
    spec: Any,
    gpu: Gpu,
    gpus: int,
    mfu: float,
    pue: float = 1.0,
    params_override: int | None = None,
) -> CapacityPlan:
    """The plan of one PretrainRun spec (a ``PretrainRunSpec`` or the trainer's ``PretrainConfig``)."""
    if not 0 < mfu <= 1:
        raise ValueError(f"--mfu must be in (0, 1], got {mfu}")
    notes: list[str] = []
    model: ModelConfig = spec.model
    training = spec.training
    vocab = model.vocab_size or DEFAULT_VOCAB
    if model.vocab_size is None:
        notes.append(f"model.vocabSize is empty (taken from the tokenizer at run time); assumed {DEFAULT_VOCAB}")
    total, flop_params = llama_parameters(model, vocab)
    active: int | None = None
    if model.moe_config is not None:  # FLOPs per token come from the active experts only
        from crucible.core.layout import model_parameters

        total, active, flop_params = model_parameters(model, vocab)
    if model.source is not None:
        if params_override is None:
            notes.append("model.source is set: the shape fields may not describe it; pass --params for its size")
        else:
            total = flop_params = params_override
    elif params_override is not None:
        total = flop_params = params_override
    if training.max_tokens is not None:
        tokens = int(training.max_tokens)
    else:
        tokens = int(training.max_steps) * int(training.global_batch_tokens)
    attention_per_token = 12.0 * model.num_layers * model.hidden_size * training.seq_len
    per_token = 6.0 * flop_params + attention_per_token
    flops = per_token * tokens
    gpu_seconds = flops / (gpu.peak_bf16_flops * mfu)
    gpu_hours = gpu_seconds / 3600.0
    layout_fields = _layout_fields(spec, model, vocab, gpu) if model.source is None else {}
    if model.source is None:
        layout_fields.update(_memory_fields(spec, model, vocab, gpu, gpus))
    return CapacityPlan(
        name=name,
        parameters=total,
        non_embedding_parameters=flop_params,
        tokens=tokens,
        tokens_per_parameter=tokens / total,
        chinchilla_tokens=int(CHINCHILLA_TOKENS_PER_PARAM * total),
        flops=flops,
        attention_flops_fraction=attention_per_token / per_token,
        gpu=gpu.name,
        gpus=gpus,
        mfu=mfu,
        gpu_hours=gpu_hours,
        wall_hours=gpu_hours / gpus,
        energy_kwh=gpu_hours * gpu.watts / 1000.0 * pue,
        vocab_size=vocab,
        notes=tuple(notes),
        active_parameters=active,
        **layout_fields,
    )


def _layout_fields(spec: Any, model: ModelConfig, vocab: int, gpu: Gpu) -> dict[str, Any]:
    """The spec's layout with its memory per GPU, and the layout ``crucible plan`` suggests."""
    from crucible.core.layout import GPU_MEMORY_GIB, layout_memory, suggest_layout

    res = getattr(spec, "resources", None)
    if res is None or not res.gpus_per_node:
        return {}
    out: dict[str, Any] = {}
    world = res.nodes * res.gpus_per_node
    par = spec.training.parallelism
    mine = par.resolve(world) if par is not None else (1, world, 1, 1)
    if spec.training.strategy == "fsdp":  # layouts compose with FSDP2 only; other strategies: the memory lines
        memory = layout_memory(model, vocab, spec.training, mine)
        out["layout"], out["layout_memory_gib"] = memory.describe(), round(memory.total_gib, 1)
    best = suggest_layout(model, vocab, spec.training, res.nodes, res.gpus_per_node,
                          GPU_MEMORY_GIB.get(gpu.name.lower(), 80))
    if best is not None:
        out["suggested_layout"], out["suggested_memory_gib"] = best.describe(), round(best.total_gib, 1)
    return out


def _memory_fields(spec: Any, model: ModelConfig, vocab: int, gpu: Gpu, gpus: int) -> dict[str, Any]:
    """Memory per GPU of the spec's strategy and layout on ``gpus`` GPUs, and what to change if it does not fit."""
    from crucible.core.layout import GPU_MEMORY_GIB, fit_advice, memory_breakdown

    res = getattr(spec, "resources", None)
    if res is not None and not res.gpus_per_node:
        return {}  # a CPU run: no GPU memory to plan
    world = gpus
    training = spec.training
    if training.parallelism is not None:
        try:
            training.parallelism.resolve(world)
        except ValueError:
            return {}  # the layout does not match this world (validate says so)
    capacity = GPU_MEMORY_GIB.get(gpu.name.lower(), 80)
    advice = fit_advice(model, vocab, training, world, capacity)
    return {
        "memory": memory_breakdown(model, vocab, training, world).to_json(),
        "gpu_memory_gib": float(capacity),
        "memory_advice": None if advice is None else f"{advice[0]} (~{advice[1]:.1f} GiB per GPU)",
    }


def _human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f} {suffix}{unit}".rstrip()
    return f"{n:.0f} {unit}".rstrip()


def _duration(hours: float) -> str:
    if hours < 1 / 60:
        return f"{hours * 3600:.1f} s"
    if hours < 1:
        return f"{hours * 60:.1f} min"
    if hours < 48:
        return f"{hours:.1f} h"
    return f"{hours / 24:.1f} days"


def _num(x: float) -> str:
    return f"{x:,.1f}" if x >= 10 else f"{x:.3g}"


def render(plan: CapacityPlan, pue: float) -> str:
    ratio = plan.tokens_per_parameter / CHINCHILLA_TOKENS_PER_PARAM
    verdict = "about compute-optimal" if 0.5 <= ratio <= 2 else ("under-trained" if ratio < 0.5 else "over-trained")
    lines = [
        f"PretrainRun {plan.name}",
        f"  parameters        {_human(plan.parameters)} ({plan.parameters:,}; {_human(plan.non_embedding_parameters)} in matmuls"
        + (f", {_human(plan.active_parameters)} active per token" if plan.active_parameters else "") + ")",
        f"  tokens            {_human(plan.tokens)} ({plan.tokens:,})",
        f"  tokens/parameter  {plan.tokens_per_parameter:.1f} vs Chinchilla ~20 ({verdict}; "
        f"compute-optimal would be {_human(plan.chinchilla_tokens)} tokens)",
        f"  training FLOPs    {plan.flops:.3e} (6ND + attention; attention is {plan.attention_flops_fraction:.1%})",
        f"  at {plan.mfu:.0%} MFU on {plan.gpus} × {plan.gpu} ({_human(GPUS[plan.gpu.lower()].peak_bf16_flops, 'FLOP/s')} bf16 peak each):",
        f"  GPU-hours         {_num(plan.gpu_hours)}",
        f"  wall time         {_duration(plan.wall_hours)}",
        f"  energy            {_num(plan.energy_kwh)} kWh (GPU board power {GPUS[plan.gpu.lower()].watts:.0f} W"
        + (f" × PUE {pue}" if pue != 1.0 else "") + ")",
    ]
    if plan.memory is not None:
        m = plan.memory
        lines.append(f"  memory per GPU    ~{m['total']:.1f} GiB of {plan.gpu_memory_gib:.0f} on {plan.gpu} "
                     f"({m['setup']}; estimate)")
        lines.append(f"                    weights {m['parameters']:.1f} + gradients {m['gradients']:.1f} + optimizer "
                     f"{m['optimizer']:.1f} + gathered {m['gathered']:.1f} + activations {m['activations']:.1f} GiB")
        if "activationsWithCheckpointing" in m:
            lines.append(f"                    activations with activationCheckpointing: {m['activationsWithCheckpointing']:.1f} GiB")
        else:
            lines.append(f"                    activations without activationCheckpointing: "
                         f"{m['activationsWithoutCheckpointing']:.1f} GiB")
        lines.append(f"                    checkpoint staging: {m['checkpointStagingHost']:.1f} GiB of host memory "
                     "per GPU (asynchronous save)")
        if plan.memory_advice:
            lines.append(f"  does not fit      change {plan.memory_advice}")
    if plan.layout:
        lines.append(f"  layout            {plan.layout}: ~{plan.layout_memory_gib} GiB per GPU (estimate)")
    if plan.suggested_layout:
        lines.append(f"  suggested layout  {plan.suggested_layout}: ~{plan.suggested_memory_gib} GiB per GPU"
                     + ("" if plan.layout else " (strategy fsdp with training.parallelism)"))
    elif plan.layout:
        lines.append("  suggested layout  none fits: add GPUs, set activationCheckpointing or lower microBatchSize")
    lines += [f"  note: {note}" for note in plan.notes]
    return "\n".join(lines)


def guess_gpu(node_pool: str | None, node_selector: dict[str, str]) -> str | None:
    haystack = " ".join([node_pool or "", *node_selector.values()]).lower()
    for key in sorted(GPUS, key=len, reverse=True):
        if key in haystack:
            return key
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="YAML file with one or more PretrainRun resources")
    parser.add_argument("--gpu", choices=sorted(GPUS), help="GPU type; default: guessed from resources.nodePool, else h100")
    parser.add_argument("--gpus", type=int, help="GPUs in total; default: resources.nodes × gpusPerNode")
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU, help=f"model FLOPs utilization to assume (default {DEFAULT_MFU})")
    parser.add_argument("--pue", type=float, default=1.0, help="facility power usage effectiveness (default 1.0: GPUs only)")
    parser.add_argument("--params", type=int, help="parameter count, for a run continued from model.source")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args: argparse.Namespace) -> int:
    from crucible.api.validate import load_resources

    result = load_resources([args.file])
    runs = [loaded for loaded in result.resources if loaded.resource.kind == "PretrainRun"]
    for problem in result.problems:
        print(problem, file=sys.stderr)
    if result.problems:
        return 2
    if not runs:
        print(f"{args.file}: no PretrainRun in this file; crucible plan estimates pretraining runs", file=sys.stderr)
        return 2
    if not 0 < args.mfu <= 1:
        print(f"--mfu must be a fraction in (0, 1], e.g. 0.4; got {args.mfu}", file=sys.stderr)
        return 2
    plans = []
    for loaded in runs:
        spec = loaded.resource.spec
        res = spec.resources
        gpu_key = args.gpu or guess_gpu(res.node_pool, res.node_selector) or DEFAULT_GPU
        gpus = args.gpus or res.nodes * res.gpus_per_node
        plan = estimate(loaded.resource.metadata.name, spec, GPUS[gpu_key], max(gpus, 1), args.mfu, args.pue, args.params)
        if not gpus:
            plan = CapacityPlan(**{**asdict(plan), "notes": (*plan.notes, f"resources request no GPUs; figures assume 1 × {plan.gpu}")})
        plans.append(plan)
    if args.json:
        print(json.dumps([p.to_json() for p in plans], indent=2))
    else:
        print("\n\n".join(render(p, args.pue) for p in plans))
    return 0
