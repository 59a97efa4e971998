"""The operator's Kubernetes client: the official ``kubernetes`` package behind a small async interface.

``kubernetes`` 36.x (37 needs python-dateutil>=3, which botocore refuses) provides what a
hand-written client lacked: kubeconfig with ``exec`` credential plugins (EKS, GKE, AKS) and
their token refresh, the in-cluster service account with its token re-read as the kubelet
rotates it, TLS and client certificates, connection pooling. On top of it this module keeps
the interface the operator's code calls (:class:`Kube`):

    get(res, ns, name) -> dict | None          list(res, ns, labels) -> [dict]
    create(obj) -> bool (False: existed)       delete(res, ns, name) -> bool (False: gone)
    patch(res, ns, name, body)                 patch_status(res, ns, name, status, resource_version=)
    event(involved, type, reason, message, now)
    request(method, path, body=, params=, content_type=)   close()

* **Off the event loop**: the client is synchronous (urllib3), so every call runs in a thread
  of one bounded pool (:attr:`Kube.threads`, as many as pooled connections); Kopf's loop only
  awaits. Bodies go out and come back as plain dicts (``_preload_content=False`` and one
  ``json.loads``), never through the generated model classes, which would cost far more CPU
  per object than the request.
* **Retries**: urllib3's ``Retry`` on connection errors and on 429/5xx with exponential backoff
  (honouring ``Retry-After``) for every method: creates and deletes are idempotent (409 and 404
  are success), and a merge patch applied twice is the same patch.
* **One field manager**: every write carries ``fieldManager=crucible-operator``.
* **No key material left on disk**: certificates and keys from a kubeconfig are written by the
  library into a private 0700 directory, read into memory (:class:`Connection`), and the
  directory removed before the first request; the TLS context is built in memory once.
* **Real plurals**: :func:`res_of` knows the kinds the operator creates, and asks the API
  server's discovery (``/api/v1``, ``/apis/GROUP/VERSION``) for any other, once per group.

Connection: :func:`load_connection` reads, in order, an explicit server URL, the in-cluster
service account, then ``$KUBECONFIG`` / ``~/.kube/config``. The same :class:`Connection` hands
Kopf its credentials (``@kopf.on.login``), refreshed on each login.
"""

from __future__ import annotations

import asyncio
import atexit
import inspect
import json
import os
import shutil
import ssl
import tempfile
import threading
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
FIELD_MANAGER = "crucible-operator"
DEFAULT_THREADS = 16


class ApiError(Exception):
    def __init__(self, status: int, method: str, url: str, body: Any) -> None:
        self.status = status
        self.body = body
        message = body.get("message") if isinstance(body, dict) else str(body)[:300]
        super().__init__(f"{method} {url}: HTTP {status}: {message}")


# -- where the API server is, and the credentials ----------------------------------------------


@dataclass
class Connection:
    """A loaded ``kubernetes.client.Configuration`` plus the TLS material, held in memory."""

    configuration: k8s.Configuration
    namespace: str | None = None
    ca_data: bytes | None = None
    cert_data: bytes | None = None
    key_data: bytes | None = None
    ssl_context: ssl.SSLContext | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def server(self) -> str:
        return str(self.configuration.host).rstrip("/")

    @property
    def insecure(self) -> bool:
        return not self.configuration.verify_ssl

    def authorization(self) -> str | None:
        """The current ``Authorization`` header value; runs the refresh hook (exec plugin, token file)."""
        with self._lock:
            auth = self.configuration.auth_settings().get("BearerToken")
        return auth["value"] if auth and auth.get("value") else None

    def login_info(self) -> dict[str, Any]:
        """Keyword arguments of ``kopf.ConnectionInfo``, with a freshly refreshed token."""
        header = self.authorization()
        scheme, _, token = (header or "").partition(" ")
        return {
            "server": self.server,
            "scheme": scheme.capitalize() if token else None,
            "token": token or None,
            "ca_data": self.ca_data,
            "certificate_data": self.cert_data,
            "private_key_data": self.key_data,
            "insecure": self.insecure or None,
            "default_namespace": self.namespace,
        }


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def _ssl_context(conf: k8s.Configuration, cert_file: str | None, key_file: str | None,
                 ca_data: bytes | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca_data.decode() if ca_data else None)
    if not conf.verify_ssl:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert_file and key_file:
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


def _private_dir() -> str:
    path = tempfile.mkdtemp(prefix="crucible-kube-")  # mode 0700
    atexit.register(shutil.rmtree, path, True)
    return path


def load_connection(server: str | None = None, *, kubeconfig: str | None = None,
                    context: str | None = None) -> Connection:
    """Where the API server is and how to authenticate (see the module docstring)."""
    conf = k8s.Configuration()
    if server:
        conf.host = server.rstrip("/")
        return Connection(conf)
    if os.environ.get("KUBERNETES_SERVICE_HOST") and (SA_DIR / "token").exists():
        # The token file is re-read when it is a minute old: the kubelet rotates it.
        k8s_config.load_incluster_config(client_configuration=conf, try_refresh_token=True)
        ns_file = SA_DIR / "namespace"
        ca = _read(conf.ssl_ca_cert)
        return Connection(conf, ns_file.read_text().strip() if ns_file.exists() else None, ca_data=ca,
                          ssl_context=_ssl_context(conf, None, None, ca))
    path = Path(kubeconfig or os.environ.get("KUBECONFIG", "~/.kube/config").split(os.pathsep)[0]).expanduser()
    if not path.exists():
        raise RuntimeError(
            f"no Kubernetes API found: not in a cluster and no kubeconfig at {path}; "
            "set KUBECONFIG or pass --server"
        )
    scratch = _private_dir()
    try:
        try:
            k8s_config.load_kube_config(config_file=str(path), context=context, client_configuration=conf,
                                        persist_config=False, temp_file_path=scratch)
        except k8s_config.ConfigException as exc:
            raise RuntimeError(f"{path}: {exc}") from exc
        contexts, active = k8s_config.list_kube_config_contexts(str(path))
        if context:
            active = next((c for c in contexts if c["name"] == context), active)
        namespace = (active or {}).get("context", {}).get("namespace")
        ca, cert, key = _read(conf.ssl_ca_cert), _read(conf.cert_file), _read(conf.key_file)
        ctx = _ssl_context(conf, conf.cert_file, conf.key_file, ca)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return Connection(conf, namespace, ca_data=ca, cert_data=cert, key_data=key, ssl_context=ctx)


# -- resource types ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Res:
    """A resource type: group ('' for core), version, plural, namespaced."""

    group: str
    version: str
    plural: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

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

# (apiVersion, kind) -> Res of every kind the operator writes or reads; the rest come from discovery.
KNOWN: dict[tuple[str, str], Res] = {
    ("v1", "Pod"): PODS,
    ("v1", "Node"): NODES,
    ("v1", "Service"): SERVICES,
    ("v1", "ConfigMap"): CONFIGMAPS,
    ("v1", "Event"): EVENTS,
    ("batch/v1", "Job"): JOBS,
    ("scheduling.volcano.sh/v1beta1", "PodGroup"): VOLCANO_PODGROUPS,
    ("scheduling.x-k8s.io/v1alpha1", "PodGroup"): COSCHEDULING_PODGROUPS,
}


def _crucible_kinds() -> dict[tuple[str, str], Res]:
    from crucible.api import GROUP, KIND_MODELS, VERSION

    return {(f"{GROUP}/{VERSION}", kind): Res(GROUP, VERSION, model.PLURAL) for kind, model in KIND_MODELS.items()}


def res_of(obj: Mapping[str, Any]) -> Res | None:
    """The resource type of a manifest when it is one the operator knows; None: ask discovery."""
    key = (obj["apiVersion"], obj["kind"])
    return KNOWN.get(key) or _crucible_kinds().get(key)


def selector(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def matches(obj: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    have = obj.get("metadata", {}).get("labels") or {}
    return all(have.get(k) == v for k, v in labels.items())


# -- the client --------------------------------------------------------------------------------


def _retry(retries: int) -> urllib3.Retry:
    args: dict[str, Any] = {"backoff_max": 5.0} if "backoff_max" in inspect.signature(urllib3.Retry).parameters else {}
    return urllib3.Retry(
        total=retries, connect=retries, read=retries, status=retries, other=retries,
        backoff_factor=0.2, status_forcelist=RETRY_STATUSES,
        allowed_methods=None,  # every method: the operator's writes are idempotent (see the module docstring)
        raise_on_status=False, respect_retry_after_header=True, **args,
    )


class Kube:
    """Async API client over the official one; one per operator (create at startup, close at cleanup)."""

    def __init__(self, conn: Connection, *, retries: int = 4, timeout: float = 30.0,
                 user_agent: str = "crucible-operator", threads: int = DEFAULT_THREADS) -> None:
        self.conn = conn
        self.retries = retries
        self.timeout = timeout
        self.threads = threads
        conf = conn.configuration
        conf.retries = _retry(retries)
        conf.connection_pool_maxsize = threads
        self._api = k8s.ApiClient(conf)
        self._api.user_agent = user_agent
        if conn.ssl_context is not None and conf.host.startswith("https"):
            # The library would hand urllib3 file paths for the client certificate, read per
            # connection; the context built in memory needs no file left behind.
            rest = self._api.rest_client
            pool_args: dict[str, Any] = {"num_pools": 4, "maxsize": threads, "retries": conf.retries,
                                         "ssl_context": conn.ssl_context}
            if conf.tls_server_name:
                pool_args["server_hostname"] = conf.tls_server_name
            if conf.proxy:
                rest.pool_manager = urllib3.ProxyManager(proxy_url=conf.proxy, proxy_headers=conf.proxy_headers,
                                                         **pool_args)
            else:
                rest.pool_manager = urllib3.PoolManager(**pool_args)
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="crucible-kube")
        self._discovered: dict[str, dict[str, Res]] = {}
        self.requests = 0

    async def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._api.close()

    async def _in_thread(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def _call(self, method: str, path: str, body: Any, params: Mapping[str, str] | None, content_type: str) -> Any:
        """One request on a pool thread: the library's retries, auth refresh and TLS; JSON in and out."""
        self.requests += 1
        query = list((params or {}).items())
        if method in ("POST", "PUT", "PATCH"):
            query.append(("fieldManager", FIELD_MANAGER))
        try:
            resp = self._api.call_api(
                path, method, query_params=query, body=body,
                header_params={"Accept": "application/json", "Content-Type": content_type},
                auth_settings=["BearerToken"], _preload_content=False, _return_http_data_only=True,
                _request_timeout=(min(10.0, self.timeout), self.timeout),
            )
        except k8s.ApiException as exc:
            raise ApiError(exc.status or 0, method, self.conn.server + path, _json(exc.body)) from None
        except urllib3.exceptions.HTTPError as exc:  # retries spent on connection errors
            raise ConnectionError(f"{method} {self.conn.server}{path}: {exc}") from exc
        return _json(resp.data)

    async def request(self, method: str, path: str, *, body: Any = None, params: Mapping[str, str] | None = None,
                      content_type: str = "application/json") -> Any:
        return await self._in_thread(lambda: self._call(method, path, body, params, content_type))

    async def resource_of(self, obj: Mapping[str, Any]) -> Res:
        """The resource type of a manifest: known, else from the API server's discovery (cached)."""
        known = res_of(obj)
        if known is not None:
            return known
        api_version, kind = obj["apiVersion"], obj["kind"]
        if api_version not in self._discovered:
            group, _, version = api_version.rpartition("/")
            path = f"/apis/{api_version}" if group else f"/api/{version}"
            listing = await self.request("GET", path)
            self._discovered[api_version] = {
                r["kind"]: Res(group, version, r["name"], bool(r.get("namespaced", True)))
                for r in (listing or {}).get("resources", []) if "/" not in r["name"]
            }
        found = self._discovered[api_version].get(kind)
        if found is None:
            raise ApiError(404, "GET", f"{self.conn.server}/apis/{api_version}",
                           {"message": f"the API server serves no kind {kind} in {api_version}"})
        return found

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
        res = await self.resource_of(obj)
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

    async def patch(self, res: Res, namespace: str | None, name: str, body: Mapping[str, Any],
                    sub: str | None = None) -> Any:
        """JSON merge patch of an object (or of a subresource)."""
        return await self.request("PATCH", res.path(namespace, name, sub), body=body,
                                  content_type="application/merge-patch+json")

    async def patch_status(self, res: Res, namespace: str | None, name: str, status: Mapping[str, Any],
                           *, resource_version: str | None = None) -> Any:
        """Merge-patch the status subresource; with ``resource_version`` the API server refuses
        (409) to apply it over a newer object, so a stale pass never overwrites a fresh status."""
        body: dict[str, Any] = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        return await self.patch(res, namespace, name, body, sub="status")

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


def _json(raw: bytes | str | None) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace") if isinstance(raw, bytes) else raw
