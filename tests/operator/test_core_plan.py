"""crucible.core.plan: resource -> LaunchPlan, table-driven over the five kinds."""

from __future__ import annotations

import pytest
from opbuilders import make, make_pretrain_run

from crucible.core.plan import SHARD_PLACEHOLDER, MissingInputError, PlanError, plan

ROOT = "s3://crucible/runs"


@pytest.mark.parametrize(
    ("kind", "stage", "role", "checkpoints"),
    [
        ("DataPipeline", "data", "data", False),
        ("PretrainRun", "pretrain", "trainer", True),
        ("FinetuneRun", "finetune", "trainer", True),
        ("PreferenceRun", "preference", "trainer", True),
        ("QuantizeJob", "quantize", "quantize", False),
    ],
)
def test_every_kind_gets_its_stage_command_and_uris(kind: str, stage: str, role: str, checkpoints: bool) -> None:
    p = plan(make(kind, "r1"), storage_root=ROOT + "/", attempt=3, restarts=2, run_started=1700000000.9)
    assert p.stage == stage
    assert [r.name for r in p.roles] == [role]
    assert p.roles[0].command[:6] == ("python", "-m", "crucible.trainer", stage, "--spec", "/etc/crucible/spec.json")
    assert p.output_uri == f"{ROOT}/ml/{kind.lower()}/r1/output"
    assert p.spec["output"]["uri"] == p.output_uri
    if checkpoints:
        assert p.checkpoint_uri == f"{ROOT}/ml/{kind.lower()}/r1/checkpoints"
        assert p.spec["checkpoint"]["uri"] == p.checkpoint_uri
    else:
        assert p.checkpoint_uri is None
        assert "checkpoint" not in p.spec
    assert p.env["CRUCIBLE_RUN"] == "r1"
    assert p.env["CRUCIBLE_KIND"] == kind
    assert p.env["CRUCIBLE_ATTEMPT"] == "3"
    assert p.env["CRUCIBLE_RESTARTS"] == "2"
    assert p.env["CRUCIBLE_RUN_STARTED"] == "1700000000"


def test_user_uris_win_over_the_storage_root() -> None:
    r = make_pretrain_run(output={"uri": "/pvc/out"}, checkpoint={"uri": "/pvc/ckpt"})
    p = plan(r, storage_root=ROOT)
    assert (p.output_uri, p.checkpoint_uri) == ("/pvc/out", "/pvc/ckpt")


@pytest.mark.parametrize(
    ("nodes", "gpus", "procs", "world", "distributed"),
    [(1, 0, 1, 1, False), (2, 0, 1, 2, True), (4, 8, 8, 32, True), (1, 8, 8, 8, True)],
)
def test_training_role_shape(nodes: int, gpus: int, procs: int, world: int, distributed: bool) -> None:
    p = plan(make_pretrain_run(nodes=nodes, gpus=gpus), storage_root=ROOT)
    (role,) = p.roles
    assert (role.replicas, role.procs_per_node, role.gpus_per_node) == (nodes, procs, gpus)
    assert role.world_size == world
    assert role.distributed is distributed
    assert p.nodes == nodes


def test_from_run_is_resolved_and_missing_inputs_name_the_field() -> None:
    r = make_pretrain_run(data={"fromRun": {"kind": "DataPipeline", "name": "corpus"}})
    with pytest.raises(MissingInputError, match=r"spec\.data\.fromRun \(DataPipeline corpus\)"):
        plan(r, storage_root=ROOT)
    p = plan(r, storage_root=ROOT, inputs={"data": "s3://x/dp/output"})
    assert p.spec["data"] == {"uri": "s3://x/dp/output"}
    # the resource itself is untouched
    assert r.spec.data.from_run is not None


def test_nested_from_run_paths() -> None:
    q = make("QuantizeJob", "q", model={"fromRun": {"kind": "PreferenceRun", "name": "dpo"}},
             evaluation={"data": {"fromRun": {"kind": "DataPipeline", "name": "dp"}}})
    p = plan(q, storage_root=ROOT, inputs={"model": "/m", "evaluation.data": "/d"})
    assert p.spec["model"] == {"uri": "/m"}
    assert p.spec["evaluation"]["data"] == {"uri": "/d"}


def test_data_pipeline_with_workers_runs_three_sharded_stages() -> None:
    p = plan(make("DataPipeline", "dp", workers=4), storage_root=ROOT)
    assert [r.name for r in p.roles] == ["filter", "dedup", "tokenize"]
    for role in p.roles:
        assert role.replicas == 4 and role.sharded and not role.distributed
        assert role.command_for(2)[-4:] == ("--shard", "2", "--num-shards", "4")
        assert SHARD_PLACEHOLDER in role.command


def test_env_carries_user_env_s3_and_excluded_nodes_are_sorted_unique() -> None:
    r = make_pretrain_run(resources={"env": {"NCCL_DEBUG": "INFO"}},
                          storage={"s3": {"endpointUrl": "http://minio:9000", "region": "eu-1",
                                          "credentialsSecret": "s3-creds"}})
    p = plan(r, storage_root=ROOT, excluded_nodes=["n2", "n1", "n2"])
    assert p.env["NCCL_DEBUG"] == "INFO"
    assert p.env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert p.env["AWS_DEFAULT_REGION"] == "eu-1"
    assert p.credentials_secret == "s3-creds"
    assert p.excluded_nodes == ("n1", "n2")
    assert p.hang_timeout_seconds == 10


def test_namespace_defaults_and_empty_root_is_an_error() -> None:
    p = plan(make_pretrain_run(namespace=None), storage_root="/work")
    assert p.output_uri == "/work/default/pretrainrun/pt/output"
    with pytest.raises(PlanError, match="storage root is empty"):
        plan(make_pretrain_run(), storage_root="")


@pytest.mark.parametrize("kind", ["PretrainRun", "FinetuneRun", "PreferenceRun", "QuantizeJob", "DataPipeline"])
@pytest.mark.parametrize("method", [None, "full"])
def test_the_planned_spec_is_what_the_stage_accepts(kind: str, method: str | None) -> None:
    """The spec a pod reads (every default written out) parses in the trainer: a FinetuneRun with
    ``method: full`` once failed in both backends, its default ``lora`` read as set by the user."""
    from crucible.trainer.config import parse_stage_spec
    from crucible.trainer.config.stages import KIND_TO_STAGE

    if method and kind != "FinetuneRun":
        pytest.skip("method: full is a FinetuneRun setting")
    resource = make(kind, "r", **({"method": method} if method else {}))
    p = plan(resource, storage_root="s3://b/root", inputs={"data": "s3://d", "model": "s3://m"})
    parse_stage_spec(KIND_TO_STAGE[kind], dict(p.spec))
