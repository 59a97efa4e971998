"""Stage 1, filter: worker ``I`` reads its byte range of the input through every filter step.

read -> normalize -> language -> gopher repetition -> gopher quality -> c4 -> fineweb -> pii ->
toxicity -> learned classifiers -> decontamination; writes the kept documents
(``docs.jsonl.zst``), their MinHash band keys and exact hashes as sorted runs per dedup bucket
(``buckets/bucket-QQQQQ.bin``, :mod:`crucible.trainer.data.dedup`), the n-grams of its
held-out documents when the validation split is a decontamination set, per-step counts
(``stats.json``) and, when ``dropped.keep``, a sample of the dropped documents with their reason.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np
import xxhash

from crucible.trainer.config.data import DataPipelineConfig, DecontaminationSet
from crucible.trainer.data.c4 import C4QualityFilter
from crucible.trainer.data.classifier import ClassifierFilter, TrainedClassifier
from crucible.trainer.data.decontaminate import Decontaminator, keyed_grams, load_set, save_arrays
from crucible.trainer.data.dedup import BucketRunWriter
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
from crucible.trainer.data.readers import DocumentReader, InputFile
from crucible.trainer.data.step import Step
from crucible.trainer.data.text import word_splitter
from crucible.trainer.data.toxicity import ToxicityFilter
from crucible.trainer.storage import Storage

log = logging.getLogger("crucible.data")

STAGE = "filter"
SIGNATURE_BATCH = 2048
BUCKETS = "buckets"
HELD_OUT_NGRAMS = "validation-ngrams.npz"
OUTPUTS = ("docs.jsonl.zst", BUCKETS, HELD_OUT_NGRAMS)
"""What a filter part leaves for the later stages (deleted once the manifest is written)."""


def build_steps(config: DataPipelineConfig, storage: Storage | None = None,
                inputs: list[InputFile] | None = None) -> list[Step]:
    """The filter stage's steps in order, each built from its spec section.

    The learned classifiers are trained here (from their reference data, or a sample of
    ``inputs``) and the decontamination sets loaded, so every worker builds the same steps.
    """
    s = config.steps
    storage = storage or Storage.from_config(config.storage)
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
    for i, classifier in enumerate(s.classifiers):
        steps.append(ClassifierFilter(TrainedClassifier(classifier, i, inputs or [], storage)))
    decon = s.decontamination
    sets = [loaded for i, dset in enumerate(decon.sets) if (loaded := load_set(dset, i, decon.ngram, storage))]
    if sets:
        steps.append(Decontaminator(decon, sets))
    return steps


def validation_set(config: DataPipelineConfig) -> DecontaminationSet | None:
    """The decontamination set that names the run's own validation split, if any."""
    return next((d for d in config.steps.decontamination.sets if d.validation), None)


def run(pipe: PipelineState, part: int) -> None:
    if pipe.done(STAGE, part):
        log.info("filter part %d: done already, skipping", part)
        return
    started = time.perf_counter()
    rel = part_dir(STAGE, part)
    pieces = pipe.pieces_of(part)
    reader = DocumentReader(pipe.storage, pipe.config.max_doc_chars)
    steps = build_steps(pipe.config, pipe.storage, pipe.inputs)
    dropped_writer = dropped_sink(pipe, part, steps)
    minhash = pipe.config.steps.dedup.minhash
    hasher = MinHasher(minhash)
    n_bands = minhash.bands if minhash.enabled else 0
    exact = pipe.config.steps.dedup.exact
    buckets = BucketRunWriter(pipe.ws.path(f"{rel}/{BUCKETS}/.keep").parent, pipe.num_parts, n_bands, exact)
    docs_out = AtomicZstdWriter(pipe.ws.path(f"{rel}/docs.jsonl.zst"))
    shards_cfg = pipe.config.shards
    held_out = validation_set(pipe.config)
    held_out_docs: list[tuple[int, str]] = []
    batch: list[Document] = []
    key_range: list[int] = []
    last_key = 0

    def flush() -> None:
        if not batch:
            return
        doc_keys = np.array([d.key for d in batch], dtype=np.uint64)
        if minhash.enabled:
            band_keys, present = hasher.band_keys([d.text for d in batch])
        else:
            band_keys, present = np.zeros((len(batch), 0), np.uint64), np.zeros(len(batch), bool)
        hashes = None
        if exact:
            digests = [xxhash.xxh3_128_digest(d.text.encode("utf-8", "surrogatepass")) for d in batch]
            hashes = np.frombuffer(b"".join(digests), dtype=np.uint64).reshape(-1, 2)
        buckets.add(doc_keys, band_keys, present, hashes)
        batch.clear()

    stream: Iterable[Document] = (doc for piece in pieces for doc in reader.read(piece))
    for step in steps:
        stream = step.run(stream)
    kept = 0
    for doc in stream:
        record: dict[str, Any] = {"k": doc.key, "id": doc.id, "s": doc.source, "t": doc.text}
        if "weight" in doc.meta:
            record["w"] = doc.meta["weight"]
        docs_out.write(record)
        if not key_range:
            key_range.append(doc.key)
        batch.append(doc)
        kept += 1
        if held_out is not None and unit_hash(doc.id, shards_cfg.seed) < shards_cfg.validation_fraction:
            held_out_docs.append((doc.key, doc.text))
        if len(batch) >= SIGNATURE_BATCH:
            flush()
        last_key = doc.key
    flush()
    docs_out.close()
    bucket_files = buckets.close()
    pipe.ws.publish(f"{rel}/docs.jsonl.zst")
    for name in bucket_files:
        pipe.ws.publish(f"{rel}/{BUCKETS}/{name}")
    if held_out is not None:
        grams = keyed_grams(held_out_docs, pipe.config.steps.decontamination.ngram)
        save_arrays(pipe.ws.path(f"{rel}/{HELD_OUT_NGRAMS}"), grams)
        pipe.ws.publish(f"{rel}/{HELD_OUT_NGRAMS}")
    if dropped_writer is not None:
        dropped_writer.close()
        pipe.ws.publish(f"dropped/part-{part:05d}.jsonl.zst")
    whole = [p.file for p in pieces if p.start == 0]  # a file cut in pieces counts once, where it starts
    stats = {
        "files": len(whole),
        "filesBySource": dict(Counter(f.source.name for f in whole)),
        "recordsBySource": dict(sorted(reader.records.items())),
        "read": reader.errors.to_json(),
        "steps": [{"step": s.name, **s.stats_json()} for s in steps],
        "kept": kept,
        # the part's documents have keys in [first, last]: its drop decisions are read back by range
        "keyRange": [key_range[0], last_key] if key_range else None,
        "classifiers": {s.config.name: {"training": s.classifier.training, **s.summary()}
                        for s in steps if isinstance(s, ClassifierFilter)},
        "decontamination": next(({"sets": {e.name: e.receipt() for e in s.sets}, "documents": s.summary()}
                                 for s in steps if isinstance(s, Decontaminator)), None),
    }
    pipe.ws.write_json(f"{rel}/stats.json", stats)
    elapsed = time.perf_counter() - started
    records = sum(reader.records.values())
    log.info(
        "filter part %d/%d: %d pieces, %d records -> %d kept in %.1fs (%.0f docs/s); step seconds: %s",
        part, pipe.num_parts, len(pieces), records, kept, elapsed, records / max(elapsed, 1e-9),
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
