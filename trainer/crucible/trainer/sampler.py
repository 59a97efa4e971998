"""Deterministic, resumable, world-size-independent sampling of training examples.

Every objective's data goes through :class:`GlobalSampler`: a global order of example
indices (a fresh seeded permutation each epoch) read as one logical stream of *positions*.
Each micro-step consumes the next ``world_size × micro_batch_size`` positions; rank ``r``
takes the ``r``-th slice. The state is just ``{position, skip windows}``, identical on
every rank, so:

* resume is exact: the checkpoint's position continues the same stream;
* a changed world size continues the same global order (each global batch is still the next
  block of positions), which is what lets checkpoints reshard;
* loss-spike rollback skips data by position windows ``[start, end)`` that every later
  resume skips too (they are saved with the position).

:class:`BatchIterator` turns a sampler and a ``fetch(indices) -> batch`` function into the
:class:`ResumableIterator` the engine expects; :class:`PackedSequences` is the pretraining
dataset: the token-shard stream cut into fixed ``seq_len`` sequences.

Post-training objectives reuse this by giving ``BatchIterator`` their own ``fetch`` over
their examples (tokenized SFT records, preference pairs) and ``num_items``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from crucible.trainer.data.shards import ShardSet


@runtime_checkable
class ResumableIterator(Protocol):
    """An iterator of micro-batches whose position survives a restart.

    ``position`` counts global examples consumed (the same number on every rank);
    ``skip(start, end)`` makes it never yield positions in ``[start, end)``.
    """

    @property
    def position(self) -> int: ...

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]: ...
    def __next__(self) -> dict[str, torch.Tensor]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def skip(self, start: int, end: int) -> None: ...


class GlobalSampler:
    def __init__(
        self,
        num_items: int,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool = True,
    ) -> None:
        if num_items < micro_batch_size * world_size:
            raise ValueError(
                f"only {num_items} examples, fewer than one micro-batch across all ranks "
                f"({micro_batch_size} × {world_size}); add data or lower training.microBatchSize"
            )
        self.num_items = num_items
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.position = 0
        self.skips: list[tuple[int, int]] = []
        self._perm_epoch = -1
        self._perm = np.arange(num_items)

    @property
    def global_micro_batch(self) -> int:
        return self.micro_batch_size * self.world_size

    def _index(self, pos: int) -> int:
        epoch, offset = divmod(pos, self.num_items)
        if not self.shuffle:
            return offset
        if epoch != self._perm_epoch:
            self._perm = np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(self.num_items)
            self._perm_epoch = epoch
        return int(self._perm[offset])

    def _skipped(self, pos: int) -> int | None:
        """End of the skip window containing ``pos``, or None."""
        for start, end in self.skips:
            if start <= pos < end:
                return end
        return None

    def next_indices(self) -> list[int]:
        """This rank's example indices of the next micro-step; advances the global position."""
        positions: list[int] = []
        pos = self.position
        while len(positions) < self.global_micro_batch:
            end = self._skipped(pos)
            if end is not None:
                pos = end
                continue
            positions.append(pos)
            pos += 1
        self.position = pos
        mine = positions[self.rank * self.micro_batch_size : (self.rank + 1) * self.micro_batch_size]
        return [self._index(p) for p in mine]

    def skip(self, start: int, end: int) -> None:
        if end > start:
            self.skips.append((int(start), int(end)))
            self.skips.sort()

    @property
    def epoch(self) -> float:
        return self.position / self.num_items

    def state_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "skips": [list(w) for w in self.skips],
            "numItems": self.num_items,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state.get("numItems", self.num_items)) != self.num_items:
            raise ValueError(
                f"the checkpoint's data has {state['numItems']} examples but the data now has "
                f"{self.num_items}; resuming would not continue the same order. Point data.uri at the "
                "original DataPipeline output or set checkpoint.resume: never"
            )
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(
                f"the checkpoint was trained with training.seed {state['seed']}, the spec now says "
                f"{self.seed}; restore the seed or start a new run"
            )
        self.position = int(state["position"])
        self.skips = sorted((int(a), int(b)) for a, b in state.get("skips", []))


class BatchIterator:
    """Micro-batches from ``fetch(indices)``, in the order of a :class:`GlobalSampler`."""

    def __init__(self, sampler: GlobalSampler, fetch: Callable[[list[int]], dict[str, torch.Tensor]]) -> None:
        self.sampler = sampler
        self.fetch = fetch

    @property
    def position(self) -> int:
        return self.sampler.position

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.fetch(self.sampler.next_indices())

    def skip(self, start: int, end: int) -> None:
        self.sampler.skip(start, end)

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


class PackedSequences:
    """A token-shard split cut into ``len // seq_len`` sequences of ``seq_len`` tokens.

    Sequences cross document boundaries (EOS separates documents inside the stream), as in
    GPT-style packed pretraining; ``labels`` equal ``input_ids`` (the model shifts them).
    """

    def __init__(self, shards: ShardSet, seq_len: int) -> None:
        self.shards = shards
        self.seq_len = seq_len
        self.num_items = shards.num_tokens // seq_len

    def __len__(self) -> int:
        return self.num_items

    def fetch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        rows = [self.shards.read(i * self.seq_len, self.seq_len) for i in indices]
        ids = torch.from_numpy(np.stack(rows))  # (B, T) int64
        return {"input_ids": ids, "labels": ids}
