"""Several writers (one per worker) fill one split directory; one merged index reads them in order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from crucible.trainer.data.shards import INDEX_FILE, ShardFormatError, ShardSet, ShardWriter, write_index


def test_parts_merge_into_one_index(tmp_path: Path) -> None:
    infos = []
    expected: list[list[int]] = []
    for part in range(3):
        writer = ShardWriter(tmp_path, vocab_size=1000, eos_id=0, tokens_per_shard=1024, prefix=f"part-{part:05d}")
        for d in range(40):
            doc = [(part * 100 + d + k) % 999 + 1 for k in range(30 + d)]
            writer.add_document(doc)
            expected.append([*doc, 0])
        index = writer.close(write_index=False)
        assert index["documents"] == 40
        infos += writer.shards
    with pytest.raises(ShardFormatError):
        ShardSet(tmp_path)  # no index.json yet: the split is incomplete
    write_index(tmp_path, infos, vocab_size=1000, eos_id=0)
    shards = ShardSet(tmp_path, verify=True)
    assert (tmp_path / INDEX_FILE).exists()
    assert [s.bin_path.name.split("-")[1] for s in shards.shards] == sorted(s.bin_path.name.split("-")[1] for s in shards.shards)
    assert [d.tolist() for d in shards.documents()] == expected
    assert shards.num_tokens == sum(map(len, expected))
    assert np.array_equal(shards.read(0, 5), np.array(expected[0][:5]))
