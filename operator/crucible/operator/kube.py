"""A small Kubernetes REST client on aiohttp (Kopf's own dependency).

The official ``kubernetes`` client is deliberately not used: it pins python-dateutil against
botocore. This covers what the operator does — get/list/create/merge-patch/delete of a handful
of resources, and the status subresource — with retries on 429/5xx and connection errors.
Create treats 409 AlreadyExists as success and delete treats 404 as success, so every write
is idempotent and a restarted operator never duplicates an attempt.

Connection: :func:`load_connection` reads, in order, an explicit server URL, the in-cluster
service account, then ``$KUBECONFIG`` / ``~/.kube/config`` (token, client certificate,
CA). The same :class:`Connection` is handed to Kopf through ``@kopf.on.login``.
"""

from __future__ import annotations

import asyncio
import base64
import os
import ssl
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import yaml

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class ApiError(Exception):
    def __init__(self, status: int, method: str, url: str, body: Any) -> None:
        self.status = status
        message = body.get("message") if isinstance(body, dict) else str(body)[:300]
        super().__init__(f"{method} {url}: HTTP {status}: {message}")


@dataclass(frozen=True)
class Connection:
    server: str
    token: str | None = None
    ca_path: str | None = None
    cert_path: str | None = None
    key_path: str | None = None
    insecure: bool = False
    namespace: str | None = None

    def ssl_context(self) -> ssl.SSLContext | bool:
        if not self.server.startswith("https"):
            return False
        if self.insecure:
            return False
        ctx = ssl.create_default_context(cafile=self.ca_path) if self.ca_path else ssl.create_default_context()
        if self.cert_path and self.key_path:
            ctx.load_cert_chain(self.cert_path, self.key_path)
        return ctx


def _data_file(data: str) -> str:
    with tempfile.NamedTemporaryFile("wb", delete=False, prefix="crucible-kube-") as fh:
        fh.write(base64.b64decode(data))
        return fh.name


def load_connection(server: str | None = None) -> Connection:
    """Where the API server is and how to authenticate (see the module docstring)."""
    if server:
        return Connection(server=server.rstrip("/"))
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
    if host and port and (SA_DIR / "token").exists():
        return Connection(
            server=f"https://{host}:{port}",
            token=(SA_DIR / "token").read_text().strip(),
            ca_path=str(SA_DIR / "ca.crt"),
            namespace=(SA_DIR / "namespace").read_text().strip() if (SA_DIR / "namespace").exists() else None,
        )
    path = Path(os.environ.get("KUBECONFIG", "~/.kube/config").split(os.pathsep)[0]).expanduser()
    if not path.exists():
        raise RuntimeError(
            f"no Kubernetes API found: not in a cluster and no kubeconfig at {path}; "
            "set KUBECONFIG or pass --server"
        )
    cfg = yaml.safe_load(path.read_text()) or {}
    ctx_name = cfg.get("current-context")
    ctx = next((c["context"] for c in cfg.get("contexts", []) if c["name"] == ctx_name), None)
    if ctx is None:
        raise RuntimeError(f"{path}: current-context {ctx_name!r} is not among its contexts")
    cluster = next(c["cluster"] for c in cfg.get("clusters", []) if c["name"] == ctx["cluster"])
    user: dict[str, Any] = next((u["user"] for u in cfg.get("users", []) if u["name"] == ctx.get("user")), {}) or {}
    token = user.get("token")
    if not token and user.get("tokenFile"):
        token = Path(user["tokenFile"]).read_text().strip()
    return Connection(
        server=cluster["server"].rstrip("/"),
        token=token,
        ca_path=cluster.get("certificate-authority")
        or (_data_file(cluster["certificate-authority-data"]) if cluster.get("certificate-authority-data") else None),
        cert_path=user.get("client-certificate")
        or (_data_file(user["client-certificate-data"]) if user.get("client-certificate-data") else None),
        key_path=user.get("client-key") or (_data_file(user["client-key-data"]) if user.get("client-key-data") else None),
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        namespace=ctx.get("namespace"),
    )


@dataclass(frozen=True)
class Res:
    """A resource type: group ('' for core), version, plural, namespaced."""

    group: str
    version: str
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None = None, name: str | None = None, sub: str | None = None) -> str:
        base = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{quote(namespace)}"
        base += f"/{self.plural}"
        if name:
            base += f"/{quote(name)}"
        if sub:
            base += f"/{sub}"
        return base


PODS = Res("", "v1", "pods")
NODES = Res("", "v1", "nodes", namespaced=False)
SERVICES = Res("", "v1", "services")
CONFIGMAPS = Res("", "v1", "configmaps")
EVENTS = Res("", "v1", "events")
JOBS = Res("batch", "v1", "jobs")
VOLCANO_PODGROUPS = Res("scheduling.volcano.sh", "v1beta1", "podgroups")
COSCHEDULING_PODGROUPS = Res("scheduling.x-k8s.io", "v1alpha1", "podgroups")


def res_of(obj: Mapping[str, Any]) -> Res:
    """The resource type of a manifest (for the kinds the operator creates)."""
    api, kind = obj["apiVersion"], obj["kind"]
    group, _, version = api.rpartition("/")
    plural = {"ConfigMap": "configmaps", "Service": "services", "Job": "jobs", "PodGroup": "podgroups",
              "Pod": "pods", "Event": "events"}.get(kind) or kind.lower() + "s"
    return Res(group, version, plural)


def selector(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def matches(obj: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    have = obj.get("metadata", {}).get("labels") or {}
    return all(have.get(k) == v for k, v in labels.items())


class Kube:
    """Async API client; one per operator (create it at startup, close it at cleanup)."""

    def __init__(self, conn: Connection, *, retries: int = 4, timeout: float = 30.0,
                 user_agent: str = "crucible-operator") -> None:
        self.conn = conn
        self.retries = retries
        headers = {"Accept": "application/json", "User-Agent": user_agent}
        if conn.token:
            headers["Authorization"] = f"Bearer {conn.token}"
        self._session = aiohttp.ClientSession(
            base_url=None,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout),
            connector=aiohttp.TCPConnector(ssl=conn.ssl_context(), limit=64),
        )
        self.requests = 0

    async def close(self) -> None:
        await self._session.close()

    async def request(self, method: str, path: str, *, body: Any = None, params: Mapping[str, str] | None = None,
                      content_type: str = "application/json") -> Any:
        url = self.conn.server + path
        delay = 0.2
        for attempt in range(self.retries + 1):
            self.requests += 1
            try:
                async with self._session.request(method, url, json=body, params=params,
                                                 headers={"Content-Type": content_type}) as resp:
                    try:
                        payload: Any = await resp.json(content_type=None)
                    except (ValueError, aiohttp.ContentTypeError):
                        payload = await resp.text()
                    if resp.status < 400:
                        return payload
                    if resp.status not in RETRY_STATUSES or attempt == self.retries:
                        raise ApiError(resp.status, method, url, payload)
            except (TimeoutError, aiohttp.ClientConnectionError):
                if attempt == self.retries:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        raise AssertionError("unreachable")

    async def get(self, res: Res, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return await self.request("GET", res.path(namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def list(self, res: Res, namespace: str | None, labels: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        params = {"labelSelector": selector(labels)} if labels else None
        try:
            payload = await self.request("GET", res.path(namespace), params=params)
        except ApiError as exc:
            if exc.status == 404:
                return []
            raise
        items = payload.get("items", []) if isinstance(payload, dict) else []
        # Filter here too: some API servers (and test emulators) ignore the selector.
        return [i for i in items if not labels or matches(i, labels)]

    async def create(self, obj: Mapping[str, Any]) -> bool:
        """Create; False when it already exists (409)."""
        res = res_of(obj)
        try:
            await self.request("POST", res.path(obj["metadata"].get("namespace")), body=obj)
            return True
        except ApiError as exc:
            if exc.status == 409:
                return False
            raise

    async def delete(self, res: Res, namespace: str | None, name: str) -> bool:
        """Delete with background propagation; False when already gone (404)."""
        try:
            await self.request("DELETE", res.path(namespace, name),
                               body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"})
            return True
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise

    async def patch_status(self, res: Res, namespace: str | None, name: str, status: Mapping[str, Any],
                           *, resource_version: str | None = None) -> Any:
        """Merge-patch the status subresource; with ``resource_version`` the API server refuses
        (409) to apply it over a newer object, so a stale pass never overwrites a fresh status."""
        body: dict[str, Any] = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        return await self.request("PATCH", res.path(namespace, name, "status"), body=body,
                                  content_type="application/merge-patch+json")

    async def event(self, involved: Mapping[str, Any], type_: str, reason: str, message: str, now: str) -> None:
        meta = involved["metadata"]
        ns = meta.get("namespace") or "default"
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": ns},
            "involvedObject": {"apiVersion": involved["apiVersion"], "kind": involved["kind"], "name": meta["name"],
                               "namespace": ns, "uid": meta.get("uid", "")},
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "crucible-operator"},
            "reportingComponent": "crucible.dev/operator",
            "reportingInstance": os.environ.get("HOSTNAME", "crucible-operator"),
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self.request("POST", EVENTS.path(ns), body=event)
        except ApiError:
            pass  # events are best effort; the status already says it
