"""Revisions and their cron schedules, pure: table-driven."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from opbuilders import build, data_spec, finetune_spec, manifest, pretrain_spec

from crucible.api.common import RunStatus
from crucible.api.revisions import RevisionRecord
from crucible.api.validate import validate_document
from crucible.core import revisions as revs
from crucible.core.schedule import due, parse

T = datetime(2026, 12, 5, 10, 0, tzinfo=UTC)  # a Saturday


@pytest.mark.parametrize(("expr", "after", "fires"), [
    ("0 3 * * *", T, datetime(2026, 12, 6, 3, 0, tzinfo=UTC)),
    ("30 9 * * 1-5", T, datetime(2026, 12, 7, 9, 30, tzinfo=UTC)),  # next weekday
    ("*/15 * * * *", T, datetime(2026, 12, 5, 10, 15, tzinfo=UTC)),
    ("*/3 * * * * *", T, datetime(2026, 12, 5, 10, 0, 3, tzinfo=UTC)),  # six fields: seconds first
    ("0 0 29 2 *", T, datetime(2028, 2, 29, tzinfo=UTC)),
    ("0 0 1 * 0", T, datetime(2026, 12, 6, tzinfo=UTC)),  # day of month OR day of week, as cron
])
def test_next_fire_time(expr: str, after: datetime, fires: datetime) -> None:
    assert parse(expr).next_after(after) == fires


@pytest.mark.parametrize(("expr", "message"), [
    ("0 3 * *", "has 4 fields"), ("61 * * * *", "minute '61' is outside 0-59"),
    ("0 0 31 2 *", "never fires"), ("x * * * *", "minute 'x' is not a number"), ("*/0 * * * *", "outside"),
])
def test_bad_schedules_are_named(expr: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse(expr)


def test_due_only_after_a_fire_time_since_the_last_revision() -> None:
    last = T.timestamp()
    assert not due("0 3 * * *", last, last + 3600)
    assert due("0 3 * * *", last, datetime(2026, 12, 6, 3, 0, 1, tzinfo=UTC).timestamp())
    assert due("0 3 * * *", None, last)


def finished(*outputs: str, **status: object) -> RunStatus:
    return RunStatus(phase="Succeeded", revision=len(outputs), output_uri=outputs[-1],
                     revisions=[RevisionRecord(revision=i + 1, output_uri=o, finished_at="2026-12-05T10:00:00Z")
                                for i, o in enumerate(outputs)], **status)


def test_a_data_revision_dedups_against_every_earlier_output_with_the_first_tokenizer() -> None:
    dp = build(manifest("DataPipeline", "news", data_spec(revisions={})))
    status = revs.start(finished("s3://b/news/output", "s3://b/news/output-rev2"))
    assert status.revision == 3 and status.output_uri is None and status.phase == "Pending"
    spec = revs.for_revision(dp, status, "s3://b").spec
    assert spec.output.uri == "s3://b/ml/datapipeline/news/output-rev3"
    assert spec.steps.dedup.earlier_revisions == ["s3://b/news/output", "s3://b/news/output-rev2"]
    assert spec.tokenizer.source is not None and spec.tokenizer.source.uri == "s3://b/news/output/tokenizer"
    plain = build(manifest("DataPipeline", "news", data_spec(revisions={"dedupAgainstEarlier": False})))
    assert revs.for_revision(plain, status, "s3://b").spec.steps.dedup.earlier_revisions == []
    assert revs.for_revision(dp, RunStatus(), "s3://b") is dp  # revision 1: the run as written
    # once revision 3 is logged too, it still runs as it ran (a rerun finds its own _SUCCESS)
    done = revs.record(dp, status.model_copy(update={"phase": "Succeeded", "output_uri": "s3://b/o3"}))
    assert revs.for_revision(dp, done, "s3://b").spec == spec


def test_a_model_revision_continues_from_the_previous_model() -> None:
    pt = build(manifest("PretrainRun", "lm", pretrain_spec(data={"fromRun": {"kind": "DataPipeline", "name": "news"}},
                                                           revisions={"maxRevisions": 2})))
    spec = revs.for_revision(pt, revs.start(finished("s3://b/lm/output")), "s3://b").spec
    assert spec.model.source is not None and spec.model.source.uri == "s3://b/lm/output"
    assert spec.checkpoint.uri == "s3://b/ml/pretrainrun/lm/checkpoints-rev2"
    now = T.timestamp()
    assert revs.next_revision(pt, finished("a"), now, changed=True) == (True, "")
    assert revs.next_revision(pt, finished("a"), now, changed=False) == (False, "")
    go, why = revs.next_revision(pt, finished("a", "b"), now, changed=True)
    assert not go and "spec.revisions.maxRevisions (2) reached" in why


def test_a_schedule_not_yet_due_says_when() -> None:
    dp = build(manifest("DataPipeline", "news", data_spec(revisions={"schedule": "0 3 * * *"})))
    go, why = revs.next_revision(dp, finished("a"), datetime(2026, 12, 5, 11, tzinfo=UTC).timestamp(), changed=True)
    assert not go and "due at 2026-12-06T03:00:00Z (spec.revisions.schedule)" in why


def test_record_logs_each_revision_once() -> None:
    dp = build(manifest("DataPipeline", "news", data_spec(revisions={})))
    status = RunStatus(phase="Succeeded", output_uri="s3://b/o", completion_time="2026-12-05T10:00:00Z",
                       results={"manifestSha256": "m", "tokensTrain": 5, "dropped": {revs.SEEN_REASON: 3}})
    logged = revs.record(dp, status, "r")
    assert [r.model_dump(by_alias=True, exclude_none=True) for r in logged.revisions] == [
        {"revision": 1, "outputURI": "s3://b/o", "finishedAt": "2026-12-05T10:00:00Z", "receiptSha256": "r",
         "dataManifestSha256": "m", "newTokens": 5, "documentsSeenEarlier": 3}]
    assert revs.record(dp, logged, "r") == logged


@pytest.mark.parametrize(("kind", "spec", "field", "message"), [
    ("PretrainRun", pretrain_spec(data={"uri": "s3://d"}, revisions={}), "spec.revisions", "set data.fromRun"),
    ("DataPipeline", data_spec(revisions={"schedule": "0 25 * * *"}), "spec.revisions.schedule", "hour '25'"),
])
def test_bad_revisions_are_refused_naming_the_field(kind: str, spec: dict, field: str, message: str) -> None:
    parsed, problems = validate_document(manifest(kind, "x", spec), "x.yaml", 0, 0)
    assert parsed is None
    assert any(p.field.startswith(field) and message in p.message for p in problems), problems


def test_a_finetune_revision_following_its_dataset_continues_from_its_own_model() -> None:
    ft = build(manifest("FinetuneRun", "sft", finetune_spec(
        model={"fromRun": {"kind": "PretrainRun", "name": "lm"}}, method="full", revisions={})))
    spec = revs.for_revision(ft, revs.start(finished("s3://b/sft/output")), "s3://b").spec
    assert spec.model.from_run is None and spec.model.uri == "s3://b/sft/output"  # not the base again
    assert spec.dataset.earlier_revisions == ["s3://b/sft/output"]
    assert spec.output.uri == "s3://b/ml/finetunerun/sft/output-rev2"
    assert spec.checkpoint.uri == "s3://b/ml/finetunerun/sft/checkpoints-rev2"
    plain = build(manifest("FinetuneRun", "sft", finetune_spec(revisions={"dedupAgainstEarlier": False})))
    assert revs.for_revision(plain, revs.start(finished("s3://b/o")), "s3://b").spec.dataset.earlier_revisions == []


def test_a_finetune_revision_following_its_model_moves_only_its_output() -> None:
    ft = build(manifest("FinetuneRun", "chat", finetune_spec(
        model={"fromRun": {"kind": "PretrainRun", "name": "lm"}}, revisions={"follow": "model", "maxRevisions": 3})))
    spec = revs.for_revision(ft, revs.start(finished("s3://b/chat/output")), "s3://b").spec
    assert spec.model.from_run is not None and spec.model.from_run.name == "lm"  # the base's latest revision
    assert spec.dataset.earlier_revisions == [] and spec.output.uri.endswith("chat/output-rev2")


def test_a_finetune_revision_logs_its_dataset_and_held_out_loss() -> None:
    ft = build(manifest("FinetuneRun", "sft", finetune_spec(method="full", revisions={})))
    status = RunStatus(phase="Succeeded", output_uri="s3://b/o", completion_time="2026-12-05T10:00:00Z",
                       results={"modelURI": "s3://b/base", "datasetSha256": "d", "dataTrainedTokens": 40,
                                "dataSeenInEarlierRevision": 6, "evalLossBefore": 3.5, "evalLossAfter": 2.5})
    (entry,) = revs.record(ft, status, "r").revisions
    assert entry.model_dump(by_alias=True, exclude_none=True) == {
        "revision": 1, "outputURI": "s3://b/o", "finishedAt": "2026-12-05T10:00:00Z", "receiptSha256": "r",
        "modelURI": "s3://b/base", "dataManifestSha256": "d", "newTokens": 40, "documentsSeenEarlier": 6,
        "evalMetric": "loss", "evalBefore": 3.5, "evalAfter": 2.5}


@pytest.mark.parametrize(("spec", "field", "message"), [
    (finetune_spec(revisions={"follow": "model"}), "spec.revisions.follow", "set model.fromRun"),
    (finetune_spec(mergeAdapter=False, revisions={}), "spec.revisions.follow", "set mergeAdapter: true"),
    (finetune_spec(model={"fromRun": {"kind": "PretrainRun", "name": "lm"}},
                   revisions={"follow": "model", "dedupAgainstEarlier": False}),
     "spec.revisions.dedupAgainstEarlier", "nothing is deduplicated"),
    (finetune_spec(revisions={"follow": "base"}), "spec.revisions.follow", "'dataset' or 'model'"),
    (finetune_spec(revisions={"schedule": "0 3 * *"}), "spec.revisions.schedule", "has 4 fields"),
    (finetune_spec(revisions={"maxRevisions": 0}), "spec.revisions.maxRevisions", "must be >= 1"),
    (finetune_spec(dataset={"earlierRevisions": ["ftp://x"]}), "spec.dataset.earlierRevisions", ""),
])
def test_bad_finetune_revisions_are_refused_naming_the_field(spec: dict, field: str, message: str) -> None:
    parsed, problems = validate_document(manifest("FinetuneRun", "x", spec), "x.yaml", 0, 0)
    assert parsed is None
    assert any(p.field.startswith(field) and message in p.message for p in problems), problems
