"""The Kubernetes client (the official package: auth, retries, idempotent writes, off the loop) and
`crucible operator` wiring."""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from types import SimpleNamespace
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
    calls: list[tuple[str, str, str]] = []

    async def handler(request: web.Request) -> web.Response:
        calls.append((request.method, request.path, request.query.get("fieldManager", "")))
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
        # The server runs on this event loop: a client call that blocked the loop would never be answered.
        runner, url = await _serve(handler)
        kube = k.Kube(k.load_connection(url), retries=3)
        try:
            assert await kube.request("GET", "/api/v1/namespaces/ml/pods/flaky") == {"ok": True}
            assert [c[:2] for c in calls if c[1].endswith("/flaky")] == [("GET", "/api/v1/namespaces/ml/pods/flaky")] * 3
            job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j", "namespace": "ml"}}
            assert await kube.create(job) is False  # exists: fine
            assert ("POST", "/apis/batch/v1/namespaces/ml/jobs", k.FIELD_MANAGER) in calls  # one field manager
            await kube.patch_status(k.JOBS, "ml", "j", {"phase": "x"})
            assert ("PATCH", "/apis/batch/v1/namespaces/ml/jobs/j/status", k.FIELD_MANAGER) in calls
            assert await kube.delete(k.JOBS, "ml", "gone") is False  # already gone: fine
            with pytest.raises(k.ApiError, match="HTTP 403: jobs is forbidden"):
                await kube.request("GET", "/apis/batch/v1/namespaces/ml/jobs/forbidden")
        finally:
            await kube.close()
            await runner.cleanup()

    asyncio.run(main())


def test_the_event_loop_keeps_running_while_a_call_waits() -> None:
    """Blocking HTTP runs on the client's threads: other coroutines (Kopf's watches) go on meanwhile."""
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.5)
        return web.json_response({"items": []})

    async def main() -> None:
        runner, url = await _serve(slow)
        kube = k.Kube(k.load_connection(url))
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        try:
            assert await asyncio.gather(*(kube.list(k.PODS, "ml") for _ in range(8))) == [[]] * 8
            assert ticks >= 5, "the loop stood still during the calls"
        finally:
            task.cancel()
            await kube.close()
            await runner.cleanup()

    asyncio.run(main())


def test_plurals_of_unknown_kinds_come_from_discovery() -> None:
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.path}")
        if request.path == "/apis/policy.example.com/v1":
            return web.json_response({"kind": "APIResourceList", "groupVersion": "policy.example.com/v1", "resources": [
                {"name": "policies", "kind": "Policy", "namespaced": True},
                {"name": "policies/status", "kind": "Policy", "namespaced": True}]})
        return web.json_response({}, status=201)

    async def main() -> None:
        runner, url = await _serve(handler)
        kube = k.Kube(k.load_connection(url))
        try:
            obj = {"apiVersion": "policy.example.com/v1", "kind": "Policy", "metadata": {"name": "p", "namespace": "ml"}}
            assert await kube.create(obj) and await kube.create(obj)
            assert seen == ["GET /apis/policy.example.com/v1", "POST /apis/policy.example.com/v1/namespaces/ml/policies",
                            "POST /apis/policy.example.com/v1/namespaces/ml/policies"]  # discovery asked once
            with pytest.raises(k.ApiError, match="serves no kind Widget"):
                await kube.create({**obj, "kind": "Widget"})
        finally:
            await kube.close()
            await runner.cleanup()

    assert k.res_of({"apiVersion": "crucible.dev/v1alpha1", "kind": "QuantizeJob"}) == k.Res(
        "crucible.dev", "v1alpha1", "quantizejobs")
    asyncio.run(main())


def test_label_filter_and_paths() -> None:
    assert k.JOBS.path("ml", "j", "status") == "/apis/batch/v1/namespaces/ml/jobs/j/status"
    assert k.NODES.path(None, "n1") == "/api/v1/nodes/n1"
    assert k.selector({"b": "2", "a": "1"}) == "a=1,b=2"
    assert k.matches({"metadata": {"labels": {"a": "1", "b": "2"}}}, {"a": "1"})
    assert not k.matches({"metadata": {}}, {"a": "1"})


def _kubeconfig(path: Path, user: dict[str, Any], cluster: dict[str, Any] | None = None) -> Path:
    cfg = {"current-context": "c", "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u", "namespace": "ml"}}],
           "clusters": [{"name": "k", "cluster": cluster or {"server": "https://10.0.0.1:6443/",
                                                             "insecure-skip-tls-verify": True}}],
           "users": [{"name": "u", "user": user}]}
    path.write_text(json.dumps(cfg))
    return path


def test_kubeconfig_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(_kubeconfig(tmp_path / "config", {"token": "t0k"})))
    conn = k.load_connection()
    assert (conn.server, conn.authorization(), conn.insecure, conn.namespace) == (
        "https://10.0.0.1:6443", "Bearer t0k", True, "ml")
    info = conn.login_info()
    assert (info["scheme"], info["token"], info["default_namespace"]) == ("Bearer", "t0k", "ml")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(RuntimeError, match="set KUBECONFIG or pass --server"):
        k.load_connection()


def test_exec_plugin_tokens_are_refreshed_when_they_expire(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An EKS/GKE/AKS laptop: the token comes from a credential plugin and is fetched again when it expires."""
    counter = tmp_path / "count"
    plugin = tmp_path / "plugin.py"
    plugin.write_text(textwrap.dedent(f"""
        import json, pathlib
        p = pathlib.Path({str(counter)!r})
        n = int(p.read_text()) + 1 if p.exists() else 1
        p.write_text(str(n))
        print(json.dumps({{"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",
                          "status": {{"token": f"tok-{{n}}", "expirationTimestamp": "2000-01-01T00:00:00Z"}}}}))
    """))
    user = {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": sys.executable,
                     "args": [str(plugin)], "interactiveMode": "Never"}}
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        return web.json_response({"items": []})

    async def main() -> None:
        runner, url = await _serve(handler)
        path = _kubeconfig(tmp_path / "config", user, {"server": url})
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        kube = k.Kube(k.load_connection(kubeconfig=str(path)))
        try:
            await kube.list(k.PODS, "ml")
            await kube.list(k.PODS, "ml")
        finally:
            await kube.close()
            await runner.cleanup()

    asyncio.run(main())
    # expired at once, so each request ran the plugin again and sent what it printed
    assert seen[0].startswith("Bearer tok-") and seen[1].startswith("Bearer tok-") and seen[0] != seen[1]


def test_no_client_key_is_left_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=crucible-test"], check=True, capture_output=True)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    user = {"client-certificate-data": base64.b64encode(cert.read_bytes()).decode(),
            "client-key-data": base64.b64encode(key.read_bytes()).decode()}
    conn = k.load_connection(kubeconfig=str(_kubeconfig(tmp_path / "config", user)))
    assert conn.key_data == key.read_bytes() and conn.ssl_context is not None
    assert list(scratch.iterdir()) == []  # the library's temporary copies are gone before the first request
    assert k.Kube(conn).conn is conn


def test_in_cluster_token_is_re_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kubernetes.config import incluster_config

    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("first")
    (sa / "namespace").write_text("ml")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(tmp_path / "k.pem"),
                    "-out", str(sa / "ca.crt"), "-days", "1", "-subj", "/CN=ca"], check=True, capture_output=True)
    monkeypatch.setattr(k, "SA_DIR", sa)
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(sa / "token"))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(sa / "ca.crt"))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    conn = k.load_connection()
    assert (conn.server, conn.namespace, conn.authorization()) == ("https://10.0.0.1:443", "ml", "bearer first")
    (sa / "token").write_text("rotated")  # the kubelet rotates the projected token; a minute later:
    later = datetime.datetime.now() + datetime.timedelta(minutes=2)
    monkeypatch.setattr(incluster_config, "datetime", SimpleNamespace(
        datetime=SimpleNamespace(now=lambda: later), timedelta=datetime.timedelta))
    assert conn.authorization() == "bearer rotated"


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
