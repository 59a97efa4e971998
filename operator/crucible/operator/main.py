"""``crucible operator``: run the Kopf operator against the current cluster.

Flags match the Helm chart's Deployment. With ``--peering NAME`` (the default, ``crucible``)
only the highest-priority replica of the operator is active (Kopf peering; the chart installs
the KopfPeering CRDs); ``--standalone`` turns peering off.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

from crucible.operator.reconcile import OperatorConfig
from crucible.operator.render import DEFAULT_IMAGE, RenderSettings
from crucible.operator.render_cli import DEFAULT_STORAGE_ROOT, ENV_STORAGE_ROOT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[], help="watch this namespace (repeatable)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace (default)")
    peer = parser.add_mutually_exclusive_group()
    peer.add_argument("--peering", default="crucible", help="Kopf peering name: one active replica (default crucible)")
    peer.add_argument("--standalone", action="store_true", help="no peering (a single replica)")
    parser.add_argument("--priority", type=int, default=0, help="peering priority of this replica")
    parser.add_argument("--liveness", default=None, help="liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    parser.add_argument("--metrics-port", type=int, default=int(os.environ.get("CRUCIBLE_OPERATOR_METRICS_PORT", "9090")),
                        help="port of the operator's /metrics (0: off)")
    parser.add_argument("--storage-root", default=os.environ.get(ENV_STORAGE_ROOT, DEFAULT_STORAGE_ROOT),
                        help=f"where outputs and checkpoints go when a spec sets none (env {ENV_STORAGE_ROOT})")
    parser.add_argument("--image", default=os.environ.get("CRUCIBLE_TRAINER_IMAGE", DEFAULT_IMAGE),
                        help="trainer image when resources.image is empty (env CRUCIBLE_TRAINER_IMAGE)")
    parser.add_argument("--storage-secret", default=os.environ.get("CRUCIBLE_STORAGE_SECRET") or None,
                        help="Secret with AWS_* keys for runs whose spec names none (env CRUCIBLE_STORAGE_SECRET)")
    parser.add_argument("--service-account", default=os.environ.get("CRUCIBLE_TRAINER_SERVICE_ACCOUNT") or None,
                        help="service account of the trainer pods")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between reconcile passes of a run")
    parser.add_argument("--server", default=None, help="API server URL (default: in-cluster or kubeconfig)")
    parser.add_argument("--verbose", action="store_true", help="log more")
    parser.add_argument("--debug", action="store_true", help="log everything")


def config_from_args(args: argparse.Namespace) -> OperatorConfig:
    return OperatorConfig(
        storage_root=args.storage_root,
        render=RenderSettings(image=args.image, service_account=args.service_account),
        interval=args.interval,
        default_credentials_secret=args.storage_secret,
        user_agent=f"crucible-operator/{os.environ.get('HOSTNAME', 'local')}",
    )


def run(args: argparse.Namespace) -> int:
    import kopf

    from crucible.operator.handlers import build_registry

    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    registry = build_registry(config_from_args(args), server=args.server, metrics_port=args.metrics_port)
    asyncio.run(kopf.operator(
        registry=registry,
        standalone=args.standalone,
        peering_name=None if args.standalone else args.peering,
        priority=args.priority,
        liveness_endpoint=args.liveness,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
    ))
    return 0
