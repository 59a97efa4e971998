"""The device mesh of a ``training.parallelism`` layout: dataReplicate × dataShard × pipeline × tensor.

Ranks are numbered as torchrun numbers them (node rank × processes per node + local rank), and
the mesh puts the tensor dimension innermost: a tensor-parallel group is ``tensor`` consecutive
ranks, which ``crucible validate`` keeps inside one node (``tensor`` divides gpusPerNode), so
its per-layer all-reduces ride NVLink. Pipeline neighbours are ``tensor`` ranks apart — with
``tensor = gpusPerNode`` on the next node — and exchange one activation per micro-batch; the
FSDP shard group and the replicas are the outer dimensions.

Expert parallelism (``expert = E`` > 1) splits the shard dimension S into ``dp_shard_mod_ep``
(S / E, outer) × ``ep`` (E, inner): an expert-parallel group is E shard-neighbours (with
tensor = pipeline = 1, E consecutive ranks, inside a node when E divides gpusPerNode), and the
flattened ``dp_shard`` the dense parameters shard over is the same ranks in the same order as
without EP. Expert weights shard over ``ep`` (whole experts) and FSDP over
(dp_replicate ×) ``dp_shard_mod_ep``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from crucible.trainer.config.training import ParallelismConfig
from crucible.trainer.faults import SpecError

DIMS = ("dp_replicate", "dp_shard", "pp", "tp")


@dataclass(frozen=True)
class Layout:
    replicate: int
    shard: int
    pipeline: int
    tensor: int
    stages_per_rank: int = 1
    expert: int = 1

    @property
    def world_size(self) -> int:
        return self.replicate * self.shard * self.pipeline * self.tensor

    @property
    def data_size(self) -> int:
        return self.replicate * self.shard

    def coordinates(self, rank: int) -> dict[str, int]:
        """Where ``rank`` sits in the mesh (the inverse of rank = ((r·S + s)·P + p)·T + t)."""
        t = rank % self.tensor
        p = (rank // self.tensor) % self.pipeline
        s = (rank // (self.tensor * self.pipeline)) % self.shard
        r = rank // (self.tensor * self.pipeline * self.shard)
        return {"dp_replicate": r, "dp_shard": s, "pp": p, "tp": t}

    def data_rank(self, rank: int) -> int:
        c = self.coordinates(rank)
        return c["dp_replicate"] * self.shard + c["dp_shard"]

    def describe(self) -> str:
        return (f"dataReplicate {self.replicate} × dataShard {self.shard} × pipeline {self.pipeline} × "
                f"tensor {self.tensor}" + (f" (expert {self.expert})" if self.expert > 1 else ""))

    def expert_coordinates(self, rank: int) -> tuple[int, int]:
        """(group index over dp_shard_mod_ep, rank inside the expert-parallel group)."""
        s = self.coordinates(rank)["dp_shard"]
        return s // self.expert, s % self.expert


def resolve_layout(par: ParallelismConfig | None, world_size: int, local_world_size: int) -> Layout:
    """The layout for this world; SpecError naming the field when it does not fit."""
    if par is None:
        return Layout(1, world_size, 1, 1)
    try:
        replicate, shard, pipeline, tensor = par.resolve(world_size)
    except ValueError as exc:
        raise SpecError(f"training.{exc}") from None
    if local_world_size % tensor:
        raise SpecError(
            f"training.parallelism.tensor: {tensor} does not divide the {local_world_size} processes per node "
            "(LOCAL_WORLD_SIZE); a tensor-parallel group must stay inside one node"
        )
    return Layout(replicate, shard, pipeline, tensor, par.stages_per_rank, par.expert)


def build_mesh(layout: Layout, device_type: str) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    if layout.expert == 1:
        shape = (layout.replicate, layout.shard, layout.pipeline, layout.tensor)
        return init_device_mesh(device_type, shape, mesh_dim_names=DIMS)
    shape5 = (layout.replicate, layout.shard // layout.expert, layout.expert, layout.pipeline, layout.tensor)
    mesh = init_device_mesh(device_type, shape5, mesh_dim_names=EXPERT_DIMS)
    mesh["dp_shard_mod_ep", "ep"]._flatten("dp_shard")
    return mesh


EXPERT_DIMS = ("dp_replicate", "dp_shard_mod_ep", "ep", "pp", "tp")


def expert_data_mesh(mesh: Any, layout: Layout) -> Any:
    """The FSDP2 mesh of the expert weights: (replicate, dp_shard_mod_ep), or dp_shard_mod_ep."""
    return mesh["dp_replicate", "dp_shard_mod_ep"] if layout.replicate > 1 else mesh["dp_shard_mod_ep"]


def data_mesh(mesh: Any, layout: Layout) -> Any:
    """The FSDP2 mesh: (replicate, shard) for HSDP, else the shard dimension."""
    import warnings

    with warnings.catch_warnings():  # with EP, dp_shard is a flattened dim; torch 2.13 warns it may go
        warnings.filterwarnings("ignore", message="Slicing a flattened dim")
        return mesh["dp_replicate", "dp_shard"] if layout.replicate > 1 else mesh["dp_shard"]


def all_reduce_over(tensor: torch.Tensor, mesh: Any, dim: str) -> torch.Tensor:
    if mesh[dim].size() > 1:
        torch.distributed.all_reduce(tensor, group=mesh[dim].get_group())
    return tensor
