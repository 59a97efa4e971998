"""Kopf handlers for the five kinds: thin — everything they do is in :mod:`.reconcile`.

    build_registry(config: OperatorConfig, *, server=None, metrics=None, metrics_port=0)
        -> kopf.OperatorRegistry

Per kind one event handler: a run that appears (at creation, or when the operator starts and
lists what exists) or whose spec changed (``metadata.generation`` ahead of
``status.observedGeneration``) is reconciled at once; a deleted run has its current attempt
removed (owner references remove the rest). Every watch event also refreshes the operator's
view of the run. A change to one of a run's Jobs reconciles that run at once. One ticker
reconciles Running and Restarting runs each ``config.interval`` seconds (pods, nodes, metrics,
hang, backoff) and every other run once per ``config.resync`` seconds; a run that finishes
wakes the runs waiting on it (``fromRun``).

Why not a Kopf timer per run: timers need a finalizer on every run (two more writes per run
and a run that cannot be deleted while the operator is down) and a task per run. Level-
triggered passes over the current state need neither. One registry per operator instance,
so tests can run several (and restart one) in one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Any

import kopf

from crucible.api import GROUP, KIND_MODELS, VERSION
from crucible.operator.kube import Kube, load_connection
from crucible.operator.metrics import OperatorMetrics
from crucible.operator.reconcile import OperatorConfig, Reconciler, job_has_pods
from crucible.operator.render import LABEL_KIND, LABEL_MANAGED_BY, LABEL_RUN, MANAGED_BY

log = logging.getLogger("crucible.operator")
MAX_CONCURRENT_PASSES = 64


def build_registry(config: OperatorConfig, *, server: str | None = None,
                   metrics: OperatorMetrics | None = None, metrics_port: int = 0) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    conn = load_connection(server)
    op_metrics = metrics or OperatorMetrics()

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        # Kopf logs in again on a 401: the token is refreshed then (exec plugin, rotated SA token).
        return kopf.ConnectionInfo(**conn.login_info())

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
        settings.posting.level = logging.WARNING
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        reconciler = Reconciler(Kube(conn, user_agent=config.user_agent), config, op_metrics)
        memo.reconciler = reconciler
        memo.ticker = asyncio.create_task(_tick(reconciler, config.interval))
        op_metrics.serve(metrics_port)

    @kopf.on.cleanup(registry=registry)
    async def cleanup(memo: kopf.Memo, **_: Any) -> None:
        ticker: asyncio.Task[None] | None = memo.get("ticker")
        if ticker is not None:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        reconciler: Reconciler | None = memo.get("reconciler")
        if reconciler is not None:
            await reconciler.close()
            await reconciler.kube.close()

    for model in KIND_MODELS.values():
        _register_kind(registry, model.PLURAL)
    _register_children(registry)
    return registry


def _register_kind(registry: kopf.OperatorRegistry, plural: str) -> None:
    @kopf.on.event(GROUP, VERSION, plural, id="reconcile", registry=registry)
    async def on_event(event: Mapping[str, Any], body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        reconciler: Reconciler = memo.reconciler
        raw = dict(body)
        if event.get("type") == "DELETED":
            await reconciler.forget(raw)
            return
        reconciler.remember(raw)
        if event.get("type") in (None, "ADDED") or _spec_changed(raw):
            await reconciler.reconcile(raw)
        if (raw.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            for waiting in reconciler.dependents(raw):
                await reconciler.reconcile(waiting)


def _register_children(registry: kopf.OperatorRegistry) -> None:
    """A Job of a run changed (pods scheduled, ready, failed, done): reconcile that run now.

    Only Jobs are watched, not Pods: the Job controller mirrors its pods into Job status
    (active, ready, failed, succeeded), and a node lost under a running pod is caught by the
    ticker, which looks at Running runs every tick.
    """
    @kopf.on.event("batch", "v1", "jobs", id="child", labels={LABEL_MANAGED_BY: MANAGED_BY}, registry=registry)
    async def on_job(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        if not job_has_pods(body):
            return  # just created (by this operator): nothing to observe yet
        labels = body.get("metadata", {}).get("labels", {})
        kind, run = labels.get(LABEL_KIND), labels.get(LABEL_RUN)
        namespace = body.get("metadata", {}).get("namespace") or "default"
        reconciler: Reconciler = memo.reconciler
        owner = reconciler.poke(kind, namespace, run) if kind and run else None
        if owner is not None:
            await reconciler.reconcile(owner)


def _spec_changed(body: Mapping[str, Any]) -> bool:
    generation = body.get("metadata", {}).get("generation")
    observed = (body.get("status") or {}).get("observedGeneration")
    return generation is not None and generation != observed


async def _tick(reconciler: Reconciler, interval: float) -> None:
    """Each ``interval`` seconds, reconcile the runs that are due (see Reconciler.due)."""
    limit = asyncio.Semaphore(MAX_CONCURRENT_PASSES)

    async def one(body: Mapping[str, Any]) -> None:
        async with limit:
            try:
                await reconciler.reconcile(body)
            except Exception:
                log.exception("reconcile of %s/%s failed; retrying next tick",
                              body.get("kind"), body.get("metadata", {}).get("name"))

    while True:
        await asyncio.sleep(interval)
        await asyncio.gather(*(one(b) for b in reconciler.due(time.monotonic())))
