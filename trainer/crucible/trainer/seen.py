"""``seen.npy``: the sorted 64-bit keys of what a revision and the earlier ones trained on.

A DataPipeline revision keeps the content keys of its documents, a FinetuneRun revision the keys of
its records; the next revision reads the earlier outputs' files to drop what they already saw.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from crucible.trainer.storage import Storage

SEEN = "seen.npy"


def read_seen(store: Storage, uris: Sequence[str], field: str, what: str) -> np.ndarray | None:
    """The union of the ``seen.npy`` keys below ``uris`` (sorted, unique); None when none is named.

    ``field`` is the dotted spec field that lists them (errors name ``field[i]``), ``what`` the kind of
    output it must name ("a finished DataPipeline (revisions before this one)").
    """
    from crucible.trainer.faults import SpecError
    from crucible.trainer.storage import StorageNotFound, join

    if not uris:
        return None
    arrays = [np.zeros(0, dtype=np.uint64)]
    for i, uri in enumerate(uris):
        where = f"{field}[{i}]"
        try:
            arrays.append(np.load(io.BytesIO(store.read_bytes(join(uri, SEEN)))).astype(np.uint64))
        except (StorageNotFound, FileNotFoundError, NotADirectoryError) as exc:
            raise SpecError(f"{where}: {uri} has no {SEEN}; name the output folder of {what}") from exc
        except ValueError as exc:
            raise SpecError(f"{where}: {join(uri, SEEN)} is not a key array ({exc}); restore it from the earlier "
                            "revision or remove the entry") from exc
    return np.unique(np.concatenate(arrays))
