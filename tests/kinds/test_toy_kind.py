"""A kind registered from the test suite alone (tests/kinds/toy/echokind.py, no edit under
operator/ or trainer/) goes through `crucible validate`, `crucible crds`, `crucible run` and the
Kopf operator under KMock's emulator, as the five built-in kinds do."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from waits import scaled

HERE = Path(__file__).resolve().parent
TOY = HERE / "toy"
OPERATOR_TESTS = HERE.parent / "operator"
CRUCIBLE = [sys.executable, "-m", "crucible.cli"]


def echo_run(name: str = "hi", data: dict[str, Any] | None = None, message: str = "one two three") -> dict[str, Any]:
    return {"apiVersion": "crucible.dev/v1alpha1", "kind": "EchoRun", "metadata": {"name": name},
            "spec": {"data": data or {"uri": "inputs/words.txt"}, "message": message}}


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    path = os.pathsep.join([str(TOY), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, "PYTHONPATH": path, "CRUCIBLE_KINDS": "echokind"}


def crucible(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CRUCIBLE, *args], env=env, capture_output=True, text=True, timeout=scaled(300))


def test_validate_accepts_it_and_checks_its_fromrun_kinds(tmp_path: Path, env: dict[str, str]) -> None:
    (tmp_path / "echo.yaml").write_text(yaml.safe_dump(echo_run()))
    ok = crucible(env, "validate", str(tmp_path))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "echo.yaml").write_text(yaml.safe_dump(echo_run(data={"fromRun": {"kind": "PretrainRun", "name": "x"}})))
    out = crucible(env, "validate", str(bad))
    assert out.returncode != 0
    assert "spec.data.fromRun.kind" in out.stdout + out.stderr and "DataPipeline" in out.stdout + out.stderr
    unknown = crucible({**env, "CRUCIBLE_KINDS": ""}, "validate", str(tmp_path))
    assert unknown.returncode != 0 and "EchoRun" in unknown.stdout + unknown.stderr


def test_crds_include_it_with_its_columns(tmp_path: Path, env: dict[str, str]) -> None:
    out = crucible(env, "crds", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    crd = yaml.safe_load((tmp_path / "crucible.dev_echoruns.yaml").read_text())
    assert crd["spec"]["names"]["kind"] == "EchoRun" and crd["spec"]["names"]["shortNames"] == ["echo"]
    version = crd["spec"]["versions"][0]
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Phase", "Words", "Restarts", "Age"]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert {"data", "message", "output", "resources"} <= set(spec["properties"])
    assert len(list(tmp_path.glob("*.yaml"))) == 6  # the five built-in kinds and this one


def test_crucible_run_runs_its_stage_and_reports_its_results(tmp_path: Path, env: dict[str, str]) -> None:
    folder, work = tmp_path / "pipeline", tmp_path / "work"
    folder.mkdir()
    (work / "inputs").mkdir(parents=True)
    (work / "inputs" / "words.txt").write_text("some words\n")
    (folder / "echo.yaml").write_text(yaml.safe_dump(echo_run()))
    out = crucible(env, "run", str(folder), "-w", str(work), "--plain")
    assert out.returncode == 0, out.stdout + out.stderr
    state = json.loads((work / "default" / "echorun" / "hi" / "state.json").read_text())
    assert state["status"]["phase"] == "Succeeded"
    assert state["status"]["results"] == {"words": 3, "said": "one two three"}
    assert "3 words" in out.stdout  # the summary reads the kind's declared results
    assert (work / "default" / "echorun" / "hi" / "output" / "echo.txt").read_text() == "one two three\n"
    report = (work / "report.md").read_text()
    assert "## Echoes" in report and "one two three" in report  # the kind's own report section


@pytest.fixture()
def echo_kind() -> Iterator[None]:
    for path in (TOY, OPERATOR_TESTS):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    import echokind

    from crucible.api.registry import register, unregister

    register(echokind.KIND)
    try:
        yield
    finally:
        unregister("EchoRun")


def test_the_operator_reconciles_it_under_the_emulator(echo_kind: None) -> None:
    from opbuilders import manifest
    from simcluster import SimCluster

    from crucible.operator.rbac import grants, rules

    assert grants(rules(), "echo.example", "megaphones", "get")  # the kind's declared RBAC
    assert grants(rules(), "crucible.dev", "echoruns/status", "patch")

    async def scenario(c: SimCluster) -> None:
        c.trainer("hi", total_steps=3, port=19481)
        await c.apply(manifest("EchoRun", "hi", {"data": {"uri": "s3://bucket/words"}, "message": "a b"},
                               namespace=None))
        done = await c.wait_phase("EchoRun", "hi", "Succeeded", timeout=60)
        (job,) = await c.jobs("hi")
        command = job["spec"]["template"]["spec"]["containers"][0]
        argv = [*command.get("command", []), *command.get("args", [])]
        assert "echo_stage" in " ".join(argv) and "crucible.trainer" not in " ".join(argv)
        assert job["metadata"]["labels"]["crucible.dev/role"] == "echo"
        assert done["status"]["results"]  # read from rank 0's termination message
        assert done["status"]["outputURI"].endswith("/echorun/hi/output")
        reasons = [e["reason"] for e in await c.events("hi")]
        assert "AttemptStarted" in reasons and "Succeeded" in reasons

    async def main() -> None:
        async with SimCluster().running() as cluster:
            await scenario(cluster)

    asyncio.run(asyncio.wait_for(main(), timeout=scaled(90)))  # the inner waits are scaled too
