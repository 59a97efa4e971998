"""eval.memorization: verbatim continuations of training vs held-out documents, and the limit that fails a run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from trainlib import VOCAB, run_stage, tiny_spec, write_tokenizer

from crucible.trainer.data.shards import ShardWriter


def random_documents(root: Path, train: int = 8, validation: int = 8, length: int = 40, seed: int = 0) -> Path:
    """Documents of random tokens: nothing to generalise from, only to memorise."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("validation", validation)):
        writer = ShardWriter(root / split, vocab_size=VOCAB, eos_id=0, tokens_per_shard=4000)
        for _ in range(n):
            writer.add_document(rng.integers(1, VOCAB, size=length).tolist())
        writer.close()
    write_tokenizer(root / "tokenizer", VOCAB)
    (root / "manifest.json").write_text(json.dumps({"stage": "data"}))
    return root


def memorization_spec(data: Path, out: Path, steps: int, limit: float | None) -> dict:
    return tiny_spec(
        data, out,
        model={"hiddenSize": 64, "numLayers": 2, "numHeads": 4, "intermediateSize": 128, "vocabSize": VOCAB,
               "maxPositionEmbeddings": 64},
        training={"seqLen": 40, "globalBatchTokens": 320, "microBatchSize": 8, "maxSteps": steps, "evalEvery": 0,
                  "evalBatches": 1, "seed": 3},
        optimizer={"lr": 1e-2, "warmupSteps": 5, "weightDecay": 0.0, "schedule": "constant"},
        checkpoint={"uri": str(out / "checkpoints"), "interval": steps, "keep": 1, "asyncSave": False},
        eval={"memorization": {"documents": 8, "prefixTokens": 8, "continuationTokens": 8,
                               "maxTrainMatchRate": limit}},
    )


def test_a_model_that_memorised_its_data_is_caught_and_one_that_did_not_passes(tmp_path: Path) -> None:
    data = random_documents(tmp_path / "data")

    rc, log = run_stage(memorization_spec(data, tmp_path / "memorised", steps=150, limit=0.25), tmp_path / "job1")
    assert rc == 1, log[-3000:]
    assert "eval.memorization.maxTrainMatchRate" in log and "verbatim" in log
    out = tmp_path / "memorised" / "model"
    assert (out / "config.json").exists() and not (out / "_SUCCESS").exists()  # the model is kept, not succeeded

    rc, log = run_stage(memorization_spec(data, tmp_path / "fresh", steps=2, limit=0.25), tmp_path / "job2")
    assert rc == 0, log[-3000:]
    fresh = json.loads((tmp_path / "fresh" / "model" / "_SUCCESS").read_text())["results"]["memorization"]
    assert fresh["train"]["documents"] == 8 and fresh["heldOut"]["documents"] == 8
    assert fresh["train"]["exactMatchRate"] <= 0.25


def test_rates_of_a_memorising_model_against_a_generalising_one(tmp_path: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from crucible.trainer.config.training import MemorizationConfig
    from crucible.trainer.data.shards import ShardSet
    from crucible.trainer.memorization import memorization_check

    data = random_documents(tmp_path / "data", train=8, validation=8, length=24)
    train, validation = ShardSet(data / "train"), ShardSet(data / "validation")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=32))
    cfg = MemorizationConfig(documents=8, prefix_tokens=8, continuation_tokens=8)
    before = memorization_check(model, train, validation, cfg, seed=0)
    batch = torch.from_numpy(np.stack([d.astype(np.int64) for d in train.documents()]))  # (8, 24)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(120):
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = memorization_check(model, train, validation, cfg, seed=0)
    assert before["train"]["exactMatchRate"] == 0.0 and before["heldOut"]["exactMatchRate"] == 0.0
    assert after["train"]["exactMatchRate"] >= 0.75, after
    assert after["heldOut"]["exactMatchRate"] == 0.0
    assert after["ratio"] >= 6  # 6/8 train matches against the floor of 1/8 held out
    assert after["train"]["tokenMatchRate"] > after["heldOut"]["tokenMatchRate"]
