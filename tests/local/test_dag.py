"""The DAG of a pipeline: order, selection, and the errors a user can make in fromRun."""

from __future__ import annotations

from pathlib import Path

import pytest

from crucible.local.dag import DagError, build_dag
from crucible.local.load import LoadedResource, LoadError, load_resources

from .conftest import Pipeline, data_pipeline, finetune_run, pretrain_run, quantize_job


def keys(order: list[tuple[str, str, str]]) -> list[str]:
    return [k[2] for k in order]


def load(pipeline: Pipeline, resources: list[dict]) -> list[LoadedResource]:
    pipeline.write(resources)
    return load_resources([pipeline.folder])


def test_order_follows_from_run_not_file_order(pipeline: Pipeline) -> None:
    dag = build_dag(load(pipeline, [quantize_job(), finetune_run(), pretrain_run(), data_pipeline()]))
    assert keys(dag.order()) == ["corpus", "base", "sft", "int8"]
    assert dag.upstream[("default", "FinetuneRun", "sft")] == {"model": ("default", "PretrainRun", "base")}


def test_independent_runs_keep_file_order(pipeline: Pipeline) -> None:
    resources = [data_pipeline("b-data"), data_pipeline("a-data"), pretrain_run("lm", data="a-data")]
    assert keys(build_dag(load(pipeline, resources)).order()) == ["b-data", "a-data", "lm"]


@pytest.mark.parametrize(
    ("wanted", "expected"),
    [
        ("sft", {"corpus", "base", "sft"}),
        ("corpus", {"corpus"}),
        ("int8", {"corpus", "base", "sft", "int8"}),
    ],
)
def test_with_upstream(pipeline: Pipeline, wanted: str, expected: set[str]) -> None:
    dag = build_dag(load(pipeline, [data_pipeline(), pretrain_run(), finetune_run(), quantize_job()]))
    key = next(k for k in dag.nodes if k[2] == wanted)
    assert {k[2] for k in dag.with_upstream([key])} == expected


def test_downstream_of(pipeline: Pipeline) -> None:
    dag = build_dag(load(pipeline, [data_pipeline(), pretrain_run(), finetune_run(), quantize_job()]))
    assert {k[2] for k in dag.downstream_of(("default", "PretrainRun", "base"))} == {"sft", "int8"}


def test_missing_reference_names_file_field_and_fix(pipeline: Pipeline) -> None:
    with pytest.raises(DagError) as err:
        build_dag(load(pipeline, [pretrain_run(data="nowhere")]))
    text = str(err.value)
    assert "pipeline.yaml" in text
    assert "spec.data.fromRun names DataPipeline nowhere" in text
    assert "spec.data.uri" in text


def test_cycle_is_named_in_feed_order(pipeline: Pipeline) -> None:
    # base continues from sft (model.source) while sft fine-tunes base: a cycle.
    base = pretrain_run()
    base["spec"]["model"] = {"source": {"fromRun": {"kind": "FinetuneRun", "name": "sft"}}}
    pipeline.write([data_pipeline(), base, finetune_run()])
    # The shared loader already rejects cycles; build_dag rejects them too for callers that
    # assemble resources themselves.
    with pytest.raises(LoadError, match="cycle"):
        load_resources([pipeline.folder])
    from crucible.api import KIND_MODELS

    items = [LoadedResource(KIND_MODELS[r["kind"]].model_validate(r), Path("p.yaml"), i + 1)
             for i, r in enumerate([data_pipeline(), base, finetune_run()])]
    with pytest.raises(DagError) as err:
        build_dag(items)
    text = str(err.value)
    assert "cycle" in text
    assert ("PretrainRun base -> FinetuneRun sft -> PretrainRun base" in text
            or "FinetuneRun sft -> PretrainRun base -> FinetuneRun sft" in text)


def test_duplicate_names_are_rejected(pipeline: Pipeline) -> None:
    pipeline.write([data_pipeline()], "a.yaml")
    pipeline.write([data_pipeline()], "b.yaml")
    with pytest.raises(LoadError, match="duplicate"):
        load_resources([pipeline.folder])


def test_invalid_field_is_reported_with_file_and_dotted_path(pipeline: Pipeline) -> None:
    bad = pretrain_run()
    bad["spec"]["training"]["maxSteps"] = 0
    pipeline.write([data_pipeline(), bad])
    with pytest.raises(LoadError) as err:
        load_resources([pipeline.folder])
    assert "pipeline.yaml" in str(err.value)
    assert "training.maxSteps" in str(err.value)
