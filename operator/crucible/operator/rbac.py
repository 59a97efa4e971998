"""The exact ClusterRole the operator needs: every rule names its groups, resources and verbs
(no wildcards), and each is used by a call in this package (listed beside it).

    cluster_role(name="crucible-operator") -> dict   # the ClusterRole manifest
    RULES                                              # its rules

The Helm chart's ``crucible.rbacRules`` template must grant at least these;
tests/operator/test_rbac.py checks that it does and that neither uses wildcards.
"""

from __future__ import annotations

from typing import Any

from crucible.api import GROUP, KIND_MODELS
from crucible.api.registry import kinds


def rules() -> list[dict[str, Any]]:
    """The operator's ClusterRole rules for the kinds registered now (plug-ins included)."""
    plurals = sorted(m.PLURAL for m in KIND_MODELS.values())
    return _rules(plurals)


def _rules(PLURALS: list[str]) -> list[dict[str, Any]]:
    return [
    # Kopf watches the five kinds (no finalizers, no annotations: see handlers.py);
    # reconcile reads referenced runs (get).
    {"apiGroups": [GROUP], "resources": PLURALS, "verbs": ["get", "list", "watch"]},
    # reconcile._write: one merge-patch of status per pass.
    {"apiGroups": [GROUP], "resources": [f"{p}/status" for p in PLURALS], "verbs": ["get", "patch"]},
    # reconcile._start / _observe / _delete_attempt: the attempt's Indexed Jobs; handlers
    # watch them (label app.kubernetes.io/managed-by=crucible) to react to their pods at once.
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch", "create", "delete"]},
    # the headless Service and the spec ConfigMap of an attempt.
    {"apiGroups": [""], "resources": ["services", "configmaps"], "verbs": ["get", "create", "delete"]},
    # reconcile._observe: pods of the attempt (exit codes, termination messages, nodes).
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
    # reconcile._observe: is the node of a pod NotReady or gone?
    {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]},
    # kube.Kube.event (ours) and Kopf's own events.
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create"]},
    # gang scheduling: PodGroups of Volcano and of the coscheduling plugin.
    {"apiGroups": ["scheduling.volcano.sh", "scheduling.x-k8s.io"], "resources": ["podgroups"],
     "verbs": ["get", "create", "delete"]},
    # Kopf: peering (one active replica) and resource discovery.
    {"apiGroups": ["kopf.dev"], "resources": ["clusterkopfpeerings", "kopfpeerings"],
     "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
     "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]},
    # what a kind declares it needs beyond its own resource (Kind.rbac)
    *(dict(rule) for kind in kinds() for rule in kind.rbac),
]


RULES: list[dict[str, Any]] = rules()
PLURALS = sorted(m.PLURAL for m in KIND_MODELS.values())


def cluster_role(name: str = "crucible-operator") -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "crucible"}},
        "rules": rules(),
    }


def grants(rules: list[dict[str, Any]], group: str, resource: str, verb: str) -> bool:
    """Whether ``rules`` allow ``verb`` on ``group/resource`` (wildcards honoured, as the API server does)."""
    return any(
        (group in r.get("apiGroups", []) or "*" in r.get("apiGroups", []))
        and (resource in r.get("resources", []) or "*" in r.get("resources", []))
        and (verb in r.get("verbs", []) or "*" in r.get("verbs", []))
        for r in rules
    )
