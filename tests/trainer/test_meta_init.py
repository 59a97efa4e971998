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


def save_tiny_source(folder: Path, vocab: int = 128) -> Path:
    """A tiny Llama saved by transformers in several safetensors files (50 KB each) with an index."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         tie_word_embeddings=False))
    model.save_pretrained(folder, max_shard_size="50KB")
    assert len(list(folder.glob("model-*.safetensors"))) > 2 and (folder / "model.safetensors.index.json").is_file()
    return folder


def test_source_read_through_slices_equals_from_pretrained(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from crucible.trainer.meta_init import materialise_whole, pending_init
    from crucible.trainer.model import source_meta_model

    source = save_tiny_source(tmp_path / "src")
    model = source_meta_model(source, str(source))
    assert model is not None and all(p.is_meta for p in model.parameters())
    reader = pending_init(model)
    materialise_whole(model, torch.device("cpu"))
    want = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    a, b = want.state_dict(), model.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    for name, buf in want.named_buffers():
        assert torch.equal(buf, model.get_buffer(name)), name
    assert reader is not None and reader.bytes_read == reader.bytes_total > 0  # one process reads it all


def test_sharded_layouts_fill_their_shards_with_the_cpu_build_and_export_shard_wise(tmp_path: Path) -> None:
    from meta_worker import CASES

    source = save_tiny_source(tmp_path / "src")
    cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(HERE / "meta_worker.py"), str(tmp_path), str(source)]
    env = trainer_env(PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=scaled(240))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    for name in CASES:
        result = json.loads((tmp_path / f"{name}.json").read_text())
        assert result["differ"] == [], name
        assert result["rng"], name
        assert result["lossesEqual"], name  # two training steps: float.hex-equal losses, meta vs CPU build
        assert result["n"] > 10
        # the streamed export: several files + index, the old export's tensors and config
        assert result["exportDiffer"] == [], name
        assert result["configSame"], name
        assert result["files"] > 1 and "model.safetensors.index.json" in result["newFiles"], name
        assert set(result["oldFiles"]) - {"model.safetensors"} <= set(result["newFiles"]), name
        assert result["peakGroupBytes"] < result["bytes"] / 2, name  # never the whole model at once
    # FSDP2 from a sharded Hugging Face source: the shards equal from_pretrained's, each rank read half
    source_result = json.loads((tmp_path / "source.json").read_text())
    assert source_result["differ"] == []
    total, reads = source_result["total"], source_result["reads"]
    assert sum(reads) == total and all(r <= total / 2 + 1024 for r in reads), source_result


def test_continued_pretraining_from_s3_reads_a_quarter_per_rank_and_fetches_once_per_node(
        shards: Path, tmp_path: Path, s3_server: str, s3_bucket: str) -> None:
    from trainlib import run_stage, step_losses, tiny_spec

    from crucible.trainer import storage as st
    from crucible.trainer.config.common import S3Config

    source = save_tiny_source(tmp_path / "src")
    store = st.Storage(S3Config(endpoint_url=s3_server, addressing_style="path"))
    store.upload_dir(source, f"s3://{s3_bucket}/base")
    spec = tiny_spec(shards, tmp_path / "run", model={"source": {"uri": f"s3://{s3_bucket}/base"}},
                     training={"strategy": "fsdp", "globalBatchTokens": 512, "microBatchSize": 4, "maxSteps": 2},
                     checkpoint={"interval": 100}, storage={"s3": {"endpointUrl": s3_server, "addressingStyle": "path"}})
    rc, log = run_stage(spec, tmp_path / "job", nproc=4, CRUCIBLE_NODE_CACHE=str(tmp_path / "node-cache"))
    assert rc == 0, log[-4000:]
    results = json.loads((tmp_path / "run" / "model" / "_SUCCESS").read_text())["results"]
    total, reads = results["sourceBytes"], results["sourceBytesRead"]
    assert len(reads) == 4 and sum(reads) == total
    assert all(r <= total / 4 + 1024 for r in reads), reads  # its quarter of every tensor (norms too)
    assert log.count("model.source.uri s3://") == 4
    assert log.count("downloaded once for this node") >= 1  # the base model, data splits, tokenizer
    fetched = [line for line in log.splitlines() if "model.source.uri" in line and "downloaded once" in line]
    assert len(fetched) == 1, fetched  # one rank downloaded, three found it in the node cache
    losses = step_losses(tmp_path / "run" / "checkpoints")
    assert sorted(losses) == [1, 2] and all(v == v for v in losses.values())
