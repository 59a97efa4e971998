"""Revisions (``spec.revisions``), the same for both backends (pure).

    for_revision(run, status, storage_root) -> Resource       # the run as its current revision runs it
    next_revision(run, status, now, changed) -> (start?, why not)
    start(status) -> RunStatus                                  # the status of the next revision, not yet started
    record(run, status, receipt_sha256) -> RunStatus            # the finished revision logged in status.revisions

Revision 1 is the run as written. Revision k > 1 writes to ``<output>-rev<k>`` (and checkpoints to
``<checkpoints>-rev<k>``, so it never resumes from the previous revision's state). A DataPipeline's
revision deduplicates against every earlier revision's output (``steps.dedup.earlierRevisions``) and
tokenizes with revision 1's tokenizer, so the token ids of every revision mean the same; a
PretrainRun's revision continues from the previous revision's model (``model.source``). A
FinetuneRun's revision either continues from the previous revision's model on the records no
earlier revision trained on (``follow: dataset``: ``model.uri``, ``dataset.earlierRevisions``) or
fine-tunes the latest output of ``model.fromRun`` (``follow: model``: only the output moves).

When a revision is due: the backend says whether anything ``changed`` (embedded mode: the run's
fingerprint — its sources or its input receipts; the operator: a DataPipeline's or a follow-dataset
FinetuneRun's schedule fired (the sources are read again), a PretrainRun's DataPipeline has a data
manifest it has not trained on, a follow-model FinetuneRun's ``model.fromRun`` has an output the
last revision did not start from), and the schedule, if any, must have fired since the last
revision finished.
"""

from __future__ import annotations

import time
from typing import Any

from crucible.api.common import Resource, RunStatus
from crucible.api.revisions import RevisionRecord
from crucible.core.plan import default_checkpoint_uri, default_output_uri
from crucible.core.schedule import due, next_fire
from crucible.core.status import parse_time, rfc3339
from crucible.trainer.config.training import SHAPE_FIELDS, ModelConfig

_SHAPE_WIRE = frozenset(ModelConfig.model_fields[f].alias or f for f in SHAPE_FIELDS)
SEEN_REASON = "dedup:seen_in_earlier_revision"


def enabled(run: Resource) -> bool:
    return getattr(run.spec, "revisions", None) is not None


def revision_uri(base: str, revision: int) -> str:
    return base if revision <= 1 else f"{base.rstrip('/')}-rev{revision}"


def for_revision(run: Resource, status: RunStatus, storage_root: str) -> Resource:
    """The resource as its current revision (``status.revision``) runs it; revision 1 is the run as written."""
    revision = status.revision or 1
    if not enabled(run) or revision <= 1:
        return run
    earlier = [r.output_uri for r in status.revisions if r.output_uri and r.revision < revision]
    if not earlier:
        return run
    wire = run.model_dump(mode="json", by_alias=True, exclude_none=True)
    wire.pop("status", None)
    spec: dict[str, Any] = wire["spec"]
    namespace = run.metadata.namespace or "default"
    output = (spec.get("output") or {}).get("uri") or default_output_uri(storage_root, namespace, run.kind, run.name)
    spec.setdefault("output", {})["uri"] = revision_uri(output, revision)
    if "checkpoint" in type(run.spec).model_fields:
        checkpoint = (spec.get("checkpoint") or {}).get("uri") or default_checkpoint_uri(
            storage_root, namespace, run.kind, run.name)
        spec.setdefault("checkpoint", {})["uri"] = revision_uri(checkpoint, revision)
    if run.kind == "DataPipeline":
        if spec["revisions"].get("dedupAgainstEarlier", True):
            spec.setdefault("steps", {}).setdefault("dedup", {})["earlierRevisions"] = earlier
        tokenizer = spec.setdefault("tokenizer", {})
        if not tokenizer.get("source"):
            tokenizer["source"] = {"uri": f"{earlier[0].rstrip('/')}/tokenizer"}
    elif run.kind == "PretrainRun":
        model = {k: v for k, v in spec.get("model", {}).items() if k not in _SHAPE_WIRE}
        model["source"] = {"uri": earlier[-1]}
        spec["model"] = model
    elif follows_dataset(run):
        spec["model"] = {"uri": earlier[-1]}
        if spec["revisions"].get("dedupAgainstEarlier", True):
            spec["dataset"]["earlierRevisions"] = earlier
    return type(run).model_validate(wire)


def follow(run: Resource) -> str | None:
    """``spec.revisions.follow`` of a kind whose revisions choose what they follow (a FinetuneRun's
    ``dataset`` or ``model``), else None: the kind's own module says so through its model, not here."""
    value = getattr(getattr(run.spec, "revisions", None), "follow", None)
    return value if isinstance(value, str) else None


def follows_dataset(run: Resource) -> bool:
    """Revisions that continue from their own previous one on new records (not a new base)."""
    return follow(run) == "dataset"


def follows_model(run: Resource) -> bool:
    """Revisions that fine-tune each new output of ``model.fromRun`` (a new base model)."""
    return follow(run) == "model"


def next_revision(run: Resource, status: RunStatus, now: float, changed: bool) -> tuple[bool, str]:
    """Whether the next revision starts now; when not, why (empty: nothing to say)."""
    if not enabled(run) or not status.revisions or status.phase not in ("Succeeded", "Failed"):
        return False, ""
    if not changed:
        return False, ""
    limit = getattr(run.spec.revisions, "max_revisions", None)
    if limit is not None and len(status.revisions) >= limit:
        return False, f"spec.revisions.maxRevisions ({limit}) reached; raise it to train the new data"
    schedule = getattr(run.spec.revisions, "schedule", None)
    last = parse_time(status.revisions[-1].finished_at)
    if schedule and not due(schedule, last, now):
        return False, f"the next revision is due at {next_fire(schedule, last or now)} (spec.revisions.schedule)"
    return True, ""


def start(status: RunStatus) -> RunStatus:
    """A fresh status for the next revision: the log and the attempt counter carry over."""
    return RunStatus(attempt=status.attempt + 1, revision=len(status.revisions) + 1, revisions=list(status.revisions),
                     observed_generation=status.observed_generation)


def record(run: Resource, status: RunStatus, receipt_sha256: str | None = None, now: float | None = None) -> RunStatus:
    """``status`` with its finished revision appended to ``status.revisions`` (once)."""
    revision = status.revision or 1
    if not enabled(run) or status.phase != "Succeeded" or any(r.revision == revision for r in status.revisions):
        return status
    results = status.results
    if run.kind == "DataPipeline":
        dropped = results.get("dropped") or {}
        entry = RevisionRecord(revision=revision, data_manifest_sha256=results.get("manifestSha256"),
                               new_tokens=results.get("tokensTrain"),
                               documents_seen_earlier=int(dropped.get(SEEN_REASON, 0)))
    elif follow(run) is not None:  # a fine-tune revision: its model, its dataset, held-out loss
        entry = RevisionRecord(revision=revision, model_uri=results.get("modelURI"),
                               data_manifest_sha256=results.get("datasetSha256"),
                               new_tokens=results.get("dataTrainedTokens"),
                               documents_seen_earlier=results.get("dataSeenInEarlierRevision"), eval_metric="loss",
                               eval_before=results.get("evalLossBefore"), eval_after=results.get("evalLossAfter"))
    else:
        entry = RevisionRecord(revision=revision, data_manifest_sha256=results.get("dataManifestSha256"),
                               new_tokens=results.get("dataTokens"), eval_metric="perplexity",
                               eval_before=results.get("perplexityBefore"), eval_after=results.get("perplexity"))
    entry.output_uri = status.output_uri
    entry.finished_at = status.completion_time or rfc3339(now if now is not None else time.time())
    entry.receipt_sha256 = receipt_sha256
    return status.model_copy(update={"revision": revision, "revisions": [*status.revisions, entry]})
