"""Stage 1, filter: worker ``I`` reads input files ``[I*F/N, (I+1)*F/N)`` through every filter step.

read -> normalize -> language -> gopher repetition -> gopher quality -> c4 -> fineweb -> pii ->
toxicity; writes the kept documents (``docs.jsonl.zst``), their MinHash band keys and exact
hashes for the dedup stage, per-step counts (``stats.json``) and, when ``dropped.keep``, a
sample of the dropped documents with their reason.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable

import numpy as np
import xxhash

from crucible.trainer.config.data import DataPipelineConfig
from crucible.trainer.data.c4 import C4QualityFilter
from crucible.trainer.data.document import Document
from crucible.trainer.data.fineweb import FineWebQualityFilter
from crucible.trainer.data.gopher_quality import GopherQualityFilter
from crucible.trainer.data.gopher_repetition import GopherRepetitionFilter
from crucible.trainer.data.language import LanguageFilter
from crucible.trainer.data.minhash import MinHasher
from crucible.trainer.data.normalize import Normalizer
from crucible.trainer.data.pii import PiiRedactor
from crucible.trainer.data.pipeline.state import PipelineState, part_dir, unit_hash
from crucible.trainer.data.pipeline.workspace import AtomicZstdWriter
from crucible.trainer.data.readers import DocumentReader
from crucible.trainer.data.step import Step
from crucible.trainer.data.text import word_splitter
from crucible.trainer.data.toxicity import ToxicityFilter

log = logging.getLogger("crucible.data")

STAGE = "filter"
SIGNATURE_BATCH = 2048
OUTPUTS = ("docs.jsonl.zst", "keys.npy", "bands.npy", "has_signature.npy", "exact.npy")
"""What a filter part leaves for the later stages (deleted once the manifest is written)."""


def build_steps(config: DataPipelineConfig) -> list[Step]:
    """The filter stage's steps in order, each built from its spec section."""
    s = config.steps
    steps: list[Step] = []
    if s.normalize.enabled:
        steps.append(Normalizer(s.normalize))
    if s.language.enabled:
        steps.append(LanguageFilter(s.language))
    q = s.quality
    if q.enabled:
        splitter = word_splitter()
        if q.gopher_repetition.enabled:
            steps.append(GopherRepetitionFilter(q.gopher_repetition, splitter))
        if q.gopher_quality.enabled:
            steps.append(GopherQualityFilter(q.gopher_quality, splitter))
        if q.c4.enabled:
            steps.append(C4QualityFilter(q.c4, splitter))
        if q.fineweb.enabled:
            steps.append(FineWebQualityFilter(q.fineweb, splitter))
    if s.pii.enabled:
        steps.append(PiiRedactor(s.pii))
    if s.toxicity.enabled:
        steps.append(ToxicityFilter(s.toxicity))
    return steps


def run(pipe: PipelineState, part: int) -> None:
    if pipe.done(STAGE, part):
        log.info("filter part %d: done already, skipping", part)
        return
    started = time.perf_counter()
    rel = part_dir(STAGE, part)
    files = pipe.files_of(part)
    reader = DocumentReader(pipe.storage, pipe.config.max_doc_chars)
    steps = build_steps(pipe.config)
    dropped_writer = dropped_sink(pipe, part, steps)
    minhash = pipe.config.steps.dedup.minhash
    hasher = MinHasher(minhash)
    docs_out = AtomicZstdWriter(pipe.ws.path(f"{rel}/docs.jsonl.zst"))
    keys: list[np.ndarray] = []
    bands: list[np.ndarray] = []
    has_sig: list[np.ndarray] = []
    exact: list[np.ndarray] = []
    batch: list[Document] = []

    def flush() -> None:
        if not batch:
            return
        keys.append(np.array([d.key for d in batch], dtype=np.uint64))
        if minhash.enabled:
            band_keys, present = hasher.band_keys([d.text for d in batch])
        else:
            band_keys, present = np.zeros((len(batch), 0), np.uint64), np.zeros(len(batch), bool)
        bands.append(band_keys)
        has_sig.append(present)
        digests = [xxhash.xxh3_128_digest(d.text.encode("utf-8", "surrogatepass")) for d in batch]
        exact.append(np.frombuffer(b"".join(digests), dtype=np.uint64).reshape(-1, 2))
        batch.clear()

    stream: Iterable[Document] = (doc for item in files for doc in reader.read(item))
    for step in steps:
        stream = step.run(stream)
    kept = 0
    for doc in stream:
        docs_out.write({"k": doc.key, "id": doc.id, "s": doc.source, "t": doc.text})
        batch.append(doc)
        kept += 1
        if len(batch) >= SIGNATURE_BATCH:
            flush()
    flush()
    docs_out.close()
    n_bands = minhash.bands if minhash.enabled else 0
    all_keys = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
    all_bands = np.concatenate(bands) if bands else np.zeros((0, n_bands), np.uint64)
    np.save(pipe.ws.path(f"{rel}/keys.npy"), all_keys)
    np.save(pipe.ws.path(f"{rel}/bands.npy"), np.ascontiguousarray(all_bands.T))  # (B, n)
    np.save(pipe.ws.path(f"{rel}/has_signature.npy"), np.concatenate(has_sig) if has_sig else np.zeros(0, bool))
    np.save(pipe.ws.path(f"{rel}/exact.npy"), np.concatenate(exact) if exact else np.zeros((0, 2), np.uint64))
    for name in OUTPUTS:
        pipe.ws.publish(f"{rel}/{name}")
    if dropped_writer is not None:
        dropped_writer.close()
        pipe.ws.publish(f"dropped/part-{part:05d}.jsonl.zst")
    stats = {
        "files": len(files),
        "filesBySource": dict(Counter(f.source.name for f in files)),
        "recordsBySource": dict(sorted(reader.records.items())),
        "read": reader.errors.to_json(),
        "steps": [{"step": s.name, **s.stats_json()} for s in steps],
        "kept": kept,
    }
    pipe.ws.write_json(f"{rel}/stats.json", stats)
    elapsed = time.perf_counter() - started
    records = sum(reader.records.values())
    log.info(
        "filter part %d/%d: %d files, %d records -> %d kept in %.1fs (%.0f docs/s); step seconds: %s",
        part, pipe.num_parts, len(files), records, kept, elapsed, records / max(elapsed, 1e-9),
        {s.name: round(s.stats.seconds, 2) for s in steps},
    )
    pipe.mark_done(STAGE, part, {"kept": kept, "records": records})

def dropped_sink(pipe: PipelineState, part: int, steps: list[Step]) -> AtomicZstdWriter | None:
    cfg = pipe.config.dropped
    if not cfg.keep:
        return None
    writer = AtomicZstdWriter(pipe.ws.path(f"dropped/part-{part:05d}.jsonl.zst"))
    rate = cfg.sample_rate

    def sink(doc: Document, step: str, reason: str) -> None:
        if rate >= 1 or unit_hash(doc.id, 7) < rate:
            writer.write({"id": doc.id, "source": doc.source, "step": step, "reason": reason, "text": doc.text})

    for step in steps:
        step.drop_sink = sink
    return writer
