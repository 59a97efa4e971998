"""Sharded (DCP) checkpoints across gloo processes: every rank writes only its own shards; the
checkpoint reshards 4 → 2 and 2 → 4, across fsdp ↔ ddp, and the weights survive it exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from trainlib import run_stage, step_losses, tiny_spec, write_shards

from crucible.trainer.checkpoint import MANIFEST, step_dir_name

# a model wide enough that DCP's metadata is small next to the shards
MODEL = {"hiddenSize": 64, "numLayers": 2, "numHeads": 4, "intermediateSize": 128}


def _spec(data: Path, root: Path, strategy: str, steps: int, **training: Any) -> dict[str, Any]:
    return tiny_spec(data, root, model=MODEL,
                     training={"strategy": strategy, "maxSteps": steps, "globalBatchTokens": 1024, **training},
                     checkpoint={"interval": 4, "asyncSave": True, "keep": 3})


def _bytes_per_rank(step_dir: Path) -> tuple[dict[int, int], int]:
    manifest = json.loads((step_dir / MANIFEST).read_text())
    shards = {rel: meta for rel, meta in manifest["files"].items() if rel.endswith(".distcp")}
    per_rank: dict[int, int] = {}
    for meta in shards.values():
        per_rank[meta["rank"]] = per_rank.get(meta["rank"], 0) + int(meta["bytes"])
    return per_rank, sum(per_rank.values())


@pytest.mark.slow
def test_fsdp_on_four_ranks_writes_per_rank_shards_and_reshards_both_ways(tmp_path: Path) -> None:
    data = write_shards(tmp_path / "data")

    # 4 ranks, FSDP2: each rank writes its own file holding about a quarter of the bytes
    four = tmp_path / "four"
    rc, log = run_stage(_spec(data, four, "fsdp", 8), four / "job", nproc=4, timeout=600)
    assert rc == 0, log[-3000:]
    step8 = four / "checkpoints" / step_dir_name(8)
    per_rank, total = _bytes_per_rank(step8)
    assert sorted(per_rank) == [0, 1, 2, 3], per_rank
    for rank, size in per_rank.items():
        assert (step8 / "state" / f"__{rank}_0.distcp").is_file()
        assert size <= total * (1 / 4 + 0.10), f"rank {rank} wrote {size} of {total} bytes"
    assert all((step8 / "rng" / f"rank-{r:05d}.json").is_file() for r in range(4))
    four_losses = step_losses(four / "checkpoints")

    # 4 → 2 and fsdp → ddp: resume the step-4 checkpoint on two ranks and train to step 8
    two = tmp_path / "two"
    (two / "checkpoints").mkdir(parents=True)
    shutil.copytree(four / "checkpoints" / step_dir_name(4), two / "checkpoints" / step_dir_name(4))
    rc, log = run_stage(_spec(data, two, "ddp", 8), two / "job", nproc=2, timeout=600)
    assert rc == 0, log[-3000:]
    assert "written by 4 ranks, resuming on 2" in log and "resumed from" in log
    two_losses = step_losses(two / "checkpoints")
    assert sorted(two_losses) == [5, 6, 7, 8]
    for step in (5, 6, 7, 8):  # the same state and data; only the order of float sums differs
        assert two_losses[step] == pytest.approx(four_losses[step], rel=1e-4, abs=1e-5), (step, two_losses, four_losses)

    # 2 → 4 and ddp → fsdp: the finished 2-rank run's weights come back exactly on four ranks
    back = tmp_path / "back"
    (back / "checkpoints").mkdir(parents=True)
    shutil.copytree(two / "checkpoints" / step_dir_name(8), back / "checkpoints" / step_dir_name(8))
    rc, log = run_stage(_spec(data, back, "fsdp", 8), back / "job", nproc=4, timeout=600)
    assert rc == 0, log[-3000:]
    assert "written by 2 ranks, resuming on 4" in log
    assert (back / "model" / "model.safetensors").read_bytes() == (two / "model" / "model.safetensors").read_bytes()
