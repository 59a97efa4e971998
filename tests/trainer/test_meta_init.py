"""Meta-device initialisation: built on meta, sharded, then filled shard by shard with exactly the
weights (and the RNG stream) of the CPU build, so the engine's losses do not change."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from trainlib import PYTHON, REPO, free_port, trainer_env

from waits import scaled

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("model", [
    {},
    {"tieWordEmbeddings": True},
    {"architecture": "mixtral", "moe": {"numExperts": 4, "topK": 2, "everyNLayers": 2}},
])
def test_meta_build_materialised_equals_the_cpu_build(model: dict[str, object]) -> None:
    from crucible.trainer.config.training import ModelConfig
    from crucible.trainer.meta_init import materialise_whole
    from crucible.trainer.model import build_meta_model, build_model

    cfg = ModelConfig.model_validate({"hiddenSize": 32, "numLayers": 2, "numHeads": 4, "numKvHeads": 2, **model})
    want = build_model(cfg, 96, seed=5)
    rng_after_cpu_build = torch.random.get_rng_state()
    torch.manual_seed(123)  # whatever came before: the build seeds itself
    got = build_meta_model(cfg, 96, seed=5)
    assert all(p.is_meta for p in got.parameters()) and all(b.is_meta for b in got.buffers())
    materialise_whole(got, torch.device("cpu"))
    assert torch.equal(torch.random.get_rng_state(), rng_after_cpu_build)  # later draws unchanged too
    a, b = want.state_dict(), got.state_dict()
    assert list(a) == list(b)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    for name, buf in want.named_buffers():  # non-persistent (rotary tables) as well
        assert torch.equal(buf, got.get_buffer(name)), name
    if cfg.tie_word_embeddings:
        assert got.lm_head.weight is got.model.embed_tokens.weight


def test_sharded_layouts_fill_their_shards_with_the_cpu_build_and_export_shard_wise(tmp_path: Path) -> None:
    from meta_worker import CASES

    cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(HERE / "meta_worker.py"), str(tmp_path)]
    env = trainer_env(PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=scaled(240))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    for name in CASES:
        result = json.loads((tmp_path / f"{name}.json").read_text())
        assert result["differ"] == [], name
        assert result["rng"], name
        assert result["n"] > 10
        # the streamed export: several files + index, the old export's tensors and config
        assert result["exportDiffer"] == [], name
        assert result["configSame"], name
        assert result["files"] > 1 and "model.safetensors.index.json" in result["newFiles"], name
        assert set(result["oldFiles"]) - {"model.safetensors"} <= set(result["newFiles"]), name
        assert result["peakGroupBytes"] < result["bytes"] / 2, name  # never the whole model at once
