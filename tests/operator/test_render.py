"""crucible.operator.render: golden manifests of every example, OpenAPI validation, placement rules.

Regenerate the golden files after an intended change with
``CRUCIBLE_UPDATE_GOLDEN=1 .venv/bin/pytest tests/operator/test_render.py``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from opbuilders import make, make_pretrain_run

from crucible.api.validate import load_or_raise
from crucible.core.plan import plan
from crucible.operator.render import LABEL_ATTEMPT, LABEL_KIND, LABEL_MANAGED_BY, LABEL_RUN, render
from crucible.operator.render_cli import render_loaded, to_yaml

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden"
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
K8S_VERSION = kubernetes_validate.latest_version()
CORE_KINDS = {"ConfigMap", "Service", "Job"}


def validate(obj: dict[str, Any]) -> None:
    if obj["kind"] in CORE_KINDS:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_examples_render_validate_and_match_golden(example: Path) -> None:
    objects = render_loaded(load_or_raise([example]), storage_root="s3://crucible", uid="0c0ffee0-0000-4000-8000-000000000001")
    assert objects
    for obj in objects:
        validate(obj)
        labels = obj["metadata"]["labels"]
        assert labels[LABEL_MANAGED_BY] == "crucible"
        assert {LABEL_RUN, LABEL_KIND, LABEL_ATTEMPT} <= set(labels)
        assert obj["metadata"]["ownerReferences"][0]["controller"] is True
    text = to_yaml(objects)
    golden = GOLDEN / f"{example.stem}.yaml"
    if os.environ.get("CRUCIBLE_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert golden.exists(), f"no golden file {golden.name}; see the module docstring to create it"
    assert text == golden.read_text(), (
        f"rendering of {example.name} changed (a new spec default shows up in spec.json too); if intended, "
        "regenerate: CRUCIBLE_UPDATE_GOLDEN=1 .venv/bin/pytest tests/operator/test_render.py"
    )


QUICKSTART = sorted((REPO / "examples" / "quickstart").glob("*.yaml"))


@pytest.mark.skipif(not QUICKSTART, reason="no quickstart examples")
def test_quickstart_pipeline_renders_and_validates() -> None:
    objects = render_loaded(load_or_raise(QUICKSTART), storage_root="s3://crucible")
    kinds = {o["metadata"]["labels"][LABEL_KIND] for o in objects}
    assert kinds == {"DataPipeline", "PretrainRun", "FinetuneRun", "PreferenceRun", "QuantizeJob"}
    for obj in objects:
        validate(obj)


def job_of(resource, **kw) -> dict[str, Any]:
    rendered = render(resource, plan(resource, storage_root="/r", **kw))
    for obj in rendered.objects():
        validate(obj)
    return rendered.jobs[0]


def test_two_node_gpu_job_wiring() -> None:
    res = make_pretrain_run("llm", nodes=2, gpus=4, resources={"rdma": {"resourceName": "rdma/ib", "count": 2}})
    rendered = render(res, plan(res, storage_root="/r", attempt=3))
    job = rendered.jobs[0]
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"], spec["backoffLimit"]) == ("Indexed", 2, 2, 0)
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["subdomain"] == rendered.service["metadata"]["name"] == "llm-3"
    assert rendered.service["spec"]["clusterIP"] == "None"
    assert rendered.service["spec"]["publishNotReadyAddresses"] is True
    c = pod["containers"][0]
    assert c["command"][:7] == ["torchrun", "--nnodes=2", "--nproc-per-node=4", "--node-rank=$(JOB_COMPLETION_INDEX)",
                                "--master-addr=llm-3-0.llm-3", "--master-port=29500", "--max-restarts=0"]
    assert c["command"][7:] == ["-m", "crucible.trainer", "pretrain", "--spec", "/etc/crucible/spec.json"]
    assert c["resources"]["limits"] == {"memory": "32Gi", "nvidia.com/gpu": "4", "rdma/ib": "2"}
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
    assert pod["securityContext"]["runAsNonRoot"] is True
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["CRUCIBLE_ATTEMPT"] == "3" and env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert "NCCL_IB_DISABLE" not in env and "RANK" not in env
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}} in pod["volumes"]
    assert pod["nodeSelector"] == {"crucible.dev/node-pool": "h100"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    anti = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert anti["topologyKey"] == "kubernetes.io/hostname"
    assert anti["labelSelector"]["matchLabels"][LABEL_ATTEMPT] == "3"


def test_excluded_nodes_and_topology() -> None:
    res = make_pretrain_run(nodes=2, resources={"topology": {"key": "nvidia.com/gpu.clique", "mode": "required"}})
    pod = job_of(res, excluded_nodes=["bad-2", "bad-1"])["spec"]["template"]["spec"]
    term = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
    assert term["matchFields"] == [{"key": "metadata.name", "operator": "NotIn", "values": ["bad-1", "bad-2"]}]
    req = pod["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert req["topologyKey"] == "nvidia.com/gpu.clique"


@pytest.mark.parametrize("gang", ["none", "kueue", "volcano", "coscheduling"])
def test_gang_scheduling(gang: str) -> None:
    queue = {"queue": "team-a"} if gang in ("kueue", "volcano") else {}  # the others have no queue (refused)
    res = make_pretrain_run(nodes=3, scheduling={"gang": gang, **queue})
    rendered = render(res, plan(res, storage_root="/r"))
    job = rendered.jobs[0]
    tmpl = job["spec"]["template"]
    assert job["spec"]["suspend"] is (gang == "kueue")
    assert (job["metadata"]["labels"].get("kueue.x-k8s.io/queue-name") == "team-a") is (gang == "kueue")
    pg = rendered.pod_group
    if gang in ("volcano", "coscheduling"):
        assert pg is not None and pg["spec"]["minMember"] == 3
        assert tmpl["spec"]["schedulerName"] in ("volcano", "scheduler-plugins-scheduler")
    else:
        assert pg is None and "schedulerName" not in tmpl["spec"]
    if gang == "volcano":
        assert pg["apiVersion"] == "scheduling.volcano.sh/v1beta1" and pg["spec"]["queue"] == "team-a"
        assert tmpl["metadata"]["annotations"]["scheduling.k8s.io/group-name"] == pg["metadata"]["name"]
    if gang == "coscheduling":
        assert pg["apiVersion"] == "scheduling.x-k8s.io/v1alpha1"
        assert tmpl["metadata"]["labels"]["scheduling.x-k8s.io/pod-group"] == pg["metadata"]["name"]


def test_data_pipeline_gets_an_indexed_job_per_stage_and_quantize_one_pod() -> None:
    dp = make("DataPipeline", "corpus", workers=3)
    rendered = render(dp, plan(dp, storage_root="/r"))
    assert [j["metadata"]["name"] for j in rendered.jobs] == ["corpus-filter-0", "corpus-dedup-0", "corpus-tokenize-0"]
    assert rendered.service is None
    for j in rendered.jobs:
        validate(j)
        assert j["spec"]["completions"] == 3
        cmd = j["spec"]["template"]["spec"]["containers"][0]["command"]
        assert cmd[-4:] == ["--shard", "$(JOB_COMPLETION_INDEX)", "--num-shards", "3"]
    q = make("QuantizeJob", "q")
    qjob = job_of(q)
    assert qjob["spec"]["completions"] == 1
    env = {e["name"]: e.get("value") for e in qjob["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert (env["RANK"], env["WORLD_SIZE"]) == ("0", "1")


def test_s3_credentials_come_from_the_secret() -> None:
    res = make_pretrain_run(storage={"s3": {"credentialsSecret": "s3-creds"}})
    env = job_of(res)["spec"]["template"]["spec"]["containers"][0]["env"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env if "secretKeyRef" in e.get("valueFrom", {})}
    assert refs == {k: {"name": "s3-creds", "key": k} for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}


def test_long_names_keep_pod_hostnames_within_63() -> None:
    name = "a" * 63
    res = make_pretrain_run(name, nodes=2)
    rendered = render(res, plan(res, storage_root="/r", attempt=123))
    job = rendered.jobs[0]["metadata"]["name"]
    assert len(f"{job}-1") <= 63
    assert rendered.config_map["metadata"]["name"] != job
    for obj in rendered.objects():
        validate(obj)


def test_crucible_render_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from crucible.cli import main

    assert main(["render", str(REPO / "examples" / "pretrainrun.yaml"), "--attempt", "2", "--exclude-node", "bad"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    job = next(d for d in docs if d["kind"] == "Job")
    assert job["metadata"]["labels"][LABEL_ATTEMPT] == "2"
    assert "bad" in str(job["spec"]["template"]["spec"]["affinity"]["nodeAffinity"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("apiVersion: crucible.dev/v1alpha1\nkind: PretrainRun\nmetadata: {name: x}\nspec: {}\n")
    assert main(["render", str(broken)]) == 1
    err = capsys.readouterr().err
    assert "broken.yaml" in err and "nothing rendered" in err
