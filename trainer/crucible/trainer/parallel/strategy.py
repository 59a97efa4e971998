"""The 3-D strategy: tensor parallel (DTensor) × pipeline (torch.distributed.pipelining) × FSDP2.

Built from ``training.parallelism`` on a :func:`~crucible.trainer.parallel.mesh.build_mesh` mesh:

1. cut the Llama into ``pipeline × stagesPerRank`` chunks of whole blocks
   (:class:`~crucible.trainer.parallel.llama.LlamaStage`); this rank keeps chunks
   ``p, p + P, ...``;
2. tensor-parallelise each chunk over the ``tp`` dimension (sequence + loss parallel);
3. ``fully_shard`` every block and the chunk over the data dimensions (HSDP when dataReplicate > 1);
4. with pipeline > 1, run a step as one ``Schedule1F1B`` / ``ScheduleInterleaved1F1B`` over the
   step's accumulation micro-batches (they are the pipeline's microbatches).

The gradient norm is the norm over every stage (DTensor norms, then an all-reduce of squares over
the pipeline dimension), clipped as one. Checkpoints are the engine's sharded DCP format: every
rank hands its stages' own shards (Hugging Face names, optimizer state flattened to parameter
names) to :mod:`crucible.trainer.checkpoint`, nothing is gathered, and DCP's global metadata lets a
checkpoint of any layout resume in any other layout, or under ddp/fsdp, and vice versa.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from crucible.trainer.config.training import OptimizerConfig, TrainingConfig
from crucible.trainer.distributed import DistEnv, Strategy, _detached_copy
from crucible.trainer.faults import SpecError
from crucible.trainer.moe import MoEBlock, counting_paused
from crucible.trainer.optim import build_adamw, set_lr
from crucible.trainer.parallel.expert import clip_, expert_parallel, shard_experts, total_norm
from crucible.trainer.parallel.llama import (
    LlamaStage,
    WholeModel,
    next_token_loss,
    split_layers,
    tensor_parallel,
)
from crucible.trainer.parallel.mesh import Layout, build_mesh, data_mesh, resolve_layout


class ParallelStrategy(Strategy):
    name = "parallel"

    def __init__(self, module: nn.Module, env: DistEnv, training: TrainingConfig, optim: OptimizerConfig,
                 grad_accum: int) -> None:
        super().__init__(module, env, training)
        self.layout: Layout = resolve_layout(training.parallelism, env.world_size, env.local_world_size)
        layout = self.layout
        self.mesh = build_mesh(layout, env.device.type)
        coords = layout.coordinates(env.rank)
        self.pp_rank, self.tp_rank = coords["pp"], coords["tp"]
        self.data_rank, self.data_size = layout.data_rank(env.rank), layout.data_size
        config: Any = module.config
        chunks = layout.pipeline * layout.stages_per_rank
        if chunks > config.num_hidden_layers:
            raise SpecError(f"training.parallelism.pipeline: {chunks} stages for {config.num_hidden_layers} layers")
        if layout.pipeline > 1 and grad_accum < layout.pipeline:
            raise SpecError(
                f"training.parallelism.pipeline: {layout.pipeline} stages need at least as many microbatches, "
                f"but a step has {grad_accum} (globalBatchTokens / (microBatchSize × seqLen × "
                f"{layout.data_size} data-parallel ranks)); raise globalBatchTokens or lower microBatchSize"
            )
        if layout.stages_per_rank > 1 and grad_accum % layout.pipeline:
            raise SpecError(
                f"training.parallelism.pipelineSchedule: interleaved-1f1b needs the {grad_accum} microbatches "
                f"to be a multiple of the {layout.pipeline} pipeline stages; change globalBatchTokens"
            )
        if layout.tensor > 1 and training.seq_len % layout.tensor:
            raise SpecError(f"training.seqLen: {training.seq_len} must be divisible by parallelism.tensor "
                            f"({layout.tensor}) for sequence parallelism")
        from crucible.trainer.meta_init import materialise_sharded, materialise_whole, pending_init

        deferred = pending_init(module)  # built on meta: cut, split and shard first, then fill the shards
        if deferred is not None and layout.expert > 1:  # expert parallel re-wraps the experts: built whole first
            materialise_whole(module, torch.device("cpu"))
            deferred = None
        layer_ids = split_layers(config.num_hidden_layers, chunks)
        self.chunk_ids = [self.pp_rank + k * layout.pipeline for k in range(layout.stages_per_rank)]
        self.stages: list[LlamaStage] = []
        for k, c in enumerate(self.chunk_ids):
            source = module if k == len(self.chunk_ids) - 1 else copy.deepcopy(module)
            stage = LlamaStage(source, layer_ids[c], first=c == 0, last=c == chunks - 1)
            if deferred is None:
                stage.to(env.device)
            if layout.tensor > 1:
                tensor_parallel(stage, self.mesh["tp"])
            if layout.expert > 1:
                expert_parallel(stage, self.mesh, layout)
            if layout.data_size > 1:
                self._shard(stage)
            self.stages.append(stage)
        if deferred is not None:
            materialise_sharded(list(self.stages), deferred, env.device)
        self.optimizers = [build_adamw(stage, optim, env.device) for stage in self.stages]
        self.optimizer = self.optimizers[0]
        self.pipelined = layout.pipeline > 1
        self.has_last = any(stage.last for stage in self.stages)
        self.has_first = any(stage.first for stage in self.stages)
        #: whether this rank's loss/token counts are reported (once per data-parallel rank)
        self.report_weight = 1.0 if (self.tp_rank == 0 and self.has_last) else 0.0
        #: MoE counters live in every stage's blocks: each rank reports its own once per tensor group
        self.moe_report_weight = 1.0 if self.tp_rank == 0 else 0.0
        self.model = WholeModel(self.stages[0]) if not self.pipelined else None
        self.schedule = self._schedule(grad_accum) if self.pipelined else None

    def _shard(self, stage: LlamaStage) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kwargs: dict[str, Any] = {"mesh": data_mesh(self.mesh, self.layout)}
        if self.env.device.type == "cuda" and self.training.precision != "fp32":
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            self.precision_in_params = True
        for layer in stage.model.layers.values():
            if self.layout.expert > 1 and isinstance(layer.mlp, MoEBlock):
                shard_experts(layer.mlp, self.mesh, self.layout,
                              **{k: v for k, v in kwargs.items() if k != "mesh"})
            fully_shard(layer, **kwargs)
        fully_shard(stage, **kwargs)

    def _schedule(self, microbatches: int) -> Any:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

        group = self.mesh["pp"].get_group()
        chunks = self.layout.pipeline * self.layout.stages_per_rank
        pipeline_stages: list[Any] = [PipelineStage(stage, c, chunks, self.env.device, group=group)
                           for stage, c in zip(self.stages, self.chunk_ids, strict=True)]
        for ps in pipeline_stages:  # the first step's shape inference is a forward the MoE counters must not see
            _quiet_shape_inference(ps)
        if self.layout.stages_per_rank > 1:
            return ScheduleInterleaved1F1B(pipeline_stages, n_microbatches=microbatches, loss_fn=next_token_loss)
        return Schedule1F1B(pipeline_stages[0], n_microbatches=microbatches, loss_fn=next_token_loss)

    # -- a step -------------------------------------------------------------------------------

    def _loss_context(self) -> contextlib.AbstractContextManager[Any]:
        return self.stages[-1].loss_context() if self.has_last else contextlib.nullcontext()

    @contextlib.contextmanager
    def micro_step(self, last: bool) -> Iterator[None]:
        if self.layout.data_size > 1:
            for stage in self.stages:
                stage.set_requires_gradient_sync(last)  # type: ignore[operator]
        yield

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        with self._loss_context():
            loss.backward()

    def pipeline_step(self, batches: list[dict[str, torch.Tensor]], train: bool = True) -> torch.Tensor:
        """Forward (and backward) of the step's micro-batches through the pipeline; the sum of their
        losses on the last stage's ranks, 0 elsewhere."""
        assert self.schedule is not None
        ids = torch.cat([b["input_ids"] for b in batches]).to(self.env.device)
        labels = torch.cat([b["labels"] for b in batches]).to(self.env.device)
        losses: list[torch.Tensor] = []
        args = (ids,) if self.has_first else ()
        kwargs: dict[str, Any] = {"target": labels, "losses": losses} if self.has_last else {}
        with self._loss_context():
            if train:
                self.schedule.step(*args, **kwargs)
            else:
                self.schedule.eval(*args, **kwargs)
        total = torch.zeros((), dtype=torch.float64, device=self.env.device)
        for loss in losses:
            value = loss.full_tensor() if hasattr(loss, "full_tensor") else loss
            total += value.detach().to(torch.float64)
        return total

    def parameters(self) -> list[nn.Parameter]:
        return [p for stage in self.stages for p in stage.parameters() if p.requires_grad]

    def optimizer_step(self, lr: float, grad_clip: float) -> float:
        params = self.parameters()
        grads = [p.grad for p in params if p.grad is not None]
        norm: Any = total_norm(grads)  # DTensors of several meshes with expert parallel
        if self.pipelined:
            squared = norm.to(torch.float64) ** 2
            dist.all_reduce(squared, group=self.mesh["pp"].get_group())
            norm = squared.sqrt().to(norm.dtype)
        if grad_clip > 0:
            clip_(params, grad_clip, norm)
        for optimizer in self.optimizers:
            set_lr(optimizer, lr)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def train(self, mode: bool = True) -> None:
        for stage in self.stages:
            stage.train(mode)

    # -- checkpoint state -------------------------------------------------------------------------

    def frozen_parameter_names(self) -> set[str]:
        return set()

    def full_state(self, with_optimizer: bool = True) -> dict[str, Any] | None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=False)
        model_sd: dict[str, Any] = {}
        optim_sd: dict[str, Any] = {"state": {}, "param_groups": []}
        leader = self.data_rank == 0 and self.tp_rank == 0
        for stage, optimizer in zip(self.stages, self.optimizers, strict=True):
            msd = get_model_state_dict(stage, options=opts)  # collective over tp and data dims
            if leader:
                model_sd.update(_detached_copy(msd))
            if with_optimizer:
                osd = get_optimizer_state_dict(stage, optimizer, options=opts)
                if leader:
                    _merge_optimizer(optim_sd, _detached_copy(osd))
            del msd
        mine = {"model": model_sd, **({"optimizer": optim_sd} if with_optimizer else {})}
        if not self.pipelined:
            return mine if self.env.is_main else None
        if not leader:
            return None
        parts: list[Any] | None = [None] * self.layout.pipeline if self.env.is_main else None
        dist.gather_object(mine, parts, dst=0, group=self.mesh["pp"].get_group())
        if not self.env.is_main:
            return None
        assert parts is not None
        out: dict[str, Any] = {"model": {}}
        if with_optimizer:
            out["optimizer"] = {"state": {}, "param_groups": []}
        for part in parts:
            out["model"].update(part["model"])
            if with_optimizer:
                _merge_optimizer(out["optimizer"], part["optimizer"])
        return out

    def state_dict(self) -> dict[str, Any]:
        """Every stage's own shards (DTensors over tp and data dims) for the sharded DCP checkpoint."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        flat = StateDictOptions(flatten_optimizer_state_dict=True)  # keyed by parameter name, as ddp/fsdp
        model_sd: dict[str, Any] = {}
        optim_sd: dict[str, Any] = {}
        for stage, optimizer in zip(self.stages, self.optimizers, strict=True):
            model_sd.update(get_model_state_dict(stage))
            optim_sd.update(get_optimizer_state_dict(stage, optimizer, options=flat))
        return {"model": model_sd, "optimizer": optim_sd, **self.extra_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        flat = StateDictOptions(flatten_optimizer_state_dict=True)
        for stage, optimizer in zip(self.stages, self.optimizers, strict=True):
            names = set(stage.state_dict().keys())
            set_model_state_dict(stage, {k: v for k, v in state["model"].items() if k in names})
            prefixes = tuple(f"{kind}.{n}." for n in names for kind in ("state", "param_groups"))
            own = {k: v for k, v in state["optimizer"].items() if k.startswith(prefixes)}
            set_optimizer_state_dict(stage, optimizer, own, options=flat)
        self.load_extra_state(state)

    def load_full_state(self, model_sd: dict[str, Any], optim_sd: dict[str, Any] | None) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, strict=True)
        for stage, optimizer in zip(self.stages, self.optimizers, strict=True):
            names = set(stage.state_dict().keys())
            missing = names - set(model_sd)
            if missing:
                raise RuntimeError(f"the checkpoint lacks parameters of this stage, e.g. {sorted(missing)[:3]}")
            set_model_state_dict(stage, {k: v for k, v in model_sd.items() if k in names}, options=opts)
            if optim_sd is not None:
                own: dict[str, Any] = {"state": {k: v for k, v in optim_sd["state"].items() if k in names},
                       "param_groups": [{**g, "params": [p for p in g["params"] if p in names]}
                                        for g in optim_sd["param_groups"]]}
                set_optimizer_state_dict(stage, optimizer, own, options=opts)

    def export_state(self) -> dict[str, torch.Tensor] | None:
        state = self.full_state(with_optimizer=False)
        return None if state is None else state["model"]

    def export_stream(self) -> tuple[list[Any], Iterator[tuple[str, torch.Tensor | None]]]:
        """Every stage's tensors in Hugging Face order (chunk by chunk), one at a time: gathered over
        the tensor and data dimensions inside the owning pipeline group, then sent by that group's
        leader to rank 0. No rank holds more than one full tensor."""
        from crucible.trainer.distributed import all_gather_object

        mine = [(c, name, tuple(t.shape), t.dtype)
                for stage, c in zip(self.stages, self.chunk_ids, strict=True)
                for name, t in stage.state_dict().items()]
        seen: dict[str, tuple[int, tuple[int, ...], torch.dtype]] = {}
        for rank_items in all_gather_object(mine):
            for c, name, shape, dtype in rank_items:
                seen.setdefault(name, (c, shape, dtype))
        order = sorted(seen, key=lambda n: seen[n][0])  # stable: each chunk keeps its own order
        specs = [(n, seen[n][1], seen[n][2]) for n in order]
        local = {name: t for stage in self.stages for name, t in stage.state_dict().items()}
        tensor = self.layout.tensor

        def items() -> Iterator[tuple[str, torch.Tensor | None]]:
            for name in order:
                chunk, shape, dtype = seen[name]
                owner = chunk % self.layout.pipeline
                leader = owner * tensor  # data coordinates 0, pipeline `owner`, tensor 0
                full: torch.Tensor | None = None
                if self.pp_rank == owner:
                    t = local[name]
                    full = (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().contiguous()
                    if self.env.rank == leader and leader != 0:
                        dist.send(full.to(self.env.device), dst=0)
                if self.env.is_main and leader != 0:
                    full = torch.empty(shape, dtype=dtype, device=self.env.device)
                    dist.recv(full, src=leader)
                yield name, (full.to("cpu") if self.env.is_main and full is not None else None)
                del full

        return specs, items()


def _quiet_shape_inference(stage: Any) -> None:
    infer = getattr(stage, "_forward_metadata_inference", None)
    if infer is None:  # another torch: its inference (if any) would add one forward to step 1's MoE counts
        return

    def quiet(*args: Any, **kwargs: Any) -> Any:
        with counting_paused(stage.submod):
            return infer(*args, **kwargs)

    stage._forward_metadata_inference = quiet


def _merge_optimizer(into: dict[str, Any], part: dict[str, Any]) -> None:
    """Union of two stages' full optimizer states (FQN-keyed; the same param groups in the same order)."""
    into["state"].update(part["state"])
    if not into["param_groups"]:
        into["param_groups"] = [dict(g, params=list(g["params"])) for g in part["param_groups"]]
        return
    for mine, theirs in zip(into["param_groups"], part["param_groups"], strict=True):
        mine["params"].extend(p for p in theirs["params"] if p not in mine["params"])
