"""The Helm chart, linted and rendered by Helm's own Go code (helm-python-sdk), every object checked
against the Kubernetes OpenAPI schemas (kubernetes-validate) and the Prometheus Operator's CRD
models (cloudcoil-models-prometheus-operator)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from deploylib import (
    CHART,
    MONITORING_ON,
    NAMESPACE,
    REPO,
    VALUE_CASES,
    Yaml12Loader,
    find,
    one,
    render,
    render_objects,
)

from waits import scaled

# The chart's kubeVersion floor and the newest schemas kubernetes-validate ships.
KUBE_VERSIONS = ["1.28", kubernetes_validate.utils.latest_version()]
MONITORING_GROUP = "monitoring.coreos.com/v1"
CRUCIBLE_PLURALS = ["datapipelines", "finetuneruns", "preferenceruns", "pretrainruns", "quantizejobs"]


# --- lint -------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(VALUE_CASES))
def test_helm_lint_is_clean_in_strict_mode(case: str) -> None:
    report = helm.lint(str(CHART), VALUE_CASES[case], strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], f"helm lint ({case}): {report}"


def test_chart_metadata_names_a_kube_version_floor_the_templates_need() -> None:
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2"
    assert meta["kubeVersion"].startswith(">=1.28"), (
        "the CRDs use x-kubernetes-validations fieldPath and the PodMonitor the pod index label: both 1.28+"
    )


# --- values.schema.json -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"replicaCount": 2}, "/replicaCount"),
        ({"metrics": {"prot": 9090}}, "prot"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"image": {"digest": "latest"}}, "/image/digest"),
        ({"operator": {"storageRoot": "gs://bucket/x"}}, "/operator/storageRoot"),
        ({"operator": {"logLevel": "trace"}}, "/operator/logLevel"),
        ({"operator": {"watchNamespaces": ["Team_A"]}}, "/operator/watchNamespaces/0"),
        ({"prometheusRule": {"alerts": {"lossSpike": {"window": "30 minutes"}}}}, "/prometheusRule/alerts/lossSpike/window"),
        ({"prometheusRule": {"alerts": {"lossSpike": {"ratio": 0.9}}}}, "/prometheusRule/alerts/lossSpike/ratio"),
        ({"prometheusRule": {"alerts": {"throughputCollapse": {"ratio": 1.5}}}}, "/prometheusRule/alerts/throughputCollapse/ratio"),
        ({"prometheusRule": {"alerts": {"runFailed": {"severity": "page"}}}}, "/prometheusRule/alerts/runFailed/severity"),
        ({"trainerMetrics": {"podMonitor": {"interval": "fast"}}}, "/trainerMetrics/podMonitor/interval"),
        ({"health": {"port": 70000}}, "/health/port"),
    ],
)
def test_values_schema_rejects_mistakes_naming_the_field(values: dict[str, Any], where: str) -> None:
    with helm.Chart.load(str(CHART)) as chart, pytest.raises(helm.HelmValuesError) as err:
        chart.validate_schema(values)
    assert where in str(err.value)


def test_values_schema_accepts_every_default_and_every_case() -> None:
    with helm.Chart.load(str(CHART)) as chart:
        for values in VALUE_CASES.values():
            chart.validate_schema(values)
        schema = chart.schema
    assert schema is not None

    def undocumented(node: dict[str, Any], path: str) -> list[str]:
        missing = []
        for key, sub in node.get("properties", {}).items():
            if "description" not in sub:
                missing.append(f"{path}.{key}")
            missing += undocumented(sub, f"{path}.{key}")
        return missing

    assert undocumented(schema, "") == []
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())

    def unknown(values: dict[str, Any], node: dict[str, Any], path: str) -> list[str]:
        out = []
        for key, value in values.items():
            sub = node.get("properties", {}).get(key)
            if sub is None:
                out.append(f"{path}.{key}")
            elif isinstance(value, dict) and "properties" in sub:
                out += unknown(value, sub, f"{path}.{key}")
        return out

    assert unknown(defaults, schema, "") == [], "values.yaml keys the schema does not describe"


# --- every object valid against Kubernetes ------------------------------------------------------


def _validate_monitoring(obj: dict[str, Any]) -> None:
    from cloudcoil.models.prometheus_operator import v1

    model = getattr(v1, obj["kind"])
    parsed = model.model_validate(obj)
    # The models ignore unknown fields: a field that does not survive the round trip is a typo.
    assert _strip_none(parsed.model_dump(by_alias=True, exclude_unset=True, mode="json")) == obj


def _strip_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_none(v) for v in value]
    return value


@pytest.mark.parametrize("case", sorted(VALUE_CASES))
def test_every_rendered_object_is_valid_kubernetes(case: str) -> None:
    objects = render_objects(VALUE_CASES[case])
    assert objects
    kinds = set()
    for obj in objects:
        kinds.add(obj["kind"])
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["apiVersion"] == MONITORING_GROUP:
            _validate_monitoring(obj)
            continue
        if obj["apiVersion"] == "kopf.dev/v1":
            # Kopf's own peering kinds: only the CRDs the chart ships define them.
            assert obj["kind"] in ("ClusterKopfPeering", "KopfPeering") and not obj.get("spec"), name
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                pytest.fail(f"{case}: {name} invalid for Kubernetes {version} at {path}: {exc.message}")
        if obj["kind"] not in ("ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "ClusterKopfPeering"):
            assert obj["metadata"].get("namespace"), f"{name} has no namespace"
    assert {"Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding"} <= kinds


def test_monitoring_objects_are_rendered_only_when_asked_for() -> None:
    default_kinds = {o["kind"] for o in render_objects({})}
    assert not {"ServiceMonitor", "PodMonitor", "PrometheusRule"} & default_kinds
    assert {"ConfigMap", "Service"} <= default_kinds  # dashboard and metrics Service need no CRDs
    on = render_objects(MONITORING_ON)
    assert {o["kind"] for o in on if o["apiVersion"] == MONITORING_GROUP} == {
        "ServiceMonitor",
        "PodMonitor",
        "PrometheusRule",
    }
    off = render_objects(VALUE_CASES["monitoring-off"])
    assert not find(off, "ConfigMap") and not find(off, "Service")


def test_a_service_monitor_without_its_service_is_refused_with_the_fix() -> None:
    with pytest.raises(helm.HelmError, match=r"metrics.serviceMonitor.enabled needs metrics.service.enabled"):
        render({"metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}}})


# --- CRDs ---------------------------------------------------------------------------------------


def _repo_crds() -> dict[str, dict[str, Any]]:
    crds = {}
    for path in sorted((REPO / "crds").glob("*.yaml")):
        for doc in yaml.load_all(path.read_text(), Loader=Yaml12Loader):
            if doc:
                crds[doc["metadata"]["name"]] = doc
    return crds


def test_chart_crds_are_the_generated_crds() -> None:
    link = CHART / "files" / "crds"
    assert link.is_symlink() and link.resolve() == (REPO / "crds").resolve(), (
        "charts/crucible/files/crds must be a link to the repository's crds/ (generated by `crucible crds`)"
    )
    repo = _repo_crds()
    assert sorted(repo) == sorted(f"{p}.crucible.dev" for p in CRUCIBLE_PLURALS)
    rendered = {
        o["metadata"]["name"]: o for o in find(render_objects({}), "CustomResourceDefinition") if o["spec"]["group"] == "crucible.dev"
    }
    assert sorted(rendered) == sorted(repo)
    for name, crd in rendered.items():
        meta = crd["metadata"]
        assert meta["annotations"]["helm.sh/resource-policy"] == "keep", name
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "Helm", name
        expected = dict(repo[name])
        ours = {**crd, "metadata": {k: v for k, v in meta.items() if k not in ("labels", "annotations")}}
        theirs = {**expected, "metadata": {k: v for k, v in expected["metadata"].items() if k not in ("labels", "annotations")}}
        assert _same_json(ours, theirs), f"{name}: the chart renders a different CRD than crds/"


def _same_json(rendered: Any, source: Any) -> bool:
    """Equal as JSON values. 1.0 may come back as 1 (JSON has one number type), but an integer must
    not come back a float: int64 fields of a CRD schema (maxLength, minItems) reject 1e+05."""
    if isinstance(source, dict):
        return isinstance(rendered, dict) and rendered.keys() == source.keys() and all(
            _same_json(rendered[k], source[k]) for k in source
        )
    if isinstance(source, list):
        return isinstance(rendered, list) and len(rendered) == len(source) and all(
            _same_json(r, s) for r, s in zip(rendered, source, strict=True)
        )
    if isinstance(source, int) and not isinstance(source, bool):
        return type(rendered) is int and rendered == source
    return bool(rendered == source)


def test_crds_can_be_left_to_another_installer_and_released_on_uninstall() -> None:
    assert not [o for o in render_objects({"crds": {"install": False}}) if o["kind"] == "CustomResourceDefinition"
                and o["spec"]["group"] == "crucible.dev"]
    for crd in find(render_objects({"crds": {"keep": False}}), "CustomResourceDefinition"):
        assert "helm.sh/resource-policy" not in crd["metadata"].get("annotations", {})


# --- operator Deployment ------------------------------------------------------------------------


def _container(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    deploy = one(render_objects(values), "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return deploy, container


def test_operator_runs_as_one_active_non_root_replica_on_a_read_only_root() -> None:
    deploy, c = _container({})
    spec = deploy["spec"]
    pod = spec["template"]["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    assert c["command"] == ["crucible", "operator"]
    assert "--all-namespaces" in c["args"]
    assert "--peering=crucible" in c["args"] and "--priority=100" in c["args"]
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]


def test_probes_hit_kopfs_liveness_endpoint_on_the_port_the_operator_is_told() -> None:
    _, c = _container({"health": {"port": 8111}})
    assert "--liveness=http://0.0.0.0:8111/healthz" in c["args"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["health"] == 8111
    for probe in (c["livenessProbe"], c["readinessProbe"]):
        assert probe["httpGet"] == {"path": "/healthz", "port": "health"}


def test_overrides_reach_the_operator_container() -> None:
    values = VALUE_CASES["overrides"]
    deploy, c = _container(values)
    assert deploy["metadata"]["name"] == "ml-operator"
    assert c["image"] == "registry.example.com/ml/crucible-operator:1.2.3@sha256:" + "ab" * 32
    assert c["imagePullPolicy"] == "Always"
    assert c["resources"] == values["resources"]
    args = c["args"]
    assert "--namespace=ml-team-a" in args and "--namespace=ml-team-b" in args and "--all-namespaces" not in args
    assert "--debug" in args
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["CRUCIBLE_TRAINER_IMAGE"] == "registry.example.com/ml/crucible-trainer:1.2.3-cu128"
    assert env["CRUCIBLE_STORAGE_ROOT"] == "s3://ml-artifacts/crucible"
    assert env["CRUCIBLE_STORAGE_SECRET"] == "crucible-s3"
    assert env["AWS_ENDPOINT_URL"] == "http://minio.storage:9000"
    pod = deploy["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    # Namespaced peering: one KopfPeering per watched namespace instead of the cluster one.
    peerings = find(render_objects(values), "KopfPeering")
    assert sorted(p["metadata"]["namespace"] for p in peerings) == ["ml-team-a", "ml-team-b"]
    assert not find(render_objects(values), "ClusterKopfPeering")


def test_default_image_tags_follow_the_chart_app_version() -> None:
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    _, c = _container({})
    assert c["image"].endswith(f":{app_version}")
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["CRUCIBLE_TRAINER_IMAGE"].endswith(f":{app_version}")


def test_default_trainer_image_is_the_operators_own_default() -> None:
    """`crucible operator` run by hand and the chart's operator put the same image in training pods."""
    from crucible.operator.render import DEFAULT_IMAGE

    _, c = _container({})
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["CRUCIBLE_TRAINER_IMAGE"] == DEFAULT_IMAGE


def test_peering_off_runs_standalone_without_peering_objects() -> None:
    objects = render_objects(VALUE_CASES["no-peering-no-crds"])
    _, c = _container(VALUE_CASES["no-peering-no-crds"])
    assert "--standalone" in c["args"] and not any(a.startswith("--peering") for a in c["args"])
    assert not [o for o in objects if o["apiVersion"] == "kopf.dev/v1" or o["kind"] == "CustomResourceDefinition"]


def _chart_crds_folder() -> list[dict[str, Any]]:
    """Objects of the chart's crds/ folder: Helm installs them before it renders the templates."""
    with helm.Chart.load(str(CHART)) as chart:
        return [doc for item in chart.crds for doc in yaml.load_all(item["data"], Loader=Yaml12Loader) if doc]


def test_default_install_creates_kopfs_peering_crds_and_the_cluster_peering() -> None:
    folder = _chart_crds_folder()
    assert {c["metadata"]["name"] for c in folder} == {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}
    for crd in folder:
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(crd, version, strict=True)
    assert one(render_objects({}), "ClusterKopfPeering")["metadata"]["name"] == "crucible"


def test_no_template_creates_an_object_of_a_crd_the_same_templates_create() -> None:
    """Helm maps every template to an API before it creates any: a CRD and its first object cannot
    share one install unless the CRD comes from crds/ (or, for monitoring, from the Prometheus Operator)."""
    folder_kinds = {(c["spec"]["group"], c["spec"]["names"]["kind"]) for c in _chart_crds_folder()}
    for case, values in VALUE_CASES.items():
        objects = render_objects(values)
        template_crds = {(c["spec"]["group"], c["spec"]["names"]["kind"]) for c in find(objects, "CustomResourceDefinition")}
        for obj in objects:
            group = obj["apiVersion"].rpartition("/")[0]
            if "." not in group or group.endswith(".k8s.io") or group == MONITORING_GROUP.split("/")[0]:
                continue  # built-in APIs, and Prometheus Operator kinds (their CRDs predate the chart)
            key = (group, obj["kind"])
            assert key not in template_crds, f"{case}: {obj['kind']} and its CRD are both templates"
            assert key in folder_kinds, f"{case}: {obj['kind']} needs its CRD in the chart's crds/ folder"


# --- RBAC ---------------------------------------------------------------------------------------


def _normalise(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """Rules as (apiGroup, resource, verb) triples, so grouping and order do not matter."""
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule.get("apiGroups", [])
        for resource in rule.get("resources", [])
        for verb in rule.get("verbs", [])
    }


def _chart_rules() -> list[dict[str, Any]]:
    return one(render_objects({}), "ClusterRole")["rules"]


def test_cluster_role_has_no_wildcards_and_no_secrets() -> None:
    for case, values in VALUE_CASES.items():
        for role in find(render_objects(values), "ClusterRole") + find(render_objects(values), "Role"):
            granted = _normalise(role["rules"])
            assert granted, f"{case}: empty {role['kind']}"
            assert not [t for t in granted if "*" in t], f"{case}: wildcards in a {role['kind']}"
            assert not [t for t in granted if t[1] == "secrets"], "the operator passes Secret names, never reads them"
    triples = _normalise(_chart_rules())
    for plural in CRUCIBLE_PLURALS:
        assert ("crucible.dev", f"{plural}/status", "patch") in triples
        assert ("crucible.dev", plural, "watch") in triples


PEERING = {
    kind: {("kopf.dev", kind, verb) for verb in ("get", "list", "watch", "patch")}
    for kind in ("clusterkopfpeerings", "kopfpeerings")
}


def test_rbac_is_exactly_what_the_operator_declares_in_both_modes() -> None:
    """crucible.operator.rbac.RULES lists both peering kinds; a cluster-wide operator uses only
    ClusterKopfPeerings and one limited to namespaces only KopfPeerings, so each mode grants one."""
    rbac = pytest.importorskip("crucible.operator.rbac", reason="crucible.operator.rbac has not landed yet")
    declared = _normalise(rbac.RULES)
    cluster_wide = _normalise(_chart_rules())
    expected = declared - PEERING["kopfpeerings"]
    assert cluster_wide == expected, (
        f"chart grants more than the operator uses: {sorted(cluster_wide - expected)}; "
        f"chart lacks: {sorted(expected - cluster_wide)}"
    )
    objects = render_objects({"operator": {"watchNamespaces": ["ml-team-a"]}})
    limited = _normalise(one(objects, "ClusterRole")["rules"]) | _normalise(one(objects, "Role")["rules"])
    assert limited == declared - PEERING["clusterkopfpeerings"]


def test_operator_limited_to_namespaces_gets_roles_there_and_only_cluster_scoped_rules_cluster_wide() -> None:
    namespaces = ["ml-team-a", "ml-team-b"]
    objects = render_objects({"operator": {"watchNamespaces": namespaces}})
    cluster = _normalise(one(objects, "ClusterRole")["rules"])
    assert {resource for _, resource, _ in cluster} == {"nodes", "customresourcedefinitions", "namespaces"}
    roles = find(objects, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == namespaces
    bindings = find(objects, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == namespaces
    sa = one(objects, "ServiceAccount")["metadata"]["name"]
    for binding in bindings:
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": roles[0]["metadata"]["name"]}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]
    # Together they grant what the cluster-wide ClusterRole grants, with namespaced peering.
    namespaced = _normalise(roles[0]["rules"])
    cluster_wide = _normalise(_chart_rules())
    assert cluster | namespaced == (cluster_wide - PEERING["clusterkopfpeerings"]) | PEERING["kopfpeerings"]


def test_cluster_role_binding_binds_the_operator_service_account() -> None:
    objects = render_objects({})
    binding = one(objects, "ClusterRoleBinding")
    sa = one(objects, "ServiceAccount")
    deploy = one(objects, "Deployment")
    assert binding["roleRef"]["name"] == one(objects, "ClusterRole")["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}]
    assert deploy["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]


def test_existing_service_account_must_be_named() -> None:
    with pytest.raises(helm.HelmError, match=r"serviceAccount\.name is required"):
        render({"serviceAccount": {"create": False}})
    objects = render_objects({"serviceAccount": {"create": False, "name": "platform-sa"}})
    assert not find(objects, "ServiceAccount")
    assert one(objects, "ClusterRoleBinding")["subjects"][0]["name"] == "platform-sa"


# --- monitoring objects -------------------------------------------------------------------------


def test_service_monitor_scrapes_the_operators_metrics_port() -> None:
    objects = render_objects(MONITORING_ON)
    sm, svc, deploy = one(objects, "ServiceMonitor"), one(objects, "Service"), one(objects, "Deployment")
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert svc["spec"]["selector"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
    (endpoint,) = sm["spec"]["endpoints"]
    (port,) = svc["spec"]["ports"]
    assert endpoint["port"] == port["name"] == "metrics"
    assert port["targetPort"] == "metrics"
    assert "--metrics-port=9090" in deploy["spec"]["template"]["spec"]["containers"][0]["args"]


def test_pod_monitor_matches_the_trainer_pods_the_operator_renders() -> None:
    """The PodMonitor's selector and port against a real attempt rendered by crucible.operator.render."""
    render_mod = pytest.importorskip("crucible.operator.render")
    pods = _rendered_trainer_pods(render_mod)
    pm = one(render_objects(MONITORING_ON), "PodMonitor")
    selector = pm["spec"]["selector"]
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    for labels, ports in pods:
        assert selector["matchLabels"].items() <= labels.items()
        for expr in selector["matchExpressions"]:
            assert expr["operator"] == "Exists" and expr["key"] in labels
        assert endpoint["port"] in {p["name"] for p in ports}, "trainer pods must name their metrics port `metrics`"
    relabel = {r["targetLabel"]: r["sourceLabels"][0] for r in endpoint["relabelings"] if "targetLabel" in r}
    assert relabel["run"] == "__meta_kubernetes_pod_label_crucible_dev_run"
    assert relabel["kind"] == "__meta_kubernetes_pod_label_crucible_dev_kind"
    assert pm["spec"]["namespaceSelector"] == {"matchNames": ["ml-team-a", "ml-team-b"]}
    assert one(render_objects({"trainerMetrics": {"podMonitor": {"enabled": True}}}), "PodMonitor")["spec"][
        "namespaceSelector"
    ] == {"any": True}


def _rendered_trainer_pods(render_mod: Any) -> list[tuple[dict[str, str], list[dict[str, Any]]]]:
    from crucible.api.validate import load_resources
    from crucible.core.plan import plan, required_inputs

    loaded = load_resources([str(REPO / "examples" / "pretrainrun.yaml")])
    resources = [item.resource for item in loaded.resources if item.resource.kind == "PretrainRun"]
    assert resources, f"examples/pretrainrun.yaml holds no valid PretrainRun: {loaded.problems}"
    resource = resources[0]
    inputs = {path: f"s3://bucket/inputs/{path}" for path in required_inputs(resource)}
    launch = plan(resource, storage_root="s3://bucket/crucible", attempt=0, inputs=inputs)
    out = []
    for job in render_mod.render(resource, launch).jobs:
        template = job["spec"]["template"]
        ports = [p for c in template["spec"]["containers"] for p in c.get("ports", [])]
        out.append((template["metadata"]["labels"], ports))
    return out


def test_pod_monitor_keeps_only_rank_zero() -> None:
    """Relabel `keep` regex applied the way Prometheus does (fully anchored) to the index label."""
    import re

    pm = one(render_objects(MONITORING_ON), "PodMonitor")
    (keep,) = [r for r in pm["spec"]["podMetricsEndpoints"][0]["relabelings"] if r.get("action") == "keep"]
    assert keep["sourceLabels"] == ["__meta_kubernetes_pod_label_batch_kubernetes_io_job_completion_index"]
    pattern = re.compile(f"^(?:{keep['regex']})$")
    assert pattern.match("0") and pattern.match("")  # rank 0 of an Indexed Job; a non-indexed pod
    assert not pattern.match("1") and not pattern.match("10")


def test_dashboard_config_map_is_labelled_for_the_grafana_sidecar() -> None:
    import json

    cm = one(render_objects({}), "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    (text,) = cm["data"].values()
    shipped = json.loads((CHART / "files" / "dashboards" / "crucible-training.json").read_text())
    assert json.loads(text) == shipped


def test_notes_tell_the_next_commands() -> None:
    notes = render({})["crucible/templates/NOTES.txt"]
    assert "kubectl apply -f examples/pretrainrun.yaml" in notes
    assert "kubectl get crucible" in notes
    assert f"kubectl -n {NAMESPACE} rollout status deployment/crucible" in notes
    assert "prometheusRule.enabled=true" in notes  # how to turn monitoring on
    on = render(MONITORING_ON)["crucible/templates/NOTES.txt"]
    assert "PrometheusRule" in on and "prometheusRule.enabled=true" not in on


def test_example_the_notes_point_at_exists() -> None:
    assert Path(REPO / "examples" / "pretrainrun.yaml").is_file()


def test_packaged_chart_carries_the_crds_and_renders_the_same(tmp_path: Path) -> None:
    """`helm package` resolves the files/crds link: the archive (what goes to an OCI registry) is complete."""
    archive = helm.package(str(CHART), destination=str(tmp_path))
    with helm.Chart.load(archive) as chart:
        packaged = chart.render({}, name="crucible", namespace=NAMESPACE, is_install=True)
    assert packaged == render({})


def test_values_schema_is_a_valid_json_schema() -> None:
    import json

    import jsonschema

    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(yaml.safe_load((CHART / "values.yaml").read_text()))


def test_release_fits_in_helms_release_secret() -> None:
    """Helm stores every rendered manifest gzipped and base64-encoded in one Secret (1 MiB at most)."""
    import base64
    import gzip

    manifest = "".join(render(MONITORING_ON).values()).encode()
    stored = len(base64.b64encode(gzip.compress(manifest)))
    assert stored < 512 * 1024, f"the release would need {stored} bytes of its 1 MiB Secret: ship CRDs separately"


def _helm_test_script(values: dict[str, Any]) -> tuple[str, str]:
    pod = next(o for o in find(render_objects(values), "Pod") if o["metadata"]["annotations"]["helm.sh/hook"] == "test")
    (container,) = pod["spec"]["containers"]
    assert container["command"][:2] == ["python", "-c"]
    script = container["command"][2]
    url = re.search(r'url = "(http://[^"]+)"', script)
    assert url, "the helm test names no URL"
    return script, url.group(1)


def test_helm_test_checks_the_metrics_service_and_passes_against_the_real_exporter() -> None:
    """`helm test` runs this script in the cluster; here it runs against OperatorMetrics on loopback."""
    import subprocess
    import sys

    metrics = pytest.importorskip("crucible.operator.metrics")
    from prometheus_client import CollectorRegistry

    script, url = _helm_test_script({})
    service = one(render_objects({}), "Service")
    assert url == f"http://{service['metadata']['name']}.{NAMESPACE}.svc:{service['spec']['ports'][0]['port']}/metrics"
    port = _free_port()
    metrics.OperatorMetrics(CollectorRegistry()).serve(port)
    local = script.replace(url, f"http://127.0.0.1:{port}/metrics")
    ok = subprocess.run([sys.executable, "-c", local], capture_output=True, text=True, timeout=scaled(60), check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # Something else answering on the port fails the test.
    import http.server
    import threading

    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        wrong = script.replace(url, f"http://127.0.0.1:{other.server_address[1]}/")
        bad = subprocess.run([sys.executable, "-c", wrong], capture_output=True, text=True, timeout=scaled(60), check=False)
    finally:
        other.shutdown()
    assert bad.returncode != 0 and "lacks" in bad.stderr
    assert not [o for o in render_objects({"metrics": {"service": {"enabled": False}}}) if o["kind"] == "Pod"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
