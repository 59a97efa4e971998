"""Build a model on ``meta``, shard it, then materialise it one tensor at a time.

The seeded initialisation must stay *exactly* what building the model on CPU gives (the suite
compares per-step losses bit for bit), so materialising replays the CPU build's random stream:

1. ``torch.manual_seed(seed)``;
2. the random draws of construction (``nn.Linear`` and ``nn.Embedding`` initialise themselves in
   ``__init__``), recorded while the model was built on meta, are redrawn on CPU tensors of the
   same shapes and thrown away — they only advance the generator as they did;
3. Hugging Face's own ``initialize_weights`` walks a meta twin of the model in its own order
   (``smart_apply``, children first); before each module's ``_init_weights`` its own tensors
   (not its children's) are made real on CPU at full size, and after it each one is copied into
   the live model — for a DTensor (FSDP2 shards, tensor-parallel pieces) only this rank's slice —
   and freed. A tied weight keeps its source's value, as ``tie_weights`` does after the init;
4. extra seeded init after that (the MoE blocks, :func:`crucible.trainer.moe.install_moe`) runs
   through :meth:`DeferredInit.then`.

So no rank holds more than one full tensor of the model beyond its own shards. Every parameter
and buffer of the live model must be written exactly once; one that is not is an error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only


@dataclass(frozen=True)
class _Spec:
    shape: tuple[int, ...]
    dtype: torch.dtype


def _spec(t: torch.Tensor) -> _Spec:
    return _Spec(tuple(t.shape), t.dtype)


def _storage_key(t: torch.Tensor) -> int:
    return int(t.untyped_storage()._cdata)


def _is_whole(t: torch.Tensor) -> bool:
    return t.storage_offset() == 0 and t.is_contiguous() and t.numel() * t.element_size() == t.untyped_storage().nbytes()


@dataclass
class _Draw:
    """One random aten op of the build: redrawn at full size on CPU, kept when it gives a final value."""

    func: Any
    args: Any
    kwargs: Any
    key: int | None  #: storage the op wrote (in place: its first argument; a factory: its output)
    keep: str | None = None  #: the parameter/buffer name whose final value this draw is


class _RecordRandom(TorchDispatchMode):
    """Records the random aten ops run under it, and which storage each op (random or not) last wrote."""

    def __init__(self) -> None:
        super().__init__()
        self.draws: list[_Draw] = []
        self.last_write: dict[int, tuple[int | None, bool]] = {}  #: storage -> (draw index or None, whole)
        self._alive: list[torch.Tensor] = []  # storages stay alive, so their keys are not reused

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        random = torch.Tag.nondeterministic_seeded in func.tags
        written = args[0] if func._schema.is_mutable and args and isinstance(args[0], torch.Tensor) else None
        if random:
            self.draws.append(_Draw(func, tree_map_only(torch.Tensor, _spec, args),
                                    tree_map_only(torch.Tensor, _spec, kwargs), None))
        out = func(*args, **kwargs)
        if written is None and random and isinstance(out, torch.Tensor):
            written = out
        if written is not None:
            key = _storage_key(written)
            self._alive.append(written)
            if random:
                self.draws[-1].key = key
            self.last_write[key] = (len(self.draws) - 1 if random else None, _is_whole(written))
        return out


def record_construction(build: Callable[[], nn.Module]) -> tuple[nn.Module, list[_Draw]]:
    """``build()`` on meta with Hugging Face's init forced on, and the random ops of both in order.

    Hugging Face skips ``initialize_weights`` under a meta device; here it runs (on meta tensors,
    so for nothing but the record), because a sub-model's ``post_init`` initialises it in the
    middle of its parent's construction and the order of the draws decides their values.
    """
    from transformers import modeling_utils

    recorder = _RecordRandom()
    with mock.patch.object(modeling_utils, "get_torch_context_manager_or_global_device",
                           lambda: torch.device("cpu")), torch.device("meta"), recorder:
        model = build()
    finals: dict[int, str] = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        finals.setdefault(_storage_key(t), name)
    for key, (index, whole) in recorder.last_write.items():
        final = finals.get(key)
        if final is None or index is None:
            continue
        if not whole:
            raise NotImplementedError(f"meta-device init: {final} is last written in part by a random op")
        recorder.draws[index].keep = final
    for draw in recorder.draws:  # a key of a tensor no longer in the model is of no more use
        draw.key = None
    return model, recorder.draws


def _redraw(draw: _Draw) -> torch.Tensor | None:
    def real(spec: Any) -> Any:
        return torch.empty(spec.shape, dtype=spec.dtype) if isinstance(spec, _Spec) else spec

    args = tree_map_only(_Spec, real, draw.args)
    out = draw.func(*args, **tree_map_only(_Spec, real, draw.kwargs))
    if draw.keep is None:
        return None
    return out if isinstance(out, torch.Tensor) else args[0]


def is_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in _tensors(module))


def _tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def copy_into(target: torch.Tensor, full: torch.Tensor) -> None:
    """Write the full tensor ``full`` into ``target``: all of it, or this rank's slice of a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        if isinstance(target, DTensor):
            full = full.to(device=target.device, dtype=target.dtype)
            piece = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)
            target.to_local().copy_(piece.to_local())
        else:
            target.copy_(full)


@dataclass
class DeferredInit:
    """How to materialise a model built on meta with the seeded init a CPU build would give it."""

    draws: list[_Draw]  #: the random ops of the build, in order (from :func:`record_construction`)
    twin: Callable[[], nn.Module]  #: a plain meta copy of the Hugging Face model, for the non-random init
    seed: int
    #: more seeded init after Hugging Face's: called with write(name, full tensor), in order
    later: list[Callable[[Callable[[str, torch.Tensor], None]], None]] = field(default_factory=list)

    def then(self, step: Callable[[Callable[[str, torch.Tensor], None]], None]) -> None:
        self.later.append(step)

    def materialise(self, modules: list[nn.Module], device: torch.device) -> None:
        """Allocate ``modules`` (this rank's shards of one model, or pieces of it) on ``device`` and
        fill them; no collectives: every rank computes the same full tensors and keeps its slice."""
        targets: dict[str, torch.Tensor] = {}
        for module in modules:
            _to_empty_keeping_ties(module, device)
            for name, t in [*module.named_parameters(), *module.named_buffers()]:
                targets.setdefault(name, t)  # a tied weight is listed once, under its source
        written: set[str] = set()

        def write(name: str, full: torch.Tensor) -> None:
            target = targets.get(name)
            if target is None:  # on another rank, replaced (a dense MLP under MoE) or tied away
                return
            copy_into(target, full)
            written.add(name)

        # the global generator advances exactly as the CPU build advanced it
        torch.manual_seed(self.seed)
        random_names = set()
        for draw in self.draws:
            value = _redraw(draw)
            if value is not None and draw.keep is not None:
                write(draw.keep, value)
                random_names.add(draw.keep)
            del value
        for step in self.later:
            step(write)
        self._non_random(set(targets) - written - random_names, write)
        missing = sorted(set(targets) - written)
        if missing:
            raise RuntimeError(f"meta-device init left {len(missing)} tensors unset, e.g. {missing[:3]}")

    def _non_random(self, wanted: set[str], write: Callable[[str, torch.Tensor], None]) -> None:
        """Norm weights, rotary tables, zero biases: the twin's own ``_init_weights`` on CPU, module by module."""
        if not wanted:
            return
        twin = self.twin()
        with torch.random.fork_rng(devices=[]):  # nothing random is kept from here on
            for prefix, module in twin.named_modules():
                own = [(f"{prefix}.{n}" if prefix else n)
                       for n, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]]
                if not wanted.intersection(own):
                    continue
                module.to_empty(device="cpu", recurse=False)
                for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                    if t.is_floating_point():
                        t.data.fill_(float("nan"))
                twin._init_weights(module)  # type: ignore[operator]
                for name, t in zip(own, [*module.parameters(recurse=False), *module.buffers(recurse=False)],
                                   strict=True):
                    if name in wanted:
                        if t.is_floating_point() and bool(t.isnan().any()):
                            raise NotImplementedError(f"meta-device init: {name} is set at construction, "
                                                      "not by the model's _init_weights")
                        write(name, t)
                module.to_empty(device="meta", recurse=False)


def _to_empty_keeping_ties(module: nn.Module, device: torch.device) -> None:
    """``to_empty``, with parameters shared by several modules (tied embeddings) shared again after."""
    groups: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    module.to_empty(device=device)
    for names in groups.values():
        source = module.get_parameter(names[0])
        for name in names[1:]:
            owner, _, leaf = name.rpartition(".")
            holder = module.get_submodule(owner) if owner else module
            if holder._parameters[leaf] is not source:
                holder._parameters[leaf] = source


def pending_init(module: nn.Module) -> DeferredInit | None:
    return getattr(module, "_crucible_deferred_init", None)


def materialise_whole(module: nn.Module, device: torch.device) -> None:
    """A model built on meta made real in full on ``device`` (DDP, DeepSpeed, tests); no-op otherwise."""
    init = pending_init(module)
    if init is None:
        if is_meta(module):
            raise RuntimeError("a model on the meta device without a recorded init")
        module.to(device)
        return
    init.materialise([module], device)
    _done(module)


def materialise_sharded(modules: list[nn.Module], init: DeferredInit, device: torch.device) -> None:
    """Modules already sharded on meta (FSDP2, tensor parallel) made real: each rank its own shards."""
    init.materialise(modules, device)
    for module in modules:
        _done(module)


def _done(module: nn.Module) -> None:
    if hasattr(module, "_crucible_deferred_init"):
        del module._crucible_deferred_init
