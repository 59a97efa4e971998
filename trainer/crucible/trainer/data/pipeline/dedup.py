"""Stage 2, dedup: worker ``I`` links the documents that share a bucket of LSH bands ``b % N == I``.

The exact hash counts as band ``bands``. Each part writes ``links.npz`` (exact and near pairs of
document keys); the tokenize stage clusters every part's links. Worker 0 also trains the
tokenizer on a hash-chosen sample of the filtered documents (or adopts ``tokenizer.source``).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from crucible.trainer.data import tokenizer as tokenizer_lib
from crucible.trainer.data.minhash import bucket_pairs, exact_pairs
from crucible.trainer.data.pipeline import filter as filter_stage
from crucible.trainer.data.pipeline.state import PipelineState, part_dir, unit_hash
from crucible.trainer.data.pipeline.workspace import read_zstd_jsonl, tmp_name
from crucible.trainer.data.tokenizer import TokenizerSourceError
from crucible.trainer.storage import StorageError, StorageUnavailable

log = logging.getLogger("crucible.data")

STAGE = "dedup"
TOKENIZER_INFO = "_work/tokenizer.json"


def run(pipe: PipelineState, part: int) -> None:
    if pipe.done(STAGE, part):
        log.info("dedup part %d: done already, skipping", part)
        return
    pipe.require(filter_stage.STAGE)
    started = time.perf_counter()
    minhash = pipe.config.steps.dedup.minhash
    n_bands = minhash.bands if minhash.enabled else 0
    parts = range(pipe.num_parts)
    doc_keys = np.concatenate([np.load(pipe.ws.fetch(f"{part_dir(filter_stage.STAGE, p)}/keys.npy")) for p in parts])
    links: dict[str, np.ndarray] = {}
    near_a: list[np.ndarray] = []
    near_b: list[np.ndarray] = []
    for band in range(part, n_bands + 1, pipe.num_parts):
        if band == n_bands:
            if pipe.config.steps.dedup.exact:
                hashes = np.concatenate([np.load(pipe.ws.fetch(f"{part_dir(filter_stage.STAGE, p)}/exact.npy")) for p in parts])
                links["exact_a"], links["exact_b"] = exact_pairs(hashes, doc_keys)
            continue
        column = np.concatenate(
            [np.load(pipe.ws.fetch(f"{part_dir(filter_stage.STAGE, p)}/bands.npy"), mmap_mode="r")[band] for p in parts]
        )
        present = np.concatenate([np.load(pipe.ws.fetch(f"{part_dir(filter_stage.STAGE, p)}/has_signature.npy")) for p in parts])
        a, b = bucket_pairs(column[present], doc_keys[present])
        near_a.append(a)
        near_b.append(b)
    empty = np.zeros(0, np.uint64)
    links.setdefault("exact_a", empty)
    links.setdefault("exact_b", empty)
    links["near_a"] = np.concatenate(near_a) if near_a else empty
    links["near_b"] = np.concatenate(near_b) if near_b else empty
    rel = f"{part_dir(STAGE, part)}/links.npz"
    tmp = tmp_name(pipe.ws.path(rel))
    with open(tmp, "wb") as f:
        np.savez(f, **links)  # type: ignore[arg-type]
    os.replace(tmp, pipe.ws.path(rel))
    pipe.ws.publish(rel)
    if part == 0:
        make_tokenizer(pipe)
    log.info("dedup part %d/%d: %d near links, %d exact links in %.1fs", part, pipe.num_parts,
             len(links["near_a"]), len(links["exact_a"]), time.perf_counter() - started)
    pipe.mark_done(STAGE, part, {"nearLinks": len(links["near_a"]), "exactLinks": len(links["exact_a"])})


def make_tokenizer(pipe: PipelineState) -> None:
    cfg = pipe.config.tokenizer
    out = pipe.ws.path("tokenizer/tokenizer.json").parent
    if cfg.source is not None:
        uri = cfg.source.uri
        if uri is None:
            raise TokenizerSourceError("tokenizer.source.fromRun was not resolved to a uri by the backend")
        try:
            local = pipe.storage.local_path(uri, tempfile.mkdtemp(prefix="crucible-tokenizer-"),
                                            field="tokenizer.source.uri")
        except StorageUnavailable:
            raise
        except StorageError as exc:
            raise TokenizerSourceError(f"tokenizer.source.uri: {exc}") from exc
        info = tokenizer_lib.adopt(Path(local), out, origin=uri)
    else:
        info = tokenizer_lib.train_bpe(tokenizer_sample(pipe), cfg, out)
    pipe.ws.write_json(TOKENIZER_INFO, info.to_json())
    pipe.ws.publish_dir("tokenizer")
    log.info("tokenizer: %s, vocab %d, eos %d", info.origin, info.vocab_size, info.eos_id)


def tokenizer_sample(pipe: PipelineState) -> Iterator[str]:
    """About ``maxTrainingDocs`` filtered documents chosen by id hash, in input order."""
    total = sum(pipe.ws.read_json(f"{part_dir(filter_stage.STAGE, p)}/stats.json")["kept"] for p in range(pipe.num_parts))
    rate = min(1.0, pipe.config.tokenizer.max_training_docs / max(total, 1))
    for p in range(pipe.num_parts):
        for rec in read_zstd_jsonl(pipe.ws.fetch(f"{part_dir(filter_stage.STAGE, p)}/docs.jsonl.zst")):
            if rate >= 1.0 or unit_hash(rec["id"], 11) < rate:
                yield rec["t"]
