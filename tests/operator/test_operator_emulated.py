"""The real Kopf operator against KMock's KubernetesEmulator and a simulated Job controller,
scheduler, kubelet and trainers (tests/operator/simcluster.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from opbuilders import manifest, pretrain_spec
from simcluster import SimCluster

FAST = {"maxRestarts": 2, "backoffSeconds": 0, "maxBackoffSeconds": 1, "hangTimeout": "10s"}


def run(scenario: Callable[[SimCluster], Awaitable[None]], **kw: Any) -> None:
    async def main() -> None:
        async with SimCluster(**kw).running() as cluster:
            await scenario(cluster)
    asyncio.run(asyncio.wait_for(main(), timeout=90))


def pretrain(name: str, port: int, *, nodes: int = 2, **over: Any) -> dict[str, Any]:
    spec = pretrain_spec(nodes=nodes, metrics={"port": port}, failurePolicy=FAST, **over)
    return manifest("PretrainRun", name, spec, namespace=None)


def test_two_node_pretrain_run_succeeds() -> None:
    async def scenario(c: SimCluster) -> None:
        c.trainer("pt", total_steps=20, port=19401)
        await c.apply(pretrain("pt", 19401))
        running = await c.wait_phase("PretrainRun", "pt", "Running")
        assert running["status"]["attempt"] == 0
        (job,) = await c.jobs("pt")
        assert job["spec"]["completions"] == 2
        done = await c.wait_phase("PretrainRun", "pt", "Succeeded")
        s = done["status"]
        assert s["restarts"] == 0
        assert s["outputURI"] == "s3://bucket/runs/ml/pretrainrun/pt/output"
        assert s["results"] == {"finalLoss": 2.5, "steps": 20}
        assert s["progress"]["totalSteps"] == 20
        assert s["completionTime"] and s["startTime"]
        reasons = [e["reason"] for e in await c.events("pt")]
        assert "AttemptStarted" in reasons and "Succeeded" in reasons
        assert [c_["type"] for c_ in s["conditions"] if c_["status"] == "True"] == ["InputsReady", "Complete"]
    run(scenario)
