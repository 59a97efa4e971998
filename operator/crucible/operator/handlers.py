"""Kopf handlers for the five kinds: thin — everything they do is in :mod:`.reconcile`.

    build_registry(config: OperatorConfig, *, server: str | None = None) -> kopf.OperatorRegistry

Per kind, one timer (every ``config.interval`` seconds, starting as soon as Kopf sees the
object, so a new run gets its Job at once) runs one reconcile pass, and an optional deletion
handler removes the current attempt immediately (owner references would remove it too).
Kopf's progress and diff-base live in ``crucible.dev`` annotations, never in ``status``,
which belongs to the core. One registry per operator instance, so tests can run several
(and restart one) in one process.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from crucible.api import GROUP, KIND_MODELS, VERSION
from crucible.operator.kube import Kube, load_connection
from crucible.operator.metrics import OperatorMetrics
from crucible.operator.reconcile import OperatorConfig, Reconciler

FINALIZER = "crucible.dev/operator"


def build_registry(config: OperatorConfig, *, server: str | None = None,
                   metrics: OperatorMetrics | None = None, metrics_port: int = 0) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    conn = load_connection(server)
    op_metrics = metrics or OperatorMetrics()

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(
            server=conn.server, token=conn.token, scheme="Bearer" if conn.token else None,
            ca_path=conn.ca_path, certificate_path=conn.cert_path, private_key_path=conn.key_path,
            insecure=conn.insecure or None, default_namespace=conn.namespace,
        )

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        settings.persistence.finalizer = FINALIZER
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
        settings.posting.level = logging.WARNING
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        memo.reconciler = Reconciler(Kube(conn), config, op_metrics)
        op_metrics.serve(metrics_port)

    @kopf.on.cleanup(registry=registry)
    async def cleanup(memo: kopf.Memo, **_: Any) -> None:
        reconciler: Reconciler | None = memo.get("reconciler")
        if reconciler is not None:
            await reconciler.close()
            await reconciler.kube.close()

    for model in KIND_MODELS.values():
        _register_kind(registry, model.PLURAL, config)
    return registry


def _register_kind(registry: kopf.OperatorRegistry, plural: str, config: OperatorConfig) -> None:
    @kopf.timer(GROUP, VERSION, plural, id="reconcile", interval=config.interval, initial_delay=0,
                registry=registry)
    async def reconcile(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        await memo.reconciler.reconcile(dict(body))

    @kopf.on.delete(GROUP, VERSION, plural, id="cleanup", optional=True, registry=registry)
    async def delete(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        await memo.reconciler.forget(dict(body))
