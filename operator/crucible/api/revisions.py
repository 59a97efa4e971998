"""``spec.revisions`` and ``status.revisions``: a model refreshed on new data, every update logged.

A DataPipeline with ``revisions`` keeps each run's output as a revision instead of replacing it,
and deduplicates the documents of a new revision against those the earlier ones kept. A PretrainRun
with ``revisions`` trains each new revision of its DataPipeline, continuing from its own previous
revision's model. A FinetuneRun with ``revisions`` either continues from its own previous revision on
the records of its dataset no earlier revision saw (``follow: dataset``), or fine-tunes each new
revision of the run in ``model.fromRun`` (``follow: model``). ``status.revisions`` lists each (number, output, receipt hash, data manifest hash,
new tokens, evaluation before and after). The logic is :mod:`crucible.core.revisions`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from crucible.trainer.config.common import StrictModel


def _check_schedule(value: str | None) -> str | None:
    if value is None:
        return value
    from crucible.core.schedule import parse

    parse(value)
    return value


class DataRevisions(StrictModel):
    """A DataPipeline whose every run is a new revision of its output."""

    schedule: str | None = Field(
        default=None,
        description="Cron (UTC; 5 fields, or 6 with seconds first) of when a new revision is due. On the cluster "
                    "the operator starts one at each fire time (the sources are read again); in embedded mode "
                    "crucible run starts one when the sources changed and the schedule fired since the last one. "
                    "Empty: embedded mode only, at each crucible run that finds the sources changed.",
    )
    dedup_against_earlier: bool = Field(
        default=True,
        description="Drop the documents an earlier revision kept (steps.dedup.earlierRevisions is filled in), so "
                    "a document is trained on in one revision only; false: each revision keeps every document.",
    )

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str | None) -> str | None:
        return _check_schedule(value)


class TrainingRevisions(StrictModel):
    """A PretrainRun that trains each new revision of its DataPipeline (data.fromRun) in turn."""

    max_revisions: int | None = Field(
        default=None, ge=1, le=100000,
        description="Stop after this many revisions (the first run counts); empty: no limit.",
    )


class FinetuneRevisions(StrictModel):
    """A FinetuneRun refreshed on new instruction data, or on each new revision of its base model."""

    follow: Literal["dataset", "model"] = Field(
        default="dataset",
        description="What makes a revision. dataset: the records of spec.dataset changed; the revision continues "
                    "from the previous revision's model on the records no earlier revision saw. model: the run in "
                    "model.fromRun (a PretrainRun or FinetuneRun with revisions) has a new output; the revision "
                    "fine-tunes it on the whole dataset.",
    )
    schedule: str | None = Field(
        default=None,
        description="Cron (UTC; 5 fields, or 6 with seconds first): no revision starts before it fires after the "
                    "last one. follow dataset on the cluster: the operator starts one at each fire time (the "
                    "dataset is read again); empty: embedded mode only, at each crucible run that finds the "
                    "dataset changed.",
    )
    dedup_against_earlier: bool = Field(
        default=True,
        description="follow dataset: train only on records no earlier revision saw (spec.dataset.earlierRevisions "
                    "is filled in); false: each revision trains on every record.",
    )
    max_revisions: int | None = Field(
        default=None, ge=1, le=100000,
        description="Stop after this many revisions (the first run counts); empty: no limit.",
    )

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str | None) -> str | None:
        return _check_schedule(value)

    @model_validator(mode="after")
    def _dedup_follows_the_dataset(self) -> FinetuneRevisions:
        # the backends send the whole spec (defaults included): only the non-default value conflicts
        if self.follow == "model" and not self.dedup_against_earlier:
            raise ValueError("dedupAgainstEarlier: with follow: model each revision fine-tunes a new base model on "
                             "the whole dataset, so nothing is deduplicated; remove it or use follow: dataset")
        return self


class RevisionRecord(BaseModel):
    """One logged revision: what it read and what came of it."""

    model_config = ConfigDict(populate_by_name=True, alias_generator=to_camel, extra="forbid")

    revision: int = Field(ge=1, description="1 for the first run, then 2, 3, ...")
    output_uri: str | None = Field(default=None, alias="outputURI", description="This revision's output.")
    finished_at: str | None = Field(default=None, description="When it succeeded.")
    receipt_sha256: str | None = Field(default=None, description="sha256 of its _SUCCESS (where the backend can read it).")
    model_uri: str | None = Field(
        default=None, alias="modelURI", description="FinetuneRun: the model it started from (its base, or the "
                                                    "previous revision's output).",
    )
    data_manifest_sha256: str | None = Field(
        default=None, description="sha256 of the data manifest it made or read (FinetuneRun: of its dataset)."
    )
    new_tokens: int | None = Field(default=None, description="Training tokens new in this revision's data.")
    documents_seen_earlier: int | None = Field(
        default=None, description="DataPipeline: documents dropped because an earlier revision kept them; "
                                  "FinetuneRun: records dropped because an earlier revision trained on them."
    )
    eval_metric: str | None = Field(
        default=None, description="What evalBefore and evalAfter are: perplexity (PretrainRun) or loss (FinetuneRun), "
                                  "on the held-out split of this revision's data."
    )
    eval_before: float | None = Field(default=None, description="Held-out evalMetric of the model it started from.")
    eval_after: float | None = Field(default=None, description="Held-out evalMetric after training.")
