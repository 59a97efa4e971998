"""FLOPs per token, peak throughput of known accelerators, and model FLOPs utilization (MFU).

Training FLOPs per token are counted as in PaLM (Chowdhery et al. 2022, appendix B):
``6·N`` for the matmuls of forward + backward over the N non-embedding-lookup parameters, plus
``12·L·d·T`` for attention scores and values (L layers, width d, sequence T). MFU is achieved
model FLOP/s over the hardware's dense bf16 peak; recomputation (activation checkpointing) is
not counted, as MFU by definition excludes it.
"""

from __future__ import annotations

from typing import Any

# Dense (non-sparse) bf16 peak FLOP/s per device, from the vendors' data sheets.
PEAK_BF16_FLOPS: dict[str, float] = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe card is 756 TFLOP/s
    "H100 PCIE": 756e12,
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 125e12,
    "B200": 2250e12,
    "GB200": 2500e12,
    "MI300X": 1307e12,
}


def flops_per_token(params: int, layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N + 12·L·d·T."""
    return 6.0 * params + 12.0 * layers * hidden * seq_len


def peak_flops(device_name: str) -> float | None:
    """Peak bf16 FLOP/s of a device by (part of) its name; None when unknown (CPU, new parts)."""
    upper = device_name.upper()
    for name in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if name in upper:
            return PEAK_BF16_FLOPS[name]
    return None


def mfu(tokens_per_second: float, flops_token: float, peak: float | None, devices: int) -> float | None:
    if not peak or devices <= 0:
        return None
    return tokens_per_second * flops_token / (peak * devices)


def count_params(model: object, exclude_embeddings: bool = True) -> int:
    """Parameters that cost matmul FLOPs: all but the input embedding table (a lookup).

    With tied embeddings the shared table is the output projection and is counted once.
    """
    import torch

    assert isinstance(model, torch.nn.Module)
    m: Any = model
    seen: set[int] = set()
    total = 0
    emb: Any = m.get_input_embeddings() if hasattr(m, "get_input_embeddings") else None
    out: Any = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None
    tied = emb is not None and out is not None and emb.weight is out.weight
    skip = {id(emb.weight)} if (exclude_embeddings and emb is not None and not tied) else set()
    for p in model.parameters():
        if id(p) in seen or id(p) in skip:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def active_params(model: object) -> int:
    """:func:`count_params` with only ``topK`` of each MoE block's ``numExperts`` experts counted:
    the parameters one token's matmuls actually touch."""
    from crucible.trainer.moe import moe_blocks

    total = count_params(model)
    for block in moe_blocks(model):  # type: ignore[arg-type]
        experts = block.experts.gate_up_proj.numel() + block.experts.down_proj.numel()
        total -= experts - experts * block.top_k // block.num_experts
    return total
