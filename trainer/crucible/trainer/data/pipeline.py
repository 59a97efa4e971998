"""The DataPipeline stage: raw text in, clean deduplicated token shards and a receipt out.

Entry points::

    python -m crucible.trainer data --spec FILE [--shard I --num-shards N] [--stage filter|dedup|tokenize|all]
    run_pipeline(config, output_uri) -> Manifest          # everything in this process

Stages (each worker ``I`` of ``N`` runs one part of each; ``JOB_COMPLETION_INDEX`` stands in
for ``--shard``)::

    filter    input files [I*F/N, (I+1)*F/N) -> read -> normalize -> language -> gopher
              repetition -> gopher quality -> c4 -> fineweb -> pii -> toxicity; writes the kept
              documents, their MinHash band keys and exact hashes
    dedup     LSH bands b with b % N == I (the exact hash counts as band ``bands``): bucket
              links; worker 0 also trains (or adopts) the tokenizer on a hash-chosen sample
    tokenize  union-find over every link (each worker, deterministic) -> drop duplicates ->
              train/validation split by id hash -> mixture weights -> tokenize -> shards
              ``<out>/{train,validation}/part-IIIII-SSSSS.bin``; the worker that finds every
              part done merges the indexes, writes ``manifest.json`` and ``_SUCCESS`` last.

Every part writes its files atomically and a ``_DONE`` marker last under
``<out>/_work/<stage>/part-IIIII/``; a rerun skips parts with a marker, and since every
choice is a function of the input and the seeds, a run killed at any point and rerun
produces byte-identical shards, tokenizer and manifest. With no ``--shard`` every stage runs
for every part in this process; with ``--shard`` and ``--stage all`` the worker waits for
the other workers' markers between stages (one Indexed Job can run the whole pipeline).

``manifest.json`` (the receipt; keys are stable, every count an int)::

    {"format": "crucible-data-manifest", "version": 1,
     "documentsIn": 1000,            # records read, bad ones included
     "documentsOut": 640,            # kept after filters and dedup, before the mixture
     "documentsWritten": {"train": 700, "validation": 6},   # after mixture repeats
     "tokens": {"train": 812345, "validation": 7012},
     "funnel": [{"step": "read", "documentsIn": 1000, "documentsOut": 990,
                 "dropped": {"malformed_json": 4, "too_long": 6}},
                {"step": "normalize", ..., "changes": {"documents": 120}},
                {"step": "language", ..., "dropped": {"language_fr": 31}},
                ... gopher_repetition, gopher_quality, c4, fineweb, pii, toxicity ...,
                {"step": "dedup", "documentsIn": 700, "documentsOut": 640,
                 "dropped": {"exact_duplicate": 40, "near_duplicate": 20}},
                {"step": "mixture", "documentsIn": 634, "documentsOut": 700,
                 "dropped": {"downweighted": 10}, "changes": {"repeats": 76}}],
     "sources": {"web": {"domain": "web", "weight": 1.0, "files": 3, "documentsIn": 800,
                         "documentsOut": 500, "dropped": {"quality/c4:too_few_sentences": 12, ...},
                         "documentsWritten": {"train": .., "validation": ..},
                         "tokens": {"train": .., "validation": ..}}},
     "domains": {"web": {...the same fields summed over its sources...}},
     "pii": {"email": 12, "phone": 3, ...},          # placeholders inserted
     "splits": {"train": {"tokens", "documents", "dtype", "shards": [{"name", "tokens",
                "documents", "sha256"}]}, "validation": {...}},
     "keptDocumentIdsSha256": "...",  # sha256 of the kept ids (JSON strings, one per line, input order)
     "tokenizer": {"vocabSize", "eosId", "eosToken", "sha256", "origin"},
     "droppedSamples": ["dropped/part-00000.jsonl.zst", "dropped/dedup-part-00000.jsonl.zst"],
                                     # when dropped.keep: {"id", "source", "step", "reason", "text"} per line
     "config": {... the full DataPipeline spec, camelCase ...}}

Dropped-reason keys in ``sources[*].dropped`` are ``step:reason``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from crucible.trainer.config.common import (
    EXIT_APPLICATION_ERROR,
    EXIT_BAD_INPUT,
    EXIT_OK,
    EXIT_RETRIABLE,
)
from crucible.trainer.config.data import DataPipelineConfig
from crucible.trainer.config.receipt import ForeignResultError, check_existing, identity
from crucible.trainer.data import tokenizer as tokenizer_lib
from crucible.trainer.data.c4 import C4QualityFilter
from crucible.trainer.data.document import Document
from crucible.trainer.data.fineweb import FineWebQualityFilter
from crucible.trainer.data.gopher_quality import GopherQualityFilter
from crucible.trainer.data.gopher_repetition import GopherRepetitionFilter
from crucible.trainer.data.language import LanguageFilter
from crucible.trainer.data.minhash import MinHasher, bucket_pairs, exact_pairs, removed_by_clusters
from crucible.trainer.data.normalize import Normalizer
from crucible.trainer.data.pii import PiiRedactor
from crucible.trainer.data.readers import DocumentReader, InputFile, SourceError, list_inputs
from crucible.trainer.data.shards import ShardInfo, ShardWriter, write_index
from crucible.trainer.data.step import Step
from crucible.trainer.data.text import word_splitter
from crucible.trainer.data.tokenizer import TokenizerSourceError
from crucible.trainer.data.toxicity import ToxicityFilter, WordListError
from crucible.trainer.faults import write_success_message
from crucible.trainer.storage import Storage, StorageError, StorageUnavailable, is_s3, join

log = logging.getLogger("crucible.data")

STAGES = ("filter", "dedup", "tokenize")
DONE = "_DONE"
SUCCESS = "_SUCCESS"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "crucible-data-manifest"
SIGNATURE_BATCH = 2048
TOKENIZE_CHUNK = 2048
WAIT_POLL_SECONDS = 5.0


class PipelineError(RuntimeError):
    """An ordering or state problem (a stage started before the one it needs finished)."""


class NothingLeftError(ValueError):
    """Every document was dropped: the receipt is written, ``_SUCCESS`` is not (exit 2)."""


def unit_hash(text: str, seed: int) -> float:
    """A reproducible number in [0, 1) for ``text`` under ``seed``."""
    return xxhash.xxh64_intdigest(text.encode("utf-8", "surrogatepass"), seed) / 2.0**64


def _part(stage: str, part: int) -> str:
    return f"_work/{stage}/part-{part:05d}"


# -- workspace: local paths, or S3 through a local staging directory ---------------------------


class Workspace:
    """Files under the output URI. Local output is used in place; for ``s3://`` every file is
    written to a local staging directory and uploaded (:meth:`publish`), and files of other
    workers are downloaded on first use (:meth:`fetch`)."""

    def __init__(self, uri: str, storage: Storage) -> None:
        self.uri = uri.rstrip("/") if is_s3(uri) else uri
        self.storage = storage
        self.remote = is_s3(uri)
        if self.remote:
            # Private to this process: a stale copy from another run must never be read back.
            self.local = Path(tempfile.mkdtemp(prefix="crucible-data-"))
        else:
            self.local = Path(uri)
        self.local.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        """Remove the local staging copy of a remote output (a local output stays)."""
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)

    def path(self, rel: str) -> Path:
        p = self.local / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def uri_of(self, rel: str) -> str:
        return join(self.uri, rel) if self.remote else str(self.local / rel)

    def publish(self, rel: str) -> None:
        if self.remote:
            self.storage.upload_file(self.local / rel, join(self.uri, rel))

    def publish_dir(self, rel: str) -> None:
        if self.remote:
            root = self.local / rel
            for p in sorted(root.rglob("*")):
                if p.is_file() and not p.name.startswith("."):
                    self.publish(p.relative_to(self.local).as_posix())

    def exists(self, rel: str) -> bool:
        if self.remote:
            return self.storage.exists(join(self.uri, rel))
        return (self.local / rel).exists()

    def fetch(self, rel: str) -> Path:
        p = self.local / rel
        if self.remote and not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            self.storage.download_file(join(self.uri, rel), p)
        return p

    def fetch_dir(self, rel: str) -> Path:
        p = self.local / rel
        if self.remote:
            self.storage.download_prefix(join(self.uri, rel), p)
        return p

    def write_json(self, rel: str, data: Any) -> bytes:
        raw = (json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()
        _atomic_write(self.path(rel), raw)
        self.publish(rel)
        return raw

    def read_json(self, rel: str) -> Any:
        return json.loads(self.fetch(rel).read_text())

    def delete(self, rel: str) -> None:
        target = self.local / rel
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)
        if self.remote:
            self.storage.delete(join(self.uri, rel))


def _tmp_name(path: Path) -> Path:
    """A temporary sibling private to this process: a duplicate worker (a pod restarted while
    the old one still runs) never writes into the same temporary file."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = _tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class _AtomicZstdWriter:
    """jsonl.zst written to a temporary name and renamed on close (deterministic bytes)."""

    def __init__(self, path: Path) -> None:
        import zstandard

        self.path = path
        self.tmp = _tmp_name(path)
        self._raw = open(self.tmp, "wb")  # noqa: SIM115 - closed in close()
        self._stream = zstandard.ZstdCompressor(level=3, threads=0).stream_writer(self._raw, closefd=False)

    def write(self, record: dict[str, Any]) -> None:
        self._stream.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass") + b"\n")

    def close(self) -> None:
        self._stream.close()
        self._raw.close()
        os.replace(self.tmp, self.path)


def _read_zstd_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    import zstandard

    with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as reader:
        import io

        for line in io.BufferedReader(reader):  # type: ignore[arg-type]
            yield json.loads(line)


# -- the pipeline --------------------------------------------------------------------------


@dataclass
class Manifest:
    """The receipt of a finished run (see the module docstring for :attr:`data`'s shape)."""

    data: dict[str, Any]
    uri: str
    sha256: str

    @property
    def documents_in(self) -> int:
        return int(self.data["documentsIn"])

    @property
    def documents_out(self) -> int:
        return int(self.data["documentsOut"])

    @property
    def tokens(self) -> dict[str, int]:
        return dict(self.data["tokens"])


class DataPipeline:
    def __init__(
        self,
        config: DataPipelineConfig,
        output_uri: str,
        num_parts: int | None = None,
        storage: Storage | None = None,
    ) -> None:
        self.config = config
        self.storage = storage or Storage.from_config(config.storage)
        self.ws = Workspace(output_uri, self.storage)
        self.num_parts = num_parts or config.workers
        self._inputs: list[InputFile] | None = None

    # -- shared helpers -----------------------------------------------------------------

    @property
    def inputs(self) -> list[InputFile]:
        if self._inputs is None:
            self._inputs = list_inputs(self.config.sources, self.storage)
        return self._inputs

    def files_of(self, part: int) -> list[InputFile]:
        n, files = self.num_parts, self.inputs
        return files[part * len(files) // n : (part + 1) * len(files) // n]

    def done(self, stage: str, part: int) -> bool:
        return self.ws.exists(f"{_part(stage, part)}/{DONE}")

    def missing(self, stage: str) -> list[int]:
        return [p for p in range(self.num_parts) if not self.done(stage, p)]

    def _mark_done(self, stage: str, part: int, summary: dict[str, Any]) -> None:
        self.ws.write_json(f"{_part(stage, part)}/{DONE}", summary)

    def require(self, stage: str) -> None:
        missing = self.missing(stage)
        if missing:
            shown = ", ".join(str(p) for p in missing[:10])
            raise PipelineError(
                f"stage {stage!r} has not finished for parts {shown}{' ...' if len(missing) > 10 else ''} "
                f"of {self.num_parts}; run it first (--stage {stage})"
            )

    def wait_for(self, stage: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.missing(stage):
            if time.monotonic() > deadline:
                self.require(stage)
            time.sleep(WAIT_POLL_SECONDS)

    def build_steps(self) -> list[Step]:
        """The filter stage's steps in order, each built from its spec section."""
        s = self.config.steps
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

    # -- stage 1: filter ------------------------------------------------------------------

    def run_filter(self, part: int) -> None:
        if self.done("filter", part):
            log.info("filter part %d: done already, skipping", part)
            return
        started = time.perf_counter()
        rel = _part("filter", part)
        files = self.files_of(part)
        reader = DocumentReader(self.storage, self.config.max_doc_chars)
        steps = self.build_steps()
        dropped_writer = self._dropped_sink(part, steps)
        minhash = self.config.steps.dedup.minhash
        hasher = MinHasher(minhash)
        docs_out = _AtomicZstdWriter(self.ws.path(f"{rel}/docs.jsonl.zst"))
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
        np.save(self.ws.path(f"{rel}/keys.npy"), all_keys)
        np.save(self.ws.path(f"{rel}/bands.npy"), np.ascontiguousarray(all_bands.T))  # (B, n)
        np.save(self.ws.path(f"{rel}/has_signature.npy"), np.concatenate(has_sig) if has_sig else np.zeros(0, bool))
        np.save(self.ws.path(f"{rel}/exact.npy"), np.concatenate(exact) if exact else np.zeros((0, 2), np.uint64))
        for name in ("docs.jsonl.zst", "keys.npy", "bands.npy", "has_signature.npy", "exact.npy"):
            self.ws.publish(f"{rel}/{name}")
        if dropped_writer is not None:
            dropped_writer.close()
            self.ws.publish(f"dropped/part-{part:05d}.jsonl.zst")
        stats = {
            "files": len(files),
            "filesBySource": dict(Counter(f.source.name for f in files)),
            "recordsBySource": dict(sorted(reader.records.items())),
            "read": reader.errors.to_json(),
            "steps": [{"step": s.name, **s.stats_json()} for s in steps],
            "kept": kept,
        }
        self.ws.write_json(f"{rel}/stats.json", stats)
        elapsed = time.perf_counter() - started
        records = sum(reader.records.values())
        log.info(
            "filter part %d/%d: %d files, %d records -> %d kept in %.1fs (%.0f docs/s); step seconds: %s",
            part, self.num_parts, len(files), records, kept, elapsed, records / max(elapsed, 1e-9),
            {s.name: round(s.stats.seconds, 2) for s in steps},
        )
        self._mark_done("filter", part, {"kept": kept, "records": records})

    def _dropped_sink(self, part: int, steps: list[Step]) -> _AtomicZstdWriter | None:
        cfg = self.config.dropped
        if not cfg.keep:
            return None
        writer = _AtomicZstdWriter(self.ws.path(f"dropped/part-{part:05d}.jsonl.zst"))
        rate = cfg.sample_rate

        def sink(doc: Document, step: str, reason: str) -> None:
            if rate >= 1 or unit_hash(doc.id, 7) < rate:
                writer.write({"id": doc.id, "source": doc.source, "step": step, "reason": reason, "text": doc.text})

        for step in steps:
            step.drop_sink = sink
        return writer

    # -- stage 2: dedup links (+ tokenizer) --------------------------------------------------

    def run_dedup(self, part: int) -> None:
        if self.done("dedup", part):
            log.info("dedup part %d: done already, skipping", part)
            return
        self.require("filter")
        started = time.perf_counter()
        minhash = self.config.steps.dedup.minhash
        n_bands = minhash.bands if minhash.enabled else 0
        parts = range(self.num_parts)
        doc_keys = np.concatenate([np.load(self.ws.fetch(f"{_part('filter', p)}/keys.npy")) for p in parts])
        links: dict[str, np.ndarray] = {}
        near_a: list[np.ndarray] = []
        near_b: list[np.ndarray] = []
        for band in range(part, n_bands + 1, self.num_parts):
            if band == n_bands:
                if self.config.steps.dedup.exact:
                    hashes = np.concatenate([np.load(self.ws.fetch(f"{_part('filter', p)}/exact.npy")) for p in parts])
                    links["exact_a"], links["exact_b"] = exact_pairs(hashes, doc_keys)
                continue
            column = np.concatenate(
                [np.load(self.ws.fetch(f"{_part('filter', p)}/bands.npy"), mmap_mode="r")[band] for p in parts]
            )
            present = np.concatenate([np.load(self.ws.fetch(f"{_part('filter', p)}/has_signature.npy")) for p in parts])
            a, b = bucket_pairs(column[present], doc_keys[present])
            near_a.append(a)
            near_b.append(b)
        empty = np.zeros(0, np.uint64)
        links.setdefault("exact_a", empty)
        links.setdefault("exact_b", empty)
        links["near_a"] = np.concatenate(near_a) if near_a else empty
        links["near_b"] = np.concatenate(near_b) if near_b else empty
        rel = f"{_part('dedup', part)}/links.npz"
        tmp = _tmp_name(self.ws.path(rel))
        with open(tmp, "wb") as f:
            np.savez(f, **links)  # type: ignore[arg-type]
        os.replace(tmp, self.ws.path(rel))
        self.ws.publish(rel)
        if part == 0:
            self._make_tokenizer()
        log.info("dedup part %d/%d: %d near links, %d exact links in %.1fs", part, self.num_parts,
                 len(links["near_a"]), len(links["exact_a"]), time.perf_counter() - started)
        self._mark_done("dedup", part, {"nearLinks": len(links["near_a"]), "exactLinks": len(links["exact_a"])})

    def _make_tokenizer(self) -> None:
        cfg = self.config.tokenizer
        out = self.ws.path("tokenizer/tokenizer.json").parent
        if cfg.source is not None:
            uri = cfg.source.uri
            if uri is None:
                raise TokenizerSourceError("tokenizer.source.fromRun was not resolved to a uri by the backend")
            try:
                local = self.storage.local_path(uri, tempfile.mkdtemp(prefix="crucible-tokenizer-"),
                                                field="tokenizer.source.uri")
            except StorageUnavailable:
                raise
            except StorageError as exc:
                raise TokenizerSourceError(f"tokenizer.source.uri: {exc}") from exc
            info = tokenizer_lib.adopt(Path(local), out, origin=uri)
        else:
            info = tokenizer_lib.train_bpe(self._tokenizer_sample(), cfg, out)
        self.ws.write_json("_work/tokenizer.json", info.to_json())
        self.ws.publish_dir("tokenizer")
        log.info("tokenizer: %s, vocab %d, eos %d", info.origin, info.vocab_size, info.eos_id)

    def _tokenizer_sample(self) -> Iterator[str]:
        """About ``maxTrainingDocs`` filtered documents chosen by id hash, in input order."""
        total = sum(self.ws.read_json(f"{_part('filter', p)}/stats.json")["kept"] for p in range(self.num_parts))
        rate = min(1.0, self.config.tokenizer.max_training_docs / max(total, 1))
        for p in range(self.num_parts):
            for rec in _read_zstd_jsonl(self.ws.fetch(f"{_part('filter', p)}/docs.jsonl.zst")):
                if rate >= 1.0 or unit_hash(rec["id"], 11) < rate:
                    yield rec["t"]

    # -- stage 3: tokenize ----------------------------------------------------------------

    def removed(self) -> tuple[set[int], set[int]]:
        """(exact-duplicate keys, near-duplicate keys) dropped by the clustering."""
        links = [np.load(self.ws.fetch(f"{_part('dedup', p)}/links.npz")) for p in range(self.num_parts)]
        ea = np.concatenate([x["exact_a"] for x in links])
        eb = np.concatenate([x["exact_b"] for x in links])
        na = np.concatenate([x["near_a"] for x in links])
        nb = np.concatenate([x["near_b"] for x in links])
        exact = set(removed_by_clusters(ea, eb).tolist())
        every = set(removed_by_clusters(np.concatenate([ea, na]), np.concatenate([eb, nb])).tolist())
        return exact, every - exact

    def run_tokenize(self, part: int) -> None:
        if self.done("tokenize", part):
            log.info("tokenize part %d: done already, skipping", part)
            return
        self.require("dedup")
        started = time.perf_counter()
        exact_removed, near_removed = self.removed()
        info = self.ws.read_json("_work/tokenizer.json")
        tok = tokenizer_lib.load(self.ws.fetch_dir("tokenizer"))
        # "<|endoftext|>" written in a document is text, not a document end.
        tok.encode_special_tokens = True
        vocab, eos = int(info["vocabSize"]), int(info["eosId"])
        prefix = f"part-{part:05d}"
        tps = self.config.shards.tokens_per_shard
        writers = {
            split: ShardWriter(self.ws.path(f"{split}/.keep").parent, vocab, eos, tps, prefix=prefix)
            for split in ("train", "validation")
        }
        weights = {s.name: s.weight for s in self.config.sources}
        mixture = self.config.steps.mixture
        shards_cfg = self.config.shards
        counts: Counter[str] = Counter()
        per_source: dict[str, Counter[str]] = {}
        ids_path = self.ws.path(f"{_part('tokenize', part)}/kept_ids.jsonl")
        ids_tmp = _tmp_name(ids_path)
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
        dropped = _AtomicZstdWriter(self.ws.path(dropped_rel)) if self.config.dropped.keep else None
        rate = self.config.dropped.sample_rate
        with open(ids_tmp, "w", encoding="utf-8") as ids_file:
            for rec in _read_zstd_jsonl(self.ws.fetch(f"{_part('filter', part)}/docs.jsonl.zst")):
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
                    copies = self._copies(rec["id"], weights[src], mixture.seed) if mixture.enabled else 1
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
        self.ws.publish(f"{_part('tokenize', part)}/kept_ids.jsonl")
        if dropped is not None:
            dropped.close()
            self.ws.publish(dropped_rel)
        shards: dict[str, list[dict[str, Any]]] = {}
        for split, writer in writers.items():
            writer.close(write_index=False)
            shards[split] = [s.to_json() for s in writer.shards]
            for s in writer.shards:
                self.ws.publish(f"{split}/{s.name}.bin")
                self.ws.publish(f"{split}/{s.name}.idx")
        counts.update({k: sum(c[k] for c in per_source.values()) for k in ("in", "out")})
        self.ws.write_json(
            f"{_part('tokenize', part)}/stats.json",
            {"sources": {k: dict(sorted(v.items())) for k, v in sorted(per_source.items())}, "shards": shards},
        )
        log.info("tokenize part %d/%d: %d -> %d documents in %.1fs", part, self.num_parts, counts["in"],
                 counts["out"], time.perf_counter() - started)
        self._mark_done("tokenize", part, dict(counts))

    @staticmethod
    def _copies(doc_id: str, weight: float, seed: int) -> int:
        whole = int(weight)
        return whole + (1 if unit_hash(doc_id, seed + 1) < weight - whole else 0)

    # -- finalize ---------------------------------------------------------------------------

    def finalize(self) -> Manifest | None:
        """Merge every part's results once all are done; None while parts are missing."""
        if self._finished():
            return self.load_manifest()
        if self.missing("tokenize"):
            return None
        info = self.ws.read_json("_work/tokenizer.json")
        vocab, eos = int(info["vocabSize"]), int(info["eosId"])
        filter_stats = [self.ws.read_json(f"{_part('filter', p)}/stats.json") for p in range(self.num_parts)]
        token_stats = [self.ws.read_json(f"{_part('tokenize', p)}/stats.json") for p in range(self.num_parts)]
        splits: dict[str, Any] = {}
        for split in ("train", "validation"):
            infos = [ShardInfo(**s) for ts in token_stats for s in ts["shards"][split]]
            index = write_index(self.ws.path(f"{split}/index.json").parent, infos, vocab, eos)
            self.ws.publish(f"{split}/index.json")
            splits[split] = {k: index[k] for k in ("tokens", "documents", "dtype", "shards")}
        ids_hash = hashlib.sha256()
        for p in range(self.num_parts):
            with open(self.ws.fetch(f"{_part('tokenize', p)}/kept_ids.jsonl"), "rb") as f:
                for block in iter(lambda f=f: f.read(1 << 20), b""):  # type: ignore[misc]
                    ids_hash.update(block)
        data = self._manifest(filter_stats, token_stats, splits, info, ids_hash.hexdigest())
        raw = self.ws.write_json(MANIFEST, data)
        manifest_sha = hashlib.sha256(raw).hexdigest()
        if self.config.shards.validation_fraction and not data["tokens"]["validation"]:
            log.warning("validation split is empty: %d documents kept and shards.validationFraction %.4g; "
                        "raise it for an evaluation set", data["documentsOut"], self.config.shards.validation_fraction)
        if not data["tokens"]["train"]:
            biggest = sorted(((n, f"{row['step']}:{r}") for row in data["funnel"] for r, n in row["dropped"].items()),
                             reverse=True)[:3]
            raise NothingLeftError(
                f"no training tokens: all {data['documentsIn']} input documents were dropped (most by "
                f"{', '.join(f'{name} ({n})' for n, name in biggest) or 'nothing - the sources are empty'}); "
                f"see the funnel in {self.ws.uri_of(MANIFEST)} and loosen the matching steps or check sources[*].textField"
            )
        dropped = {f"{row['step']}:{r}": n for row in data["funnel"] for r, n in row["dropped"].items()}
        success = {
            "stage": "data",
            **identity(self.config),
            "finishedAt": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "inputs": {
                "sources": {s.name: s.uri for s in self.config.sources},
                "tokenizer": self.config.tokenizer.source.uri if self.config.tokenizer.source else None,
            },
            "results": {
                "documentsIn": data["documentsIn"],
                "documentsOut": data["documentsOut"],
                "tokensTrain": data["tokens"]["train"],
                "tokensValidation": data["tokens"]["validation"],
                "manifestSha256": manifest_sha,
                "dropped": dropped,
            },
        }
        self.ws.write_json(SUCCESS, success)
        write_success_message(success)
        # The bulky intermediates go; stats, markers and the kept ids (an audit trail) stay.
        for p in range(self.num_parts):
            for name in ("docs.jsonl.zst", "keys.npy", "bands.npy", "has_signature.npy", "exact.npy"):
                self.ws.delete(f"{_part('filter', p)}/{name}")
            self.ws.delete(f"{_part('dedup', p)}/links.npz")
        if not self.ws.remote:  # temporary files of killed attempts (never uploaded to S3)
            for stray in self.ws.local.rglob(".*.tmp"):
                stray.unlink(missing_ok=True)
        log.info("data pipeline done: %d -> %d documents, %d train / %d validation tokens, manifest %s",
                 data["documentsIn"], data["documentsOut"], data["tokens"]["train"], data["tokens"]["validation"],
                 self.ws.uri_of(MANIFEST))
        return Manifest(data, self.ws.uri_of(MANIFEST), manifest_sha)

    def _finished(self) -> bool:
        """True when the output holds this pipeline's ``_SUCCESS``; ForeignResultError when another's."""
        if not self.ws.exists(SUCCESS):
            return False
        raw = self.ws.fetch(SUCCESS).read_bytes() if self.ws.remote else (self.ws.local / SUCCESS).read_bytes()
        check_existing(raw, self.config, self.ws.uri_of(SUCCESS))
        return True

    def load_manifest(self) -> Manifest:
        raw = self.ws.fetch(MANIFEST).read_bytes() if self.ws.remote else (self.ws.local / MANIFEST).read_bytes()
        return Manifest(json.loads(raw), self.ws.uri_of(MANIFEST), hashlib.sha256(raw).hexdigest())

    def _manifest(
        self,
        filter_stats: list[dict[str, Any]],
        token_stats: list[dict[str, Any]],
        splits: dict[str, Any],
        tokenizer_info: dict[str, Any],
        ids_sha: str,
    ) -> dict[str, Any]:
        records: Counter[str] = Counter()
        files: Counter[str] = Counter()
        read_dropped: Counter[str] = Counter()
        src_dropped: dict[str, Counter[str]] = {s.name: Counter() for s in self.config.sources}
        for fs in filter_stats:
            records.update(fs["recordsBySource"])
            files.update(fs["filesBySource"])
            read_dropped.update(fs["read"]["dropped"])
            for src, reasons in fs["read"]["droppedBySource"].items():
                src_dropped[src].update({f"read:{r}": n for r, n in reasons.items()})
        funnel: list[dict[str, Any]] = []
        total_in = sum(records.values())
        funnel.append({"step": "read", "documentsIn": total_in,
                       "documentsOut": total_in - sum(read_dropped.values()),
                       "dropped": dict(sorted(read_dropped.items()))})
        step_names = [row["step"] for row in filter_stats[0]["steps"]] if filter_stats else []
        pii: Counter[str] = Counter()
        for i, name in enumerate(step_names):
            row: dict[str, Any] = {"step": name, "documentsIn": 0, "documentsOut": 0, "dropped": Counter(),
                                   "changes": Counter()}
            for fs in filter_stats:
                st = fs["steps"][i]
                row["documentsIn"] += st["documentsIn"]
                row["documentsOut"] += st["documentsOut"]
                row["dropped"].update(st["dropped"])
                row["changes"].update(st.get("changes", {}))
                for src, reasons in st["droppedBySource"].items():
                    src_dropped[src].update({f"{name}:{r}": n for r, n in reasons.items()})
            if name == "pii":
                pii = Counter({k: v for k, v in row["changes"].items() if k != "documents"})
            row["dropped"] = dict(sorted(row["dropped"].items()))
            row["changes"] = dict(sorted(row["changes"].items()))
            if not row["changes"]:
                del row["changes"]
            funnel.append(row)
        tok_src: dict[str, Counter[str]] = {s.name: Counter() for s in self.config.sources}
        for ts in token_stats:
            for src, c in ts["sources"].items():
                tok_src[src].update(c)
        for src, c in tok_src.items():
            for reason in ("exact_duplicate", "near_duplicate"):
                if c[reason]:
                    src_dropped[src][f"dedup:{reason}"] += c[reason]
            if c["downweighted"]:
                src_dropped[src]["mixture:downweighted"] += c["downweighted"]
        tot: Counter[str] = Counter()
        for c in tok_src.values():
            tot.update(c)
        funnel.append({"step": "dedup", "documentsIn": tot["in"], "documentsOut": tot["out"],
                       "dropped": {k: tot[k] for k in ("exact_duplicate", "near_duplicate") if tot[k]}})
        funnel.append({"step": "mixture", "documentsIn": tot["mixture_in"],
                       "documentsOut": tot["written_train"],
                       "dropped": {"downweighted": tot["downweighted"]} if tot["downweighted"] else {},
                       "changes": {"repeats": tot["repeats"]}})

        def entry(names: list[str]) -> dict[str, Any]:
            dropped: Counter[str] = Counter()
            for n in names:
                dropped.update(src_dropped[n])
            c: Counter[str] = Counter()
            for n in names:
                c.update(tok_src[n])
            return {
                "files": sum(files[n] for n in names),
                "documentsIn": sum(records[n] for n in names),
                "documentsOut": c["out"],
                "dropped": dict(sorted(dropped.items())),
                "documentsWritten": {"train": c["written_train"], "validation": c["written_validation"]},
                "tokens": {"train": c["tokens_train"], "validation": c["tokens_validation"]},
            }

        sources = {s.name: {"domain": s.domain, "weight": s.weight, **entry([s.name])} for s in self.config.sources}
        domains: dict[str, Any] = {}
        for domain in sorted({s.domain for s in self.config.sources}):
            domains[domain] = entry([s.name for s in self.config.sources if s.domain == domain])
        data: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "version": 1,
            "documentsIn": total_in,
            "documentsOut": tot["out"],
            "documentsWritten": {"train": splits["train"]["documents"], "validation": splits["validation"]["documents"]},
            "tokens": {"train": splits["train"]["tokens"], "validation": splits["validation"]["tokens"]},
            "funnel": funnel,
            "sources": sources,
            "domains": domains,
            "pii": dict(sorted(pii.items())),
            "splits": splits,
            "keptDocumentIdsSha256": ids_sha,
            "tokenizer": tokenizer_info,
            "config": {k: v for k, v in self.config.to_wire().items() if k != "output"},  # where it lives is not what it is
        }
        if self.config.dropped.keep:
            data["droppedSamples"] = [f"dropped/{kind}part-{p:05d}.jsonl.zst"
                                      for kind in ("", "dedup-") for p in range(self.num_parts)]
        return data

    # -- drivers --------------------------------------------------------------------------

    def run_stage(self, stage: str, part: int) -> None:
        {"filter": self.run_filter, "dedup": self.run_dedup, "tokenize": self.run_tokenize}[stage](part)

    def run_all(self) -> Manifest:
        try:
            if self._finished():
                return self.load_manifest()
            for stage in STAGES:
                for part in range(self.num_parts):
                    self.run_stage(stage, part)
            manifest = self.finalize()
            if manifest is None:  # pragma: no cover - every part ran above
                raise PipelineError("tokenize parts missing after running them all")
            return manifest
        finally:
            self.ws.close()

    def run_worker(self, part: int, stage: str, wait_seconds: float) -> Manifest | None:
        """One worker of N: one stage, or all of them with barriers between."""
        try:
            if self._finished():
                return self.load_manifest()
            if stage != "all":
                self.run_stage(stage, part)
                return self.finalize() if stage == "tokenize" else None
            for i, name in enumerate(STAGES):
                if i:
                    self.wait_for(STAGES[i - 1], wait_seconds)
                self.run_stage(name, part)
            return self.finalize()
        finally:
            self.ws.close()


def run_pipeline(
    config: DataPipelineConfig,
    output_uri: str | os.PathLike[str] | None = None,
    num_parts: int | None = None,
    storage: Storage | None = None,
) -> Manifest:
    """Run every stage for every part in this process and return the receipt.

    ``output_uri`` defaults to ``config.output.uri``. A finished output (``_SUCCESS``) is
    returned as it is; an interrupted one is resumed from its completed parts.
    """
    uri = str(output_uri) if output_uri is not None else config.output.uri
    if not uri:
        raise ValueError("output.uri: no output location; set output.uri or pass output_uri")
    return DataPipeline(config, uri, num_parts=num_parts, storage=storage).run_all()


# -- command line ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m crucible.trainer data", description=__doc__.split("\n")[0])
    p.add_argument("--spec", required=True, help="the DataPipeline spec as JSON (camelCase)")
    p.add_argument("--shard", type=int, default=None, help="this worker's index (default: $JOB_COMPLETION_INDEX)")
    p.add_argument("--num-shards", type=int, default=None, help="number of workers (default: spec workers)")
    p.add_argument("--stage", choices=[*STAGES, "all"], default="all")
    p.add_argument("--output", default=None, help="output URI (default: the spec's output.uri)")
    p.add_argument("--wait-timeout", type=float, default=86400.0,
                   help="with --shard and --stage all: seconds to wait for other workers between stages")
    return p


def _load_spec(path: str) -> DataPipelineConfig:
    from pydantic import ValidationError

    from crucible.trainer.config import parse_stage_spec

    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the spec ({exc})") from exc
    except ValueError as exc:
        raise SpecError(f"{path}: not valid JSON ({exc})") from exc
    try:
        config = parse_stage_spec("data", raw)
    except ValidationError as exc:
        lines = [
            f"  {'.'.join(str(x) for x in err['loc']) or '(root)'}: {err['msg']}" for err in exc.errors()
        ]
        raise SpecError(f"{path}: invalid DataPipeline spec:\n" + "\n".join(lines)) from exc
    if not isinstance(config, DataPipelineConfig):  # pragma: no cover - parse_stage_spec contract
        raise SpecError(f"{path}: not a DataPipeline spec")
    return config


class SpecError(ValueError):
    """The spec file is unreadable or invalid; the message names the file and fields."""


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        config = _load_spec(args.spec)
        output = args.output or config.output.uri
        if not output:
            raise SpecError(f"{args.spec}: output.uri: no output location; the backend fills it in")
        shard = args.shard
        if shard is None and os.environ.get("JOB_COMPLETION_INDEX", "").strip():
            shard = int(os.environ["JOB_COMPLETION_INDEX"])
        num = args.num_shards or config.workers
        if shard is not None and not 0 <= shard < num:
            raise SpecError(f"--shard {shard} is outside 0..{num - 1} (--num-shards/workers is {num})")
        pipeline = DataPipeline(config, output, num_parts=num)
        if shard is None:
            if args.stage == "all":
                pipeline.run_all()
            else:
                try:
                    for part in range(num):
                        pipeline.run_stage(args.stage, part)
                    if args.stage == "tokenize":
                        pipeline.finalize()
                finally:
                    pipeline.ws.close()
        else:
            pipeline.run_worker(shard, args.stage, args.wait_timeout)
        return EXIT_OK
    except (SpecError, SourceError, TokenizerSourceError, WordListError, NothingLeftError, ForeignResultError) as exc:
        log.error("%s", exc)
        return EXIT_BAD_INPUT
    except StorageUnavailable as exc:
        log.error("storage unavailable (retriable): %s", exc)
        return EXIT_RETRIABLE
    except (PipelineError, StorageError) as exc:
        log.error("%s", exc)
        return EXIT_APPLICATION_ERROR
    except Exception:
        log.error("data pipeline failed:\n%s", traceback.format_exc())
        return EXIT_APPLICATION_ERROR


# Re-exported for callers that only want the steps.
__all__ = ["DataPipeline", "Manifest", "main", "run_pipeline"]

