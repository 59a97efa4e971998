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

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
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


def record_construction(build: Callable[[], nn.Module],
                        transformers_model: bool = True) -> tuple[nn.Module, list[_Draw]]:
    """``build()`` on meta with Hugging Face's init forced on, and the random ops of both in order.

    Hugging Face skips ``initialize_weights`` under a meta device; here it runs (on meta tensors,
    so for nothing but the record), because a sub-model's ``post_init`` initialises it in the
    middle of its parent's construction and the order of the draws decides their values.
    ``transformers_model=False``: a module that initialises itself on any device
    (:mod:`crucible.trainer.llama`), built without importing transformers.
    """
    recorder = _RecordRandom()
    with contextlib.ExitStack() as stack:
        if transformers_model:
            from transformers import modeling_utils

            stack.enter_context(mock.patch.object(modeling_utils, "get_torch_context_manager_or_global_device",
                                                  lambda: torch.device("cpu")))
        stack.enter_context(torch.device("meta"))
        stack.enter_context(recorder)
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


class _Targets:
    """The live tensors of ``modules`` by name, allocated (``to_empty``) on ``device``, and which were written."""

    def __init__(self, modules: list[nn.Module], device: torch.device) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        for module in modules:
            _to_empty_keeping_ties(module, device)
            for name, t in [*module.named_parameters(), *module.named_buffers()]:
                self.tensors.setdefault(name, t)  # a tied weight is listed once, under its source
        self.written: set[str] = set()

    def write(self, name: str, full: torch.Tensor) -> None:
        target = self.tensors.get(name)
        if target is None:  # on another rank, replaced (a dense MLP under MoE) or tied away
            return
        copy_into(target, full)
        self.written.add(name)

    def unwritten(self) -> set[str]:
        return set(self.tensors) - self.written

    def check(self, what: str) -> None:
        missing = sorted(self.unwritten())
        if missing:
            raise RuntimeError(f"{what} left {len(missing)} tensors unset, e.g. {missing[:3]}")


def init_non_random(twin: nn.Module, wanted: set[str], write: Callable[[str, torch.Tensor], None]) -> None:
    """Norm weights, rotary tables, zero biases: the model's own ``_init_weights`` on CPU, module by
    module of a meta ``twin``; a tensor that init does not set (it was set at construction) is an error."""
    if not wanted:
        return
    with torch.random.fork_rng(devices=[]):  # nothing random is kept from here on
        for prefix, module in twin.named_modules():
            own = [(f"{prefix}.{n}" if prefix else n)
                   for n, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]]
            if not wanted.intersection(own):
                continue
            module.to_empty(device="cpu", recurse=False)
            tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
            for t in tensors:
                if t.is_floating_point():
                    t.data.fill_(float("nan"))
            twin._init_weights(module)  # type: ignore[operator]
            for name, t in zip(own, tensors, strict=True):
                if name in wanted:
                    if t.is_floating_point() and bool(t.isnan().any()):
                        raise NotImplementedError(f"meta-device init: {name} is set at construction, "
                                                  "not by the model's _init_weights")
                    write(name, t)
            module.to_empty(device="meta", recurse=False)


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
        targets = _Targets(modules, device)
        # the global generator advances exactly as the CPU build advanced it
        torch.manual_seed(self.seed)
        random_names = set()
        for draw in self.draws:
            value = _redraw(draw)
            if value is not None and draw.keep is not None:
                targets.write(draw.keep, value)
                random_names.add(draw.keep)
            del value
        for step in self.later:
            step(targets.write)
        init_non_random(self.twin(), targets.unwritten() - random_names, targets.write)
        targets.check("meta-device init")


@dataclass
class SafetensorsInit:
    """Materialise a model built on meta from a Hugging Face folder's safetensors, each rank reading
    only the slices it holds (``safe_open(...).get_slice``, files found through the index)."""

    folder: Path
    twin: Callable[[], nn.Module]
    uri: str  #: for messages: what the user named (``model.source.uri``)
    #: bytes of tensor data this rank read, and the source's total
    bytes_read: int = 0
    bytes_total: int = 0

    def weight_map(self) -> dict[str, str]:
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            return dict(json.loads(index.read_text())["weight_map"])
        from safetensors import safe_open

        with safe_open(str(self.folder / "model.safetensors"), framework="pt") as f:
            return {name: "model.safetensors" for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__

    def materialise(self, modules: list[nn.Module], device: torch.device) -> None:
        from safetensors import safe_open

        targets = _Targets(modules, device)
        where = self.weight_map()
        by_file: dict[str, list[str]] = {}
        for name in targets.tensors:
            if name in where:
                by_file.setdefault(where[name], []).append(name)
        for filename, names in sorted(by_file.items()):
            with safe_open(str(self.folder / filename), framework="pt", device="cpu") as f:
                for name in names:
                    sl = f.get_slice(name)
                    self.bytes_total += _slice_nbytes(sl, None)
                    target = targets.tensors[name]
                    index = _local_index(target)
                    piece = sl[index] if index is not None else sl[:]
                    self.bytes_read += piece.numel() * piece.element_size()
                    if index is not None:
                        with torch.no_grad():
                            _local(target).copy_(piece)
                        targets.written.add(name)
                    else:
                        targets.write(name, piece)
                    del piece
        for filename in set(where.values()) - set(by_file):  # files this rank needs nothing from
            with safe_open(str(self.folder / filename), framework="pt") as f:
                self.bytes_total += sum(_slice_nbytes(f.get_slice(n), None) for n in f.keys())  # noqa: SIM118
        stored = set(where)
        init_non_random(self.twin(), {n for n in targets.unwritten() if n not in stored}, targets.write)
        missing = sorted(targets.unwritten())
        if missing:
            from crucible.trainer.faults import SpecError

            raise SpecError(f"model.source.uri {self.uri}: the safetensors lack {len(missing)} tensors of the "
                            f"model its config.json describes, e.g. {missing[:3]}; export the model with "
                            "transformers' save_pretrained")


def _slice_nbytes(sl: Any, _: Any) -> int:
    n = 1
    for d in sl.get_shape():
        n *= int(d)
    return n * _ST_ITEMSIZE.get(sl.get_dtype(), 4)


_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _local_index(target: torch.Tensor) -> tuple[slice, ...] | None:
    """This rank's block of a DTensor sharded by plain ``Shard``/``Replicate`` placements, as slices of
    the global tensor; None for a plain tensor or a strided layout (then read whole and sliced)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(target, DTensor) or not all(type(p) in (Shard, Replicate) for p in target.placements):
        return None
    shape, offset = compute_local_shape_and_global_offset(target.shape, target.device_mesh, target.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))


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


def pending_init(module: nn.Module) -> DeferredInit | SafetensorsInit | None:
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


def materialise_sharded(modules: list[nn.Module], init: DeferredInit | SafetensorsInit, device: torch.device) -> None:
    """Modules already sharded on meta (FSDP2, tensor parallel) made real: each rank its own shards."""
    init.materialise(modules, device)
    for module in modules:
        _done(module)


def _done(module: nn.Module) -> None:
    if hasattr(module, "_crucible_deferred_init"):
        del module._crucible_deferred_init
