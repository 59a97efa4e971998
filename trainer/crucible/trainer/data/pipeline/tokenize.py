"""Stage 3, tokenize: drop duplicates, split, weight the mixture and write token shards.

Union-find over every dedup part's links (each worker, deterministic) -> drop duplicates ->
train/validation split by id hash -> mixture weights (repeats or drops by a hash of the id) ->
tokenize -> shards ``<out>/{train,validation}/part-IIIII-SSSSS.bin``, the kept ids of the part
and its per-source counts (``stats.json``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from typing import Any

import numpy as np
import xxhash

from crucible.trainer.data import tokenizer as tokenizer_lib
from crucible.trainer.data.minhash import removed_by_clusters
from crucible.trainer.data.pipeline import dedup as dedup_stage
from crucible.trainer.data.pipeline import filter as filter_stage
from crucible.trainer.data.pipeline.state import PipelineState, part_dir, unit_hash
from crucible.trainer.data.pipeline.workspace import AtomicZstdWriter, read_zstd_jsonl, tmp_name
from crucible.trainer.data.shards import ShardWriter

log = logging.getLogger("crucible.data")

STAGE = "tokenize"
TOKENIZE_CHUNK = 2048
KEPT_IDS = "kept_ids.jsonl"


def removed(pipe: PipelineState) -> tuple[set[int], set[int]]:
    """(exact-duplicate keys, near-duplicate keys) dropped by the clustering."""
    links = [np.load(pipe.ws.fetch(f"{part_dir(dedup_stage.STAGE, p)}/links.npz")) for p in range(pipe.num_parts)]
    ea = np.concatenate([x["exact_a"] for x in links])
    eb = np.concatenate([x["exact_b"] for x in links])
    na = np.concatenate([x["near_a"] for x in links])
    nb = np.concatenate([x["near_b"] for x in links])
    exact = set(removed_by_clusters(ea, eb).tolist())
    every = set(removed_by_clusters(np.concatenate([ea, na]), np.concatenate([eb, nb])).tolist())
    return exact, every - exact


def run(pipe: PipelineState, part: int) -> None:
    if pipe.done(STAGE, part):
        log.info("tokenize part %d: done already, skipping", part)
        return
    pipe.require(dedup_stage.STAGE)
    started = time.perf_counter()
    exact_removed, near_removed = removed(pipe)
    info = pipe.ws.read_json(dedup_stage.TOKENIZER_INFO)
    tok = tokenizer_lib.load(pipe.ws.fetch_dir("tokenizer"))
    # "<|endoftext|>" written in a document is text, not a document end.
    tok.encode_special_tokens = True
    vocab, eos = int(info["vocabSize"]), int(info["eosId"])
    prefix = f"part-{part:05d}"
    tps = pipe.config.shards.tokens_per_shard
    writers = {
        split: ShardWriter(pipe.ws.path(f"{split}/.keep").parent, vocab, eos, tps, prefix=prefix)
        for split in ("train", "validation")
    }
    weights = {s.name: s.weight for s in pipe.config.sources}
    mixture = pipe.config.steps.mixture
    shards_cfg = pipe.config.shards
    counts: Counter[str] = Counter()
    per_source: dict[str, Counter[str]] = {}
    ids_path = pipe.ws.path(f"{part_dir(STAGE, part)}/{KEPT_IDS}")
    ids_tmp = tmp_name(ids_path)
    pending: list[tuple[str, str, str, str, int]] = []  # (split, source, id, text, copies)

    def flush() -> None:
        if not pending:
            return
        encodings = tok.encode_batch_fast([p[3] for p in pending], add_special_tokens=False)
        entries: list[tuple[int, str, str, np.ndarray]] = []
        for (split, src, doc_id, _, copies), enc in zip(pending, encodings, strict=True):
            ids = np.asarray(enc.ids, dtype=np.int64)
            for copy in range(copies):
                entries.append((xxhash.xxh64_intdigest(f"{doc_id}\x00{copy}".encode("utf-8", "surrogatepass"), shards_cfg.seed), split, src, ids))
        # Repeats of a document are spread through the chunk, not written back to back; the
        # order is a hash of (id, copy), the same on every machine and library version.
        entries.sort(key=lambda e: e[0])
        for _, split, src, ids in entries:
            writers[split].add_document(ids)
            per_source[src][f"tokens_{split}"] += len(ids) + 1
            per_source[src][f"written_{split}"] += 1
        pending.clear()

    dropped_rel = f"dropped/dedup-part-{part:05d}.jsonl.zst"
    dropped = AtomicZstdWriter(pipe.ws.path(dropped_rel)) if pipe.config.dropped.keep else None
    rate = pipe.config.dropped.sample_rate
    with open(ids_tmp, "w", encoding="utf-8") as ids_file:
        for rec in read_zstd_jsonl(pipe.ws.fetch(f"{part_dir(filter_stage.STAGE, part)}/docs.jsonl.zst")):
            src = rec["s"]
            c = per_source.setdefault(src, Counter())
            c["in"] += 1
            reason = ("exact_duplicate" if rec["k"] in exact_removed
                      else "near_duplicate" if rec["k"] in near_removed else None)
            if reason is not None:
                c[reason] += 1
                if dropped is not None and (rate >= 1 or unit_hash(rec["id"], 7) < rate):
                    dropped.write({"id": rec["id"], "source": src, "step": "dedup", "reason": reason, "text": rec["t"]})
                continue
            c["out"] += 1
            ids_file.write(json.dumps(rec["id"], ensure_ascii=False) + "\n")
            if shards_cfg.validation_fraction and unit_hash(rec["id"], shards_cfg.seed) < shards_cfg.validation_fraction:
                pending.append(("validation", src, rec["id"], rec["t"], 1))
            else:
                copies = mixture_copies(rec["id"], weights[src], mixture.seed) if mixture.enabled else 1
                c["mixture_in"] += 1
                if copies == 0:
                    c["downweighted"] += 1
                    continue
                c["repeats"] += copies - 1
                pending.append(("train", src, rec["id"], rec["t"], copies))
            if len(pending) >= TOKENIZE_CHUNK:
                flush()
        flush()
    os.replace(ids_tmp, ids_path)
    pipe.ws.publish(f"{part_dir(STAGE, part)}/{KEPT_IDS}")
    if dropped is not None:
        dropped.close()
        pipe.ws.publish(dropped_rel)
    shards: dict[str, list[dict[str, Any]]] = {}
    for split, writer in writers.items():
        writer.close(write_index=False)
        shards[split] = [s.to_json() for s in writer.shards]
        for s in writer.shards:
            pipe.ws.publish(f"{split}/{s.name}.bin")
            pipe.ws.publish(f"{split}/{s.name}.idx")
    counts.update({k: sum(c[k] for c in per_source.values()) for k in ("in", "out")})
    pipe.ws.write_json(
        f"{part_dir(STAGE, part)}/stats.json",
        {"sources": {k: dict(sorted(v.items())) for k, v in sorted(per_source.items())}, "shards": shards},
    )
    log.info("tokenize part %d/%d: %d -> %d documents in %.1fs", part, pipe.num_parts, counts["in"],
             counts["out"], time.perf_counter() - started)
    pipe.mark_done(STAGE, part, dict(counts))


def mixture_copies(doc_id: str, weight: float, seed: int) -> int:
    whole = int(weight)
    return whole + (1 if unit_hash(doc_id, seed + 1) < weight - whole else 0)
