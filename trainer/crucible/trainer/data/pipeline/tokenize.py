"""Stage 3, tokenize: drop duplicates, split, decontaminate, weight the mixture and write token shards.

The connected components of every dedup part's links, partitioned by document key
(:func:`crucible.trainer.data.pipeline.dedup.cluster`, the rounds shared by the tokenize workers)
-> this part's drop decisions read back -> train/validation split by id hash -> the train split checked against
the held-out documents' n-grams (when the validation split is a decontamination set) ->
mixture weights (the source's weight times a classifier's, repeats or drops by a hash of the
id) -> tokenize -> shards ``<out>/{train,validation}/part-IIIII-SSSSS.bin``, the ids written
to each split with their copies (``kept_ids.jsonl``) and per-source counts (``stats.json``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import xxhash

from crucible.trainer.data import tokenizer as tokenizer_lib
from crucible.trainer.data.decontaminate import Decontaminator, EvalSet, held_out_table, load_arrays
from crucible.trainer.data.dedup import REASON_EXACT, DropDecisions
from crucible.trainer.data.pipeline import dedup as dedup_stage
from crucible.trainer.data.pipeline import filter as filter_stage
from crucible.trainer.data.pipeline.state import PipelineState, part_dir, unit_hash
from crucible.trainer.data.pipeline.workspace import AtomicZstdWriter, read_zstd_jsonl, tmp_name
from crucible.trainer.data.shards import ShardWriter
from crucible.trainer.seen import read_seen

log = logging.getLogger("crucible.data")

STAGE = "tokenize"
TOKENIZE_CHUNK = 2048
KEPT_IDS = "kept_ids.jsonl"
SEEN_KEYS = "seen-keys.npy"
"""Per part: the content key of every document it kept (train with copies, or validation)."""
"""In the output: the sorted content keys of every document this revision and the earlier ones kept."""
SEEN_REASON = "seen_in_earlier_revision"


def content_key(text: str) -> int:
    """A document's identity across revisions: a 64-bit hash of its normalized text (not its position)."""
    return int(xxhash.xxh3_64_intdigest(text.encode("utf-8", "surrogatepass")))


def load_seen(pipe: PipelineState) -> np.ndarray | None:
    """The content keys the earlier revisions kept (``steps.dedup.earlierRevisions``), sorted; None when none named."""
    return read_seen(pipe.storage, pipe.config.steps.dedup.earlier_revisions, "steps.dedup.earlierRevisions",
                     "a finished DataPipeline (revisions before this one)")


def held_out_matcher(pipe: PipelineState) -> tuple[Decontaminator | None, dict[str, Any] | None]:
    """The validation split as a decontamination set over the train split (None when not asked)."""
    dset = filter_stage.validation_set(pipe.config)
    if dset is None:
        return None, None
    decon = pipe.config.steps.decontamination
    # The held-out documents of every part, except those dedup removed (their text is in train).
    table = held_out_table(
        (load_arrays(pipe.ws.fetch(f"{part_dir(filter_stage.STAGE, p)}/{filter_stage.HELD_OUT_NGRAMS}")),
         DropDecisions(pipe.ws.fetch(dedup_stage.decisions_rel(pipe, p))))
        for p in range(pipe.num_parts)
    )
    held = EvalSet(dset.name, "validation", "shards.validationFraction", table)
    receipt = held.receipt()
    del receipt["records"], receipt["recordsTooShort"]
    return Decontaminator(decon, [held]), receipt


def run(pipe: PipelineState, part: int) -> None:
    if pipe.done(STAGE, part):
        log.info("tokenize part %d: done already, skipping", part)
        return
    pipe.require(dedup_stage.STAGE)
    started = time.perf_counter()
    dedup_stage.cluster(pipe, part)
    decisions = DropDecisions(pipe.ws.fetch(dedup_stage.decisions_rel(pipe, part)))
    matcher, held_out = held_out_matcher(pipe)
    seen = load_seen(pipe)
    kept_keys: list[int] = []
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

    def drop_sample(rec: dict[str, Any], step: str, reason: str, text: str) -> None:
        if dropped is not None and (rate >= 1 or unit_hash(rec["id"], 7) < rate):
            dropped.write({"id": rec["id"], "source": rec["s"], "step": step, "reason": reason, "text": text})

    def batches() -> Iterator[list[dict[str, Any]]]:
        chunk: list[dict[str, Any]] = []
        for rec in read_zstd_jsonl(pipe.ws.fetch(f"{part_dir(filter_stage.STAGE, part)}/docs.jsonl.zst")):
            chunk.append(rec)
            if len(chunk) >= TOKENIZE_CHUNK:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    with open(ids_tmp, "w", encoding="utf-8") as ids_file:
        for chunk in batches():
            codes = decisions.reasons(np.array([rec["k"] for rec in chunk], dtype=np.uint64))
            keys = np.array([content_key(rec["t"]) for rec in chunk], dtype=np.uint64)
            earlier = np.isin(keys, seen) if seen is not None else np.zeros(len(chunk), dtype=bool)
            for rec, code, key, was_seen in zip(chunk, codes.tolist(), keys.tolist(), earlier.tolist(), strict=True):
                src = rec["s"]
                c = per_source.setdefault(src, Counter())
                c["in"] += 1
                if code:
                    reason = "exact_duplicate" if code == REASON_EXACT else "near_duplicate"
                    c[reason] += 1
                    drop_sample(rec, "dedup", reason, rec["t"])
                    continue
                if was_seen:  # an earlier revision kept this text: it is not trained on again
                    c[SEEN_REASON] += 1
                    drop_sample(rec, "dedup", SEEN_REASON, rec["t"])
                    continue
                c["out"] += 1
                if shards_cfg.validation_fraction and unit_hash(rec["id"], shards_cfg.seed) < shards_cfg.validation_fraction:
                    kept_keys.append(key)
                    pending.append(("validation", src, rec["id"], rec["t"], 1))
                    ids_file.write(json.dumps({"id": rec["id"], "split": "validation", "copies": 1}, ensure_ascii=False) + "\n")
                    continue
                text = rec["t"]
                if matcher is not None:  # the train split against the held-out documents
                    c["decontamination_in"] += 1
                    hit, text = matcher.check(text)
                    if hit is not None and (matcher.config.action == "drop" or not text.strip()):
                        reason = f"contaminated:{hit}" if matcher.config.action == "drop" else "empty_after_decontamination"
                        c[reason] += 1
                        drop_sample(rec, "decontamination_validation", reason, rec["t"])
                        continue
                    if hit is not None:
                        c["redacted"] += 1
                weight = weights[src] * float(rec.get("w", 1.0))
                copies = mixture_copies(rec["id"], weight, mixture.seed) if mixture.enabled else 1
                c["mixture_in"] += 1
                if copies == 0:
                    c["downweighted"] += 1
                    continue
                c["repeats"] += copies - 1
                kept_keys.append(key)
                pending.append(("train", src, rec["id"], text, copies))
                ids_file.write(json.dumps({"id": rec["id"], "split": "train", "copies": copies}, ensure_ascii=False) + "\n")
            if len(pending) >= TOKENIZE_CHUNK:
                flush()
        flush()
    os.replace(ids_tmp, ids_path)
    pipe.ws.publish(f"{part_dir(STAGE, part)}/{KEPT_IDS}")
    keys_path = pipe.ws.path(f"{part_dir(STAGE, part)}/{SEEN_KEYS}")
    with open(tmp_name(keys_path), "wb") as keys_file:
        np.save(keys_file, np.array(kept_keys, dtype=np.uint64))
    os.replace(tmp_name(keys_path), keys_path)
    pipe.ws.publish(f"{part_dir(STAGE, part)}/{SEEN_KEYS}")
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
    stats: dict[str, Any] = {"sources": {k: dict(sorted(v.items())) for k, v in sorted(per_source.items())},
                             "shards": shards}
    if held_out is not None:
        stats["heldOutSet"] = held_out
    pipe.ws.write_json(f"{part_dir(STAGE, part)}/stats.json", stats)
    log.info("tokenize part %d/%d: %d -> %d documents (%d removed as duplicates) in %.1fs", part, pipe.num_parts,
             counts["in"], counts["out"], len(decisions), time.perf_counter() - started)
    pipe.mark_done(STAGE, part, dict(counts))


def mixture_copies(doc_id: str, weight: float, seed: int) -> int:
    whole = int(weight)
    return whole + (1 if unit_hash(doc_id, seed + 1) < weight - whole else 0)
