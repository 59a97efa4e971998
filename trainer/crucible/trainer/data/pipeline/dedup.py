"""Stage 2, dedup: worker ``I`` links the documents that share a band key (or exact hash) of bucket ``I``.

Bucket ``I`` holds the keys with ``key % N == I`` of every band, as one sorted file per filter
part; they are merged in blocks (:func:`crucible.trainer.data.dedup.link_bucket`) and the part's
spanning forests (exact links alone, and all links) are sent, edge by edge, to the partition
owning the edge's larger document key (the filter part whose key range holds it):
``_work/cluster/round-000/part-IIIII/to-JJJJJ.bin``. The tokenize workers then run the rounds
of the partitioned connected components (:func:`cluster`) and read back their part's drop
decisions. Worker 0 also trains the tokenizer on a hash-chosen sample of the filtered documents
(or adopts ``tokenizer.source``).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from crucible.trainer.data import tokenizer as tokenizer_lib
from crucible.trainer.data.dedup import (
    DECISIONS,
    DONE,
    Owners,
    cluster_rounds,
    link_bucket,
    publish_round,
    round_dir,
    route_links,
)
from crucible.trainer.data.pipeline import filter as filter_stage
from crucible.trainer.data.pipeline.state import PipelineState, part_dir, unit_hash
from crucible.trainer.data.pipeline.workspace import read_zstd_jsonl
from crucible.trainer.data.tokenizer import TokenizerSourceError
from crucible.trainer.storage import StorageError, StorageUnavailable

log = logging.getLogger("crucible.data")

STAGE = "dedup"
TOKENIZER_INFO = "_work/tokenizer.json"
CLUSTER = "_work/cluster"
"""The rounds of the connected components (``round-RRR/part-IIIII/``) and ``_DONE`` ({"round", "removed", "exact"})."""


def owners(pipe: PipelineState) -> Owners:
    """Which partition owns a document key: the filter parts' key ranges (every worker reads the same)."""
    ranges = [pipe.ws.read_json(f"{part_dir(filter_stage.STAGE, p)}/stats.json").get("keyRange")
              for p in range(pipe.num_parts)]
    return Owners([(int(r[0]), int(r[1])) if r else None for r in ranges])


def cluster(pipe: PipelineState, part: int) -> dict[str, Any]:
    """The connected components of every dedup part's links, round by round: this worker computes its
    own partition of each round and any nobody has claimed (all of them when it runs alone), so
    memory per worker is one partition's, never the whole link set. Returns ``_work/cluster/_DONE``."""
    if pipe.ws.exists(f"{CLUSTER}/{DONE}"):
        result: dict[str, Any] = pipe.ws.read_json(f"{CLUSTER}/{DONE}")
        return result
    started = time.perf_counter()
    result = cluster_rounds(pipe.ws, CLUSTER, owners(pipe), me=part)
    log.info("dedup clusters: %d documents removed (%d exact) after %d rounds, in %.1fs", result["removed"],
             result["exact"], result["round"], time.perf_counter() - started)
    return result


def decisions_rel(pipe: PipelineState, part: int) -> str:
    """Filter part ``part``'s drop decisions (rows (key, reason), sorted), once :func:`cluster` is done."""
    final = int(pipe.ws.read_json(f"{CLUSTER}/{DONE}")["round"])
    return f"{round_dir(CLUSTER, final, part)}/{DECISIONS}"


def cleanup(pipe: PipelineState) -> None:
    """Delete the rounds (``_DONE`` stays)."""
    if not pipe.ws.exists(f"{CLUSTER}/{DONE}"):
        return
    final = int(pipe.ws.read_json(f"{CLUSTER}/{DONE}")["round"])
    for r in range(final + 1):
        rel = f"{CLUSTER}/round-{r:03d}"
        if pipe.ws.remote:
            pipe.storage.delete_prefix(pipe.ws.uri_of(rel))
        shutil.rmtree(pipe.ws.local / rel, ignore_errors=True)


def run(pipe: PipelineState, part: int) -> None:
    if pipe.done(STAGE, part):
        log.info("dedup part %d: done already, skipping", part)
        return
    pipe.require(filter_stage.STAGE)
    started = time.perf_counter()
    minhash = pipe.config.steps.dedup.minhash
    n_bands = minhash.bands if minhash.enabled else 0
    name = f"bucket-{part:05d}.bin"
    files = [pipe.ws.fetch(f"{part_dir(filter_stage.STAGE, p)}/{filter_stage.BUCKETS}/{name}")
             for p in range(pipe.num_parts)]
    links = link_bucket(files, n_bands)
    parts = owners(pipe)
    rel = round_dir(CLUSTER, 0, part)
    edges = route_links(links, parts, pipe.ws.path(f"{rel}/{DONE}").parent)
    publish_round(pipe.ws, CLUSTER, 0, part, parts.count, {"round": 0, "rowsOut": edges})
    if part == 0:
        make_tokenizer(pipe)
    log.info("dedup part %d/%d: %d near links, %d exact links -> %d in the forest, in %.1fs", part, pipe.num_parts,
             links.near_links, links.exact_links, len(links.all_member), time.perf_counter() - started)
    pipe.mark_done(STAGE, part, {"nearLinks": links.near_links, "exactLinks": links.exact_links,
                                 "forestLinks": len(links.all_member)})


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
