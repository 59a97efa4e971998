"""The operator's ClusterRole: exact (no wildcards), valid, and granted by the Helm chart."""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from crucible.operator.rbac import RULES, cluster_role, grants

CHART_RBAC = Path(__file__).resolve().parents[2] / "charts" / "crucible" / "templates" / "_rbac.tpl"


def chart_rbac_rules(text: str) -> list[dict]:
    """The rules of every ``define`` block of the chart's _rbac.tpl; ``{{ if }}a{{ else }}b{{ end }}``
    inside a block counts as both a and b."""
    rules: list[dict] = []
    for block in re.findall(r'\{\{-? define "[^"]+" -?\}\}(.*?)\{\{-? end \}\}\s*$', text, flags=re.S | re.M):
        block = re.sub(r"\{\{-? if [^}]*\}\}", "", block)
        block = re.sub(r"\{\{-? else -?\}\}", ", ", block)
        block = re.sub(r"\{\{-? end -?\}\}", "", block)
        rules += yaml.safe_load(block) or []
    return rules


def triples(rules: list[dict]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def test_no_wildcards_and_valid() -> None:
    for group, resource, verb in triples(RULES):
        assert "*" not in (group, resource, verb)
    kubernetes_validate.validate(cluster_role(), kubernetes_validate.latest_version(), strict=True)


def test_grants_honours_wildcards_like_the_api_server() -> None:
    assert grants(RULES, "batch", "jobs", "create")
    assert not grants(RULES, "batch", "jobs", "update")
    assert grants([{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}], "x", "y", "z")


@pytest.mark.skipif(not CHART_RBAC.exists(), reason="the Helm chart has no _rbac.tpl")
def test_the_chart_grants_every_rule() -> None:
    chart_rules = chart_rbac_rules(CHART_RBAC.read_text())
    for rule in chart_rules:
        for key in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[key], f"wildcard in the chart's RBAC: {rule}"
    missing = [t for t in sorted(triples(RULES)) if not grants(chart_rules, *t)]
    assert not missing, f"charts/crucible/templates/_rbac.tpl lacks {missing}"
