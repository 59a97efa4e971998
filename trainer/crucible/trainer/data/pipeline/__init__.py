"""The DataPipeline stage: raw text in, clean deduplicated token shards and a receipt out.

Entry points::

    python -m crucible.trainer data --spec FILE [--shard I --num-shards N] [--stage filter|dedup|tokenize|all]
    run_pipeline(config, output_uri) -> Manifest          # everything in this process

Stages, one module each (each worker ``I`` of ``N`` runs one part of each; ``JOB_COMPLETION_INDEX``
stands in for ``--shard``); :mod:`.state` is what they share, :mod:`.workspace` where they write::

    filter    (filter.py) input files [I*F/N, (I+1)*F/N) -> read -> normalize -> language -> gopher
              repetition -> gopher quality -> c4 -> fineweb -> pii -> toxicity; writes the kept
              documents, their MinHash band keys and exact hashes
    dedup     (dedup.py) the keys k with k % N == I of every band and the exact hash: bucket links as
              spanning forests, each edge sent to the partition owning its document; worker 0 also
              trains (or adopts) the tokenizer on a hash-chosen sample
    tokenize  (tokenize.py) connected components in rounds, partition I by worker I (and any nobody
              claimed) -> this part's drop decisions -> drop duplicates ->
              train/validation split by id hash -> mixture weights -> tokenize -> shards
              ``<out>/{train,validation}/part-IIIII-SSSSS.bin``
    manifest  (manifest.py) the worker that finds every tokenize part done merges the
              indexes, writes ``manifest.json`` and ``_SUCCESS`` last.

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
     "revision": {"earlierRevisions": [uri, ...],    # steps.dedup.earlierRevisions (a revision's)
                  "seenInEarlierRevision": 50,      # documents dropped as dedup:seen_in_earlier_revision
                  "documentsSeen": 80},             # entries of seen.npy (this and the earlier revisions)
     "tokenizer": {"vocabSize", "eosId", "eosToken", "sha256", "origin"},
     "droppedSamples": ["dropped/part-00000.jsonl.zst", "dropped/dedup-part-00000.jsonl.zst"],
                                     # when dropped.keep: {"id", "source", "step", "reason", "text"} per line
     "config": {... the full DataPipeline spec, camelCase ...}}

Dropped-reason keys in ``sources[*].dropped`` are ``step:reason``.
"""


from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Callable

from crucible.trainer.config.data import DataPipelineConfig
from crucible.trainer.data.pipeline import dedup, manifest, tokenize
from crucible.trainer.data.pipeline import filter as filter_stage
from crucible.trainer.data.pipeline.manifest import MANIFEST, MANIFEST_FORMAT, Manifest
from crucible.trainer.data.pipeline.state import NothingLeftError, PipelineError, PipelineState
from crucible.trainer.data.step import Step
from crucible.trainer.stage_io import SpecError, stage_main_with_options
from crucible.trainer.storage import Storage

log = logging.getLogger("crucible.data")

# The stages in order: each module has STAGE (its name, --stage) and run(pipe, part).
RUNNERS: dict[str, Callable[[PipelineState, int], None]] = {m.STAGE: m.run for m in (filter_stage, dedup, tokenize)}
STAGES = tuple(RUNNERS)
WAIT_POLL_SECONDS = 5.0

__all__ = [
    "MANIFEST",
    "MANIFEST_FORMAT",
    "STAGES",
    "DataPipeline",
    "Manifest",
    "NothingLeftError",
    "PipelineError",
    "main",
    "run_pipeline",
]


class DataPipeline(PipelineState):
    """The driver: which stage runs for which part, and the barriers between stages."""

    def build_steps(self) -> list[Step]:
        return filter_stage.build_steps(self.config)

    def run_filter(self, part: int) -> None:
        filter_stage.run(self, part)

    def run_dedup(self, part: int) -> None:
        dedup.run(self, part)

    def run_tokenize(self, part: int) -> None:
        tokenize.run(self, part)

    def run_stage(self, stage: str, part: int) -> None:
        RUNNERS[stage](self, part)

    def finalize(self) -> Manifest | None:
        """Merge every part's results once all are done; None while parts are missing."""
        return manifest.finalize(self)

    def load_manifest(self) -> Manifest:
        return manifest.load(self)

    def wait_for(self, stage: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.missing(stage):
            if time.monotonic() > deadline:
                self.require(stage)
            time.sleep(WAIT_POLL_SECONDS)

    def run_all(self) -> Manifest:
        try:
            if self.finished():
                return self.load_manifest()
            for stage in STAGES:
                for part in range(self.num_parts):
                    self.run_stage(stage, part)
            result = self.finalize()
            if result is None:  # pragma: no cover - every part ran above
                raise PipelineError("tokenize parts missing after running them all")
            return result
        finally:
            self.ws.close()

    def run_worker(self, part: int, stage: str, wait_seconds: float) -> Manifest | None:
        """One worker of N: one stage, or all of them with barriers between."""
        try:
            if self.finished():
                return self.load_manifest()
            if stage != "all":
                self.run_stage(stage, part)
                return self.finalize() if stage == tokenize.STAGE else None
            for i, name in enumerate(STAGES):
                if i:
                    self.wait_for(STAGES[i - 1], wait_seconds)
                self.run_stage(name, part)
            return self.finalize()
        finally:
            self.ws.close()

    def run_stage_everywhere(self, stage: str) -> None:
        """One stage for every part in this process (``--stage X`` without ``--shard``)."""
        try:
            for part in range(self.num_parts):
                self.run_stage(stage, part)
            if stage == tokenize.STAGE:
                self.finalize()
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


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shard", type=int, default=None, help="this worker's index (default: $JOB_COMPLETION_INDEX)")
    p.add_argument("--num-shards", type=int, default=None, help="number of workers (default: spec workers)")
    p.add_argument("--stage", choices=[*STAGES, "all"], default="all")
    p.add_argument("--output", default=None, help="output URI (default: the spec's output.uri)")
    p.add_argument("--wait-timeout", type=float, default=86400.0,
                   help="with --shard and --stage all: seconds to wait for other workers between stages")


def run(config: DataPipelineConfig, args: argparse.Namespace) -> int:
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
    if shard is not None:
        pipeline.run_worker(shard, args.stage, args.wait_timeout)
    elif args.stage == "all":
        pipeline.run_all()
    else:
        pipeline.run_stage_everywhere(args.stage)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return stage_main_with_options("data", DataPipelineConfig, _options, run, argv, log=log.error)
