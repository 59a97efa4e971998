"""Balanced work for N filter workers: byte ranges of the whole input, cut inside large files.

The inputs, in order, are laid end to end as one stream of ``total`` bytes and worker ``p``
takes ``[p*total/N, (p+1)*total/N)``:

- a plain jsonl file is cut at those byte offsets; a worker reads the lines that *start* in
  its range (:class:`readers.Piece`), so every line is read exactly once;
- a parquet file is cut between row groups: a row group goes to the worker whose range holds
  the row group's first byte (only files that straddle a cut have their footer read);
- compressed files (.gz, .zst) and text files (one document per file) cannot be cut and go
  whole to the worker whose range holds their first byte.

Documents keep the key and id they get when the file is read whole (the record number
counts the lines before the range), so the output is the same for any number of workers.
"""

from __future__ import annotations

import logging

from crucible.trainer.data.readers import InputFile, Piece, _Opened
from crucible.trainer.storage import Storage

log = logging.getLogger("crucible.data")


def _row_group_starts(item: InputFile, storage: Storage) -> list[int]:
    """Byte offset of the first column chunk of every row group of a parquet file."""
    import pyarrow.parquet as pq

    try:
        with _Opened(item, storage) as path:
            meta = pq.ParquetFile(path).metadata
    except Exception as exc:  # an unreadable file is read whole; the reader reports it
        log.debug("%s: no parquet footer (%s); read whole", item.uri, exc)
        return [0]
    starts = []
    for g in range(meta.num_row_groups):
        col = meta.row_group(g).column(0)
        offset = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
        starts.append(int(offset or 0))
    return starts or [0]


def plan_pieces(inputs: list[InputFile], parts: int, storage: Storage) -> list[list[Piece]]:
    """The pieces of every worker (in input order within a worker, workers in input order)."""
    sizes = [max(f.size, 0) for f in inputs]
    total = sum(sizes)
    out: list[list[Piece]] = [[] for _ in range(parts)]
    if total == 0:  # sizes unknown or all empty: whole files, by count
        for i, f in enumerate(inputs):
            out[i * parts // max(len(inputs), 1)].append(Piece(f))
        return out

    def owner(offset: int) -> int:
        return min(parts - 1, offset * parts // total)

    def cut(p: int) -> int:  # first global byte of worker p
        return -(-p * total // parts)

    base = 0
    for f, size in zip(inputs, sizes, strict=True):
        first, last = owner(base), owner(base + size - 1) if size else owner(base)
        if first == last or not f.splittable or parts == 1:
            out[first].append(Piece(f))
        elif f.format == "jsonl":
            for p in range(first, last + 1):
                start = max(cut(p), base) - base
                stop = min(cut(p + 1), base + size) - base
                out[p].append(Piece(f, start, None if p == last else stop))
        else:  # parquet: whole row groups
            starts = _row_group_starts(f, storage)
            owners = [owner(base + s) for s in starts]
            for p in sorted(set(owners)):
                idx = [g for g, o in enumerate(owners) if o == p]
                out[p].append(Piece(f, idx[0], None if idx[-1] == len(starts) - 1 else idx[-1] + 1))
        base += size
    return out
