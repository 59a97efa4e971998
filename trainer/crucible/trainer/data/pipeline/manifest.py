"""The last step, manifest: once every tokenize part is done, merge them into the receipt.

Writes the split indexes, ``manifest.json`` (the receipt: funnel, per-source and per-domain
counts, shards with hashes, tokenizer, config; its shape is in
:mod:`crucible.trainer.data.pipeline`) and ``_SUCCESS`` last, then deletes the bulky
intermediates. Whichever worker finds every part done does it; a rerun finds ``_SUCCESS``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

from crucible.trainer.data import classifier
from crucible.trainer.data.pipeline import dedup as dedup_stage
from crucible.trainer.data.pipeline import filter as filter_stage
from crucible.trainer.data.pipeline import tokenize as tokenize_stage
from crucible.trainer.data.pipeline.state import NothingLeftError, PipelineState, part_dir
from crucible.trainer.data.receipts import source_receipts
from crucible.trainer.data.shards import ShardInfo, write_index
from crucible.trainer.seen import SEEN
from crucible.trainer.stage_io import files_digest, input_receipt, write_success

log = logging.getLogger("crucible.data")

STAGE = "data"  # the stage name in _SUCCESS
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "crucible-data-manifest"


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


def finalize(pipe: PipelineState) -> Manifest | None:
    """Merge every part's results once all are done; None while parts are missing."""
    if pipe.finished():
        return load(pipe)
    if pipe.missing(tokenize_stage.STAGE):
        return None
    info = pipe.ws.read_json(dedup_stage.TOKENIZER_INFO)
    vocab, eos = int(info["vocabSize"]), int(info["eosId"])
    filter_stats = [pipe.ws.read_json(f"{part_dir(filter_stage.STAGE, p)}/stats.json") for p in range(pipe.num_parts)]
    token_stats = [pipe.ws.read_json(f"{part_dir(tokenize_stage.STAGE, p)}/stats.json") for p in range(pipe.num_parts)]
    splits: dict[str, Any] = {}
    for split in ("train", "validation"):
        infos = [ShardInfo(**s) for ts in token_stats for s in ts["shards"][split]]
        index = write_index(pipe.ws.path(f"{split}/index.json").parent, infos, vocab, eos)
        pipe.ws.publish(f"{split}/index.json")
        splits[split] = {k: index[k] for k in ("tokens", "documents", "dtype", "shards")}
    ids_hash = hashlib.sha256()
    for p in range(pipe.num_parts):
        with open(pipe.ws.fetch(f"{part_dir(tokenize_stage.STAGE, p)}/{tokenize_stage.KEPT_IDS}"), "rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):  # type: ignore[misc]
                ids_hash.update(block)
    data = build(pipe, filter_stats, token_stats, splits, info, ids_hash.hexdigest())
    data["revision"] = write_seen(pipe, sum(int(c.get(tokenize_stage.SEEN_REASON, 0))
                                            for ts in token_stats for c in ts["sources"].values()))
    raw = pipe.ws.write_json(MANIFEST, data)
    manifest_sha = hashlib.sha256(raw).hexdigest()
    if pipe.config.shards.validation_fraction and not data["tokens"]["validation"]:
        log.warning("validation split is empty: %d documents kept and shards.validationFraction %.4g; "
                    "raise it for an evaluation set", data["documentsOut"], pipe.config.shards.validation_fraction)
    if not data["tokens"]["train"]:
        biggest = sorted(((n, f"{row['step']}:{r}") for row in data["funnel"] for r, n in row["dropped"].items()),
                         reverse=True)[:3]
        raise NothingLeftError(
            f"no training tokens: all {data['documentsIn']} input documents were dropped (most by "
            f"{', '.join(f'{name} ({n})' for n, name in biggest) or 'nothing - the sources are empty'}); "
            f"see the funnel in {pipe.ws.uri_of(MANIFEST)} and loosen the matching steps or check sources[*].textField"
        )
    dropped = {f"{row['step']}:{r}": n for row in data["funnel"] for r, n in row["dropped"].items()}
    inputs = input_receipts(pipe, data)
    results = {
        "documentsIn": data["documentsIn"],
        "documentsOut": data["documentsOut"],
        "tokensTrain": data["tokens"]["train"],
        "tokensValidation": data["tokens"]["validation"],
        "manifestSha256": manifest_sha,
        "dropped": dropped,
    }
    write_success(pipe.storage, pipe.ws.uri, STAGE, inputs, results, pipe.config)
    # The bulky intermediates go; stats, markers and the kept ids (an audit trail) stay.
    for p in range(pipe.num_parts):
        filtered = part_dir(filter_stage.STAGE, p)
        pipe.ws.delete(f"{filtered}/docs.jsonl.zst")
        pipe.ws.delete(f"{filtered}/{filter_stage.HELD_OUT_NGRAMS}")
        for q in range(pipe.num_parts):
            pipe.ws.delete(f"{filtered}/{filter_stage.BUCKETS}/bucket-{q:05d}.bin")
        pipe.ws.delete(f"{filtered}/{filter_stage.BUCKETS}")
        pipe.ws.delete(f"{part_dir(tokenize_stage.STAGE, p)}/{tokenize_stage.SEEN_KEYS}")  # merged into seen.npy
    dedup_stage.cleanup(pipe)  # the rounds of the connected components
    if not pipe.ws.remote:  # temporary files of killed attempts (never uploaded to S3)
        for stray in pipe.ws.local.rglob(".*.tmp"):
            stray.unlink(missing_ok=True)
    log.info("data pipeline done: %d -> %d documents, %d train / %d validation tokens, manifest %s",
             data["documentsIn"], data["documentsOut"], data["tokens"]["train"], data["tokens"]["validation"],
             pipe.ws.uri_of(MANIFEST))
    return Manifest(data, pipe.ws.uri_of(MANIFEST), manifest_sha)


def write_seen(pipe: PipelineState, seen_dropped: int) -> dict[str, Any]:
    """``seen.npy``: what this and every earlier revision kept, so the next revision needs only this output."""
    import numpy as np

    arrays = [np.load(pipe.ws.fetch(f"{part_dir(tokenize_stage.STAGE, p)}/{tokenize_stage.SEEN_KEYS}"))
              for p in range(pipe.num_parts)]
    earlier = tokenize_stage.load_seen(pipe)
    if earlier is not None:
        arrays.append(earlier)
    keys = np.unique(np.concatenate(arrays)) if arrays else np.zeros(0, dtype=np.uint64)
    with open(pipe.ws.path(SEEN), "wb") as fh:
        np.save(fh, keys.astype(np.uint64))
    pipe.ws.publish(SEEN)
    return {"earlierRevisions": list(pipe.config.steps.dedup.earlier_revisions), "seenInEarlierRevision": seen_dropped,
            "documentsSeen": len(keys)}


def input_receipts(pipe: PipelineState, data: dict[str, Any]) -> dict[str, Any]:
    """Every input by content: each source by its raw files (each listed with its sha256 in the
    manifest; the sha256 here is of that listing) and the tokenizer it trained or loaded."""
    sources: dict[str, Any] = {}
    for i, source in enumerate(pipe.config.sources):
        raw = {f["uri"]: f["sha256"] for f in data["sources"][source.name].get("rawFiles") or []}
        sources[source.name] = {"uri": source.uri, "field": f"spec.sources[{i}]", "sha256": files_digest(raw),
                                "hashOf": "rawFiles"}
    inputs: dict[str, Any] = {"sources": sources}
    tok = pipe.config.tokenizer.source
    if tok is not None and tok.uri:
        inputs["tokenizer"] = input_receipt(pipe.storage, tok.uri, "spec.tokenizer.source")
    earlier = pipe.config.steps.dedup.earlier_revisions
    if earlier:  # their seen.npy decided what this revision dropped: lineage walks back through them
        inputs["earlierRevisions"] = [input_receipt(pipe.storage, uri, f"spec.steps.dedup.earlierRevisions[{i}]")
                                      for i, uri in enumerate(earlier)]
    return inputs


def load(pipe: PipelineState) -> Manifest:
    raw = pipe.ws.fetch(MANIFEST).read_bytes() if pipe.ws.remote else (pipe.ws.local / MANIFEST).read_bytes()
    return Manifest(json.loads(raw), pipe.ws.uri_of(MANIFEST), hashlib.sha256(raw).hexdigest())


def build(
    pipe: PipelineState,
    filter_stats: list[dict[str, Any]],
    token_stats: list[dict[str, Any]],
    splits: dict[str, Any],
    tokenizer_info: dict[str, Any],
    ids_sha: str,
) -> dict[str, Any]:
    records: Counter[str] = Counter()
    files: Counter[str] = Counter()
    read_dropped: Counter[str] = Counter()
    src_dropped: dict[str, Counter[str]] = {s.name: Counter() for s in pipe.config.sources}
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
    tok_src: dict[str, Counter[str]] = {s.name: Counter() for s in pipe.config.sources}
    for ts in token_stats:
        for src, c in ts["sources"].items():
            tok_src[src].update(c)
    for src, c in tok_src.items():
        for reason in ("exact_duplicate", "near_duplicate", tokenize_stage.SEEN_REASON):
            if c[reason]:
                src_dropped[src][f"dedup:{reason}"] += c[reason]
        if c["downweighted"]:
            src_dropped[src]["mixture:downweighted"] += c["downweighted"]
    tot: Counter[str] = Counter()
    for c in tok_src.values():
        tot.update(c)
    funnel.append({"step": "dedup", "documentsIn": tot["in"], "documentsOut": tot["out"],
                   "dropped": {k: tot[k] for k in ("exact_duplicate", "near_duplicate", tokenize_stage.SEEN_REASON)
                               if tot[k]}})
    decon_reasons = sorted({r for c in tok_src.values() for r in c
                            if r.startswith("contaminated:") or r == "empty_after_decontamination"})
    if tot["decontamination_in"]:
        gone = {r: tot[r] for r in decon_reasons if tot[r]}
        row = {"step": "decontamination_validation", "documentsIn": tot["decontamination_in"],
               "documentsOut": tot["decontamination_in"] - sum(gone.values()), "dropped": gone}
        if tot["redacted"]:
            row["changes"] = {"redacted": tot["redacted"]}
        funnel.append(row)
        for src, c in tok_src.items():
            for r in decon_reasons:
                if c[r]:
                    src_dropped[src][f"decontamination_validation:{r}"] += c[r]
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

    declared = source_receipts(pipe.config.sources, pipe.inputs, pipe.storage)
    sources = {s.name: {"domain": s.domain, "weight": s.weight, **entry([s.name]), **declared[s.name]}
               for s in pipe.config.sources}
    domains: dict[str, Any] = {}
    for domain in sorted({s.domain for s in pipe.config.sources}):
        domains[domain] = entry([s.name for s in pipe.config.sources if s.domain == domain])
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
        # what training sees: per split, the documents written and their copies (kept_ids.jsonl)
        "keptDocuments": {"train": {"documents": tot["mixture_in"] - tot["downweighted"], "copies": tot["written_train"]},
                          "validation": {"documents": tot["written_validation"], "copies": tot["written_validation"]}},
        "tokenizer": tokenizer_info,
        "config": {k: v for k, v in pipe.config.to_wire().items() if k != "output"},  # where it lives is not what it is
    }
    if pipe.config.steps.classifiers:
        data["classifiers"] = classifier_receipts(pipe, filter_stats)
    if pipe.config.steps.decontamination.sets:
        data["decontamination"] = decontamination_receipt(pipe, filter_stats, token_stats, tot)
    if pipe.config.dropped.keep:
        data["droppedSamples"] = [f"dropped/{kind}part-{p:05d}.jsonl.zst"
                                  for kind in ("", "dedup-") for p in range(pipe.num_parts)]
    return data


def classifier_receipts(pipe: PipelineState, filter_stats: list[dict[str, Any]]) -> dict[str, Any]:
    """Per classifier: threshold, action, training-data hashes and the score histogram of every part."""
    out: dict[str, Any] = {}
    for config in pipe.config.steps.classifiers:
        parts = [fs["classifiers"][config.name] for fs in filter_stats]
        counts = [sum(h) for h in zip(*(p["histogram"] for p in parts), strict=True)]
        out[config.name] = classifier.receipt(config, parts[0]["training"], counts)
    return out


def decontamination_receipt(pipe: PipelineState, filter_stats: list[dict[str, Any]],
                            token_stats: list[dict[str, Any]], tot: Counter[str]) -> dict[str, Any]:
    """ngram, action and per set: what it was built from, its n-gram hash and the documents it hit."""
    cfg = pipe.config.steps.decontamination
    loaded = next((fs["decontamination"] for fs in filter_stats if fs.get("decontamination")), None)
    hits: Counter[str] = Counter()
    for fs in filter_stats:
        hits.update((fs.get("decontamination") or {}).get("documents", {}))
    sets: dict[str, Any] = {}
    for dset in cfg.sets:
        if dset.validation:
            receipt = dict(token_stats[0].get("heldOutSet", {})) if token_stats else {}
            contaminated = tot[f"contaminated:{dset.name}"] + (tot["redacted"] if cfg.action == "redact" else 0)
            sets[dset.name] = {**receipt, "documents": contaminated, "checked": "train split (tokenize stage)"}
        else:
            receipt = dict((loaded or {}).get("sets", {}).get(dset.name, {}))
            if dset.harness_task:
                receipt["harnessTask"] = dset.harness_task
            sets[dset.name] = {**receipt, "documents": hits[dset.name], "checked": "every document (filter stage)"}
    return {"ngram": cfg.ngram, "action": cfg.action, "sets": sets}
