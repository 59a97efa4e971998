"""Process-group setup and the three data-parallel strategies behind one small interface.

``init_distributed()`` reads torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)
and always creates a process group (gloo on CPU, NCCL on CUDA), even for one process, so one
code path serves laptop and cluster.

A :class:`Strategy` owns the wrapped model and its optimizer:

* ``ddp``: ``DistributedDataParallel``; gradient sync skipped on all but the last micro-batch.
* ``fsdp``: FSDP2 ``fully_shard`` per decoder layer and at the root (bf16 params / fp32
  reduce on CUDA, fp32 on CPU); sync skipped with ``set_requires_gradient_sync``.
* ``deepspeed``: ZeRO stage 1/2/3 with our torch AdamW as client optimizer (no compiled op
  needed; on CPU the gloo backend, ``reduce_scatter`` off since stage 1/2 then all-reduce).

Checkpoint state. ``ddp`` and ``fsdp`` hand :mod:`crucible.trainer.checkpoint` their
*sharded* state (:meth:`Strategy.state_dict`: FSDP2's DTensor shards, DDP's replicated
tensors, keyed by parameter name) for ``torch.distributed.checkpoint``: every rank writes its
own shards and nothing is gathered; the checkpoint records global shapes, so it loads on
another world size and across the two strategies. ``deepspeed`` keeps DeepSpeed's own
per-rank ZeRO files; resuming it on another world size is refused with a message (DeepSpeed's
universal checkpoint conversion is the way out).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from crucible.trainer.config.training import OptimizerConfig, TrainingConfig
from crucible.trainer.optim import build_adamw, set_lr


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: float = 600.0) -> DistEnv:
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        if world == 1:  # started without torchrun: what DeepSpeed and friends expect to find
            for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1")):
                os.environ.setdefault(key, value)
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if backend == "nccl" else None,
        )
    return DistEnv(rank, world, local_rank, local_world, device)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def shutdown() -> None:
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return [float(x) for x in t.tolist()]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _flat_optimizer() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True)


def all_gather_object(obj: Any) -> list[Any]:
    """``obj`` from every rank, in rank order (a one-element list without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class Strategy:
    """The wrapped model, its optimizer, and how a step and a checkpoint happen."""

    name = "base"
    #: whether :meth:`save_local` writes per-rank files tied to the world size
    world_size_bound = False

    def __init__(self, module: torch.nn.Module, env: DistEnv, training: TrainingConfig) -> None:
        from crucible.trainer.precision import LossScaler, resolve

        self.module = module  # the unwrapped Hugging Face model
        self.env = env
        self.training = training
        self.model: Any = module  # what forward is called on
        self.optimizer: torch.optim.Optimizer
        self.precision = resolve(training.precision, env.device, self.name)
        #: True when the low precision lives in the parameters (FSDP2 MixedPrecisionPolicy), not autocast
        self.precision_in_params = False
        self.scaler = LossScaler() if self.precision.loss_scaling else None
        #: whether the last optimizer step was skipped because fp16 gradients overflowed
        self.skipped_last_step = False

    @contextlib.contextmanager
    def micro_step(self, last: bool) -> Iterator[None]:
        yield

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        (loss * self.scaler.scale if self.scaler is not None else loss).backward()

    def optimizer_step(self, lr: float, grad_clip: float) -> float:
        """Clip, step, zero grads; the global grad norm before clipping (NaN for a skipped fp16 step)."""
        set_lr(self.optimizer, lr)
        params = [p for p in self.module.parameters() if p.requires_grad]
        if self.scaler is not None:
            return self._scaled_step(params, grad_clip)
        max_norm = grad_clip if grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def _scaled_step(self, params: list[torch.nn.Parameter], grad_clip: float) -> float:
        """fp16: the global norm of the scaled gradients decides (on every rank alike) whether to skip."""
        assert self.scaler is not None
        grads = [p.grad for p in params if p.grad is not None]
        norm: Any = torch.nn.utils.get_total_norm(grads, foreach=True)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        scale = self.scaler.scale
        self.skipped_last_step = self.scaler.update(float(norm))
        if self.skipped_last_step:
            self.optimizer.zero_grad(set_to_none=True)
            return float("nan")
        torch._foreach_mul_(grads, 1.0 / scale)
        norm = norm / scale
        if grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, grad_clip, norm, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    # -- checkpoint state (full, rank-0 files) -------------------------------------------------

    def frozen_parameter_names(self) -> set[str]:
        """Parameters that never change (a LoRA/QLoRA base): rebuilt from the base model, not checkpointed."""
        return {name for name, p in self.module.named_parameters() if not p.requires_grad}

    def full_state(self, with_optimizer: bool = True) -> dict[str, Any] | None:
        """Full model (and optimizer) state on rank 0 as CPU copies; None on other ranks.

        A collective: every rank must call it. With the optimizer (a checkpoint), frozen
        parameters are left out — for LoRA the checkpoint is the adapter, not the base again;
        without it (the export) the state is complete.
        """
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(self.module, options=opts)
        optim_sd = get_optimizer_state_dict(self.module, self.optimizer, options=opts) if with_optimizer else None
        if not self.env.is_main:
            return None
        if with_optimizer:
            frozen = self.frozen_parameter_names()
            model_sd = {k: v for k, v in model_sd.items() if k not in frozen}
        out: dict[str, Any] = {"model": _detached_copy(model_sd)}
        if optim_sd is not None:
            out["optimizer"] = _detached_copy(optim_sd)
        return out

    # -- sharded checkpoint state (DCP) ---------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """This rank's shards of model and optimizer state, for DCP; frozen parameters left out.

        The tensors are the live ones (FSDP2: DTensors over the local shards), so a DCP load into
        this dict followed by :meth:`load_state_dict` restores the training state in place.
        """
        from torch.distributed.checkpoint.state_dict import get_state_dict

        # optimizer state flattened to parameter names, so layouts that split the model (pipeline
        # stages) and those that do not hold the same keys and load each other's checkpoints
        model_sd, optim_sd = get_state_dict(self.module, self.optimizer, options=_flat_optimizer())
        frozen = self.frozen_parameter_names()
        state: dict[str, Any] = {"model": {k: v for k, v in model_sd.items() if k not in frozen},
                                 "optimizer": optim_sd}
        state.update(self.extra_state())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        frozen = self.frozen_parameter_names()
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"],
                       options=StateDictOptions(strict=not frozen, flatten_optimizer_state_dict=True))
        self.load_extra_state(state)

    def extra_state(self) -> dict[str, Any]:
        """More state that travels in the checkpoint (the fp16 loss scaler)."""
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    def save_local(self, directory: Path) -> list[Path]:
        """Strategy-owned per-rank checkpoint files (DeepSpeed); none for DCP strategies."""
        return []

    def load_local(self, directory: Path) -> None:
        raise NotImplementedError

    def owns_checkpoint_file(self, name: str) -> bool:
        """Whether this rank reads ``name`` of a strategy-owned (DeepSpeed) checkpoint."""
        return True

    def export_state(self) -> dict[str, torch.Tensor] | None:
        """The full model weights on rank 0 (LoRA exports, DeepSpeed); collective. The engine's
        Hugging Face export streams instead (:meth:`export_stream`)."""
        state = self.full_state(with_optimizer=False)
        return None if state is None else state["model"]

    def export_stream(self) -> tuple[list[Spec], Iterator[tuple[str, torch.Tensor | None]]]:
        """The model's (name, global shape, dtype) in order, and an iterator that gathers one tensor
        at a time (a collective for a sharded one): in full on rank 0, None on the others."""
        state = self.module.state_dict()
        specs = [(name, tuple(t.shape), t.dtype) for name, t in state.items()]

        def items() -> Iterator[tuple[str, torch.Tensor | None]]:
            for name, t in state.items():
                full = t.full_tensor() if hasattr(t, "full_tensor") else t
                yield name, (full.detach().to("cpu") if self.env.is_main else None)
                del full

        return specs, items()


Spec = tuple[str, tuple[int, ...], torch.dtype]


def _detached_copy(obj: Any) -> Any:
    """Deep copy with tensors cloned to CPU (a snapshot the training step cannot mutate)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _detached_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_detached_copy(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_detached_copy(v) for v in obj)
    return obj


class DDPStrategy(Strategy):
    name = "ddp"

    def __init__(self, module: torch.nn.Module, env: DistEnv, training: TrainingConfig, optim: OptimizerConfig):
        super().__init__(module, env, training)
        from crucible.trainer.meta_init import materialise_whole

        materialise_whole(module, env.device)  # full replicas: what DDP is; built once, on the device
        if env.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(
                module,
                device_ids=[env.local_rank] if env.device.type == "cuda" else None,
                gradient_as_bucket_view=True,
                static_graph=False,
            )
        self.optimizer = build_adamw(module, optim, env.device)

    @contextlib.contextmanager
    def micro_step(self, last: bool) -> Iterator[None]:
        if last or self.env.world_size == 1:
            yield
        else:
            with self.model.no_sync():
                yield


class FSDPStrategy(Strategy):
    name = "fsdp"

    def __init__(self, module: torch.nn.Module, env: DistEnv, training: TrainingConfig, optim: OptimizerConfig):
        super().__init__(module, env, training)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from crucible.trainer.meta_init import materialise_sharded, pending_init

        deferred = pending_init(module)
        if deferred is None:
            module.to(env.device)
        mesh = init_device_mesh(env.device.type, (env.world_size,))
        kwargs: dict[str, Any] = {"mesh": mesh}
        if env.device.type == "cuda" and self.precision.dtype is not None:  # on CPU: autocast (gloo)
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=self.precision.dtype, reduce_dtype=torch.float32)
            self.precision_in_params = True
        for layer in _decoder_layers(module):
            fully_shard(layer, **kwargs)
        fully_shard(module, **kwargs)
        if deferred is not None:  # sharded on meta: now each rank allocates and fills its own shards
            materialise_sharded([module], deferred, env.device)
        self.model = module
        self.optimizer = build_adamw(module, optim, env.device)

    @contextlib.contextmanager
    def micro_step(self, last: bool) -> Iterator[None]:
        self.module.set_requires_gradient_sync(last)  # type: ignore[operator]
        yield


def _decoder_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    inner = getattr(module, "model", None)
    if hasattr(module, "base_model") and hasattr(module.base_model, "model"):  # peft
        inner = getattr(module.base_model.model, "model", inner)
    layers = getattr(inner, "layers", None)
    return list(layers) if layers is not None else []


class DeepSpeedStrategy(Strategy):
    name = "deepspeed"
    world_size_bound = True
    TAG = "deepspeed"

    def __init__(
        self,
        module: torch.nn.Module,
        env: DistEnv,
        training: TrainingConfig,
        optim: OptimizerConfig,
        grad_accum: int,
    ):
        super().__init__(module, env, training)
        import deepspeed

        self.scaler = None  # DeepSpeed scales fp16 losses itself
        from crucible.trainer.meta_init import materialise_whole

        materialise_whole(module, env.device)
        zero: dict[str, Any] = {"stage": training.zero_stage}
        if env.device.type == "cpu":
            zero["reduce_scatter"] = False  # gloo has no reduce_scatter for stage 1/2 buckets
        if training.zero_stage == 3:
            zero["stage3_gather_16bit_weights_on_model_save"] = False
        config = {
            "train_micro_batch_size_per_gpu": training.micro_batch_size,
            "gradient_accumulation_steps": grad_accum,
            "train_batch_size": training.micro_batch_size * grad_accum * env.world_size,
            "gradient_clipping": optim.grad_clip,
            "zero_optimization": zero,
            "bf16": {"enabled": self.precision.name == "bf16"},
            "fp16": {"enabled": self.precision.name == "fp16"},  # DeepSpeed's own dynamic loss scaling
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**12,
            "wall_clock_breakdown": False,
            "checkpoint": {"load_universal": False},
        }
        optimizer = build_adamw(module, optim, env.device)
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=config, dist_init_required=False
        )
        self.engine = engine
        self.model = engine
        self.optimizer = ds_optimizer

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)
        if not last:
            self.engine.step()  # a micro-step: DeepSpeed only counts it

    def optimizer_step(self, lr: float, grad_clip: float) -> float:
        set_lr(self.optimizer, lr)
        self.engine.step()  # the accumulation boundary: reduce, clip, step, zero
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def full_state(self, with_optimizer: bool = True) -> dict[str, Any] | None:
        raise NotImplementedError("DeepSpeed checkpoints are written per rank by save_local")

    def save_local(self, directory: Path) -> list[Path]:
        self.engine.save_checkpoint(str(directory), tag=self.TAG, client_state={}, save_latest=False)
        mine = [p for p in sorted((directory / self.TAG).glob("*")) if _rank_of(p.name) in (self.env.rank, None)]
        # Files not tagged with a rank (mp_rank_00_model_states.pt) are written by rank 0 only.
        return [p for p in mine if _rank_of(p.name) == self.env.rank or (self.env.is_main and _rank_of(p.name) is None)]

    def load_local(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(
            str(directory), tag=self.TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory}")

    def owns_checkpoint_file(self, name: str) -> bool:
        owner = _rank_of(name)
        return owner is None or owner == self.env.rank

    def export_state(self) -> dict[str, torch.Tensor] | None:
        import deepspeed

        if self.training.zero_stage == 3:
            params = list(self.module.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                state = _detached_copy(self.module.state_dict()) if self.env.is_main else None
            return state
        return _detached_copy(self.module.state_dict()) if self.env.is_main else None

    def export_stream(self) -> tuple[list[Spec], Iterator[tuple[str, torch.Tensor | None]]]:
        """DeepSpeed's ZeRO partitions have no global shapes here: gathered whole on rank 0 first."""
        state = self.export_state() or {}
        return [(n, tuple(t.shape), t.dtype) for n, t in state.items()], iter(list(state.items()))


def _rank_of(filename: str) -> int | None:
    """The data-parallel rank a DeepSpeed checkpoint file belongs to (None: rank-0 shared)."""
    import re

    m = re.search(r"(?:zero_pp_rank|dp_rank)_(\d+)", filename)
    return int(m.group(1)) if m else None


def build_strategy(
    module: torch.nn.Module,
    env: DistEnv,
    training: TrainingConfig,
    optim: OptimizerConfig,
    grad_accum: int,
) -> Strategy:
    if training.activation_checkpointing and hasattr(module, "gradient_checkpointing_enable"):
        module.gradient_checkpointing_enable(  # type: ignore[operator]
            gradient_checkpointing_kwargs={"use_reentrant": False})
    if training.parallelism is not None:  # tensor × pipeline × FSDP2 layout (crucible.trainer.parallel)
        from crucible.trainer.parallel.strategy import ParallelStrategy

        strategy: Strategy = ParallelStrategy(module, env, training, optim, grad_accum)
    elif training.strategy == "ddp":
        strategy = DDPStrategy(module, env, training, optim)
    elif training.strategy == "fsdp":
        strategy = FSDPStrategy(module, env, training, optim)
    else:
        strategy = DeepSpeedStrategy(module, env, training, optim, grad_accum)
    if training.compile and training.strategy != "deepspeed" and strategy.model is not None:
        strategy.model = torch.compile(strategy.model)
    return strategy
