"""The small Kubernetes client (retries, idempotent writes) and `crucible operator` wiring."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import web

from crucible.operator import kube as k


async def _serve(handler: Any) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


def test_retries_transient_errors_and_treats_409_and_404_as_done() -> None:
    calls: list[tuple[str, str]] = []

    async def handler(request: web.Request) -> web.Response:
        calls.append((request.method, request.path))
        if request.path.endswith("/flaky") and sum(1 for c in calls if c[1].endswith("/flaky")) < 3:
            return web.json_response({"message": "etcd busy"}, status=503)
        if request.method == "POST":
            return web.json_response({"kind": "Status", "reason": "AlreadyExists"}, status=409)
        if request.method == "DELETE":
            return web.json_response({"kind": "Status", "reason": "NotFound"}, status=404)
        if request.path.endswith("/forbidden"):
            return web.json_response({"message": "jobs is forbidden"}, status=403)
        return web.json_response({"ok": True})

    async def main() -> None:
        runner, url = await _serve(handler)
        kube = k.Kube(k.Connection(server=url), retries=3)
        try:
            assert await kube.request("GET", "/api/v1/namespaces/ml/pods/flaky") == {"ok": True}
            assert [c for c in calls if c[1].endswith("/flaky")] == [("GET", "/api/v1/namespaces/ml/pods/flaky")] * 3
            job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j", "namespace": "ml"}}
            assert await kube.create(job) is False  # exists: fine
            assert ("POST", "/apis/batch/v1/namespaces/ml/jobs") in calls
            assert await kube.delete(k.JOBS, "ml", "gone") is False  # already gone: fine
            with pytest.raises(k.ApiError, match="HTTP 403: jobs is forbidden"):
                await kube.request("GET", "/apis/batch/v1/namespaces/ml/jobs/forbidden")
        finally:
            await kube.close()
            await runner.cleanup()

    asyncio.run(main())


def test_label_filter_and_paths() -> None:
    assert k.JOBS.path("ml", "j", "status") == "/apis/batch/v1/namespaces/ml/jobs/j/status"
    assert k.NODES.path(None, "n1") == "/api/v1/nodes/n1"
    assert k.selector({"b": "2", "a": "1"}) == "a=1,b=2"
    assert k.matches({"metadata": {"labels": {"a": "1", "b": "2"}}}, {"a": "1"})
    assert not k.matches({"metadata": {}}, {"a": "1"})


def test_kubeconfig_is_read(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = {"current-context": "c", "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u", "namespace": "ml"}}],
           "clusters": [{"name": "k", "cluster": {"server": "https://10.0.0.1:6443/", "insecure-skip-tls-verify": True}}],
           "users": [{"name": "u", "user": {"token": "t0k"}}]}
    path = tmp_path / "config"
    path.write_text(json.dumps(cfg))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(path))
    conn = k.load_connection()
    assert (conn.server, conn.token, conn.insecure, conn.namespace) == ("https://10.0.0.1:6443", "t0k", True, "ml")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(RuntimeError, match="set KUBECONFIG or pass --server"):
        k.load_connection()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--standalone", "-n", "ml", "-n", "research"],
         {"standalone": True, "peering_name": None, "clusterwide": False, "namespaces": ["ml", "research"]}),
        (["--peering", "crucible", "--priority", "100", "--all-namespaces"],
         {"standalone": False, "peering_name": "crucible", "priority": 100, "clusterwide": True}),
    ],
)
def test_operator_command_wires_peering_and_scope_into_kopf(argv: list[str], expected: dict[str, Any],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import kopf

    from crucible.cli import main

    seen: dict[str, Any] = {}

    async def fake_operator(**kwargs: Any) -> None:
        seen.update(kwargs)

    monkeypatch.setattr(kopf, "operator", fake_operator)
    assert main(["operator", "--server", "http://127.0.0.1:1", "--metrics-port", "0", *argv]) == 0
    for key, value in expected.items():
        assert seen[key] == value, key
    assert isinstance(seen["registry"], kopf.OperatorRegistry)
