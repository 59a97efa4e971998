"""Expert parallelism (``training.parallelism.expert``): MoE experts split over the data-parallel ranks.

Megatron/torchtitan-style, on the mesh of :func:`~crucible.trainer.parallel.mesh.build_mesh`
(``dp_shard = dp_shard_mod_ep × ep``):

* every MoE block's expert weights become DTensors ``Shard(0)`` over ``ep`` — whole experts, rank
  r of the group holds experts ``[r·E/EP, (r+1)·E/EP)`` — and the block dispatches its routed
  tokens to their owners with all-to-all (:meth:`crucible.trainer.moe.MoEBlock._experts_parallel`);
* the experts are their own FSDP2 unit over (dataReplicate ×) ``dp_shard_mod_ep`` only, so FSDP
  neither gathers them over ``ep`` nor averages their gradients there: the owner's gradient is
  already the sum over the EP group's tokens (the combine's backward brings it), and FSDP's
  divide factor is set to the whole data-parallel size so the result is the same mean as for the
  dense parameters (which shard over the full ``dp_shard`` as before);
* checkpoints hold the experts as DTensors of the full (E, ...) shape, so DCP reshards them
  between any EP degree (and ddp/fsdp) on load; the export's full state dict gathers them.

Gradient norms are summed per mesh (dense and expert DTensors live on different meshes).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from crucible.trainer.faults import SpecError
from crucible.trainer.moe import MoEBlock, moe_blocks
from crucible.trainer.parallel.mesh import Layout, expert_data_mesh


def expert_parallel(module: nn.Module, mesh: Any, layout: Layout) -> list[MoEBlock]:
    """Turn the MoE blocks of ``module`` expert-parallel over ``mesh["ep"]`` (before FSDP); the blocks."""
    from torch.distributed.tensor import Shard, distribute_tensor

    ep_mesh = mesh["ep"]
    blocks = moe_blocks(module)
    for block in blocks:
        if block.num_experts % layout.expert:
            raise SpecError(
                f"training.parallelism.expert: {layout.expert} must divide the model's {block.num_experts} "
                "experts (model.moe.numExperts, or the source model's num_local_experts)"
            )
        experts = block.experts
        for name, param in list(experts.named_parameters(recurse=False)):
            shard = distribute_tensor(param.detach(), ep_mesh, [Shard(0)])
            setattr(experts, name, nn.Parameter(shard, requires_grad=param.requires_grad))
        block.ep_group = ep_mesh.get_group()
        block.ep_size, block.ep_rank = layout.expert, ep_mesh.get_local_rank()
    return blocks


def shard_experts(block: MoEBlock, mesh: Any, layout: Layout, **kwargs: Any) -> None:
    """FSDP2 over the non-EP data-parallel ranks for one block's experts (call before the block's layer)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    dp_mesh = expert_data_mesh(mesh, layout)
    local = block.num_experts // layout.expert
    # fewer local experts than FSDP ranks: shard a weight dimension instead of padding whole experts
    placement = Shard(0) if local >= layout.shard // layout.expert else Shard(1)
    fully_shard(block.experts, mesh=dp_mesh, shard_placement_fn=lambda _: placement, **kwargs)
    block.experts.set_gradient_divide_factor(float(layout.data_size))  # type: ignore[operator]
    if dp_mesh.device_type == "cpu" and layout.shard > layout.expert:
        # gloo has no PREMUL_SUM: sum, then divide (not on a 1-rank shard group, where FSDP skips the
        # reduce-scatter and divides by the factor itself; forcing sum there would divide twice)
        block.experts.set_force_sum_reduction_for_comms(True)  # type: ignore[operator]


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of gradients that are DTensors on several meshes (and plain tensors)."""
    groups: dict[Any, list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault(getattr(g, "device_mesh", None), []).append(g)
    squares = []
    for group in groups.values():
        norm: Any = torch.nn.utils.get_total_norm(group, foreach=True)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        squares.append(norm.to(torch.float64) ** 2)
    if not squares:
        return torch.zeros(())
    return torch.stack(squares).sum().sqrt().to(torch.float32)


def clip_(params: list[nn.Parameter], max_norm: float, norm: torch.Tensor) -> None:
    groups: dict[Any, list[nn.Parameter]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault(getattr(p.grad, "device_mesh", None), []).append(p)
    for group in groups.values():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm, foreach=True)
