"""``crucible render FILE|DIR ...``: print the Kubernetes objects the operator would create.

The same :func:`crucible.core.plan.plan` and :func:`crucible.operator.render.render` the
operator calls, for attempt ``--attempt`` (default 0). A ``fromRun`` input is shown as the
output URI the referenced run will have (its ``spec.output.uri``, or the default under the
storage root). Owner references carry a placeholder uid unless ``--uid`` is given: the
operator fills in the real one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from crucible.api import Resource
from crucible.api.validate import Loaded, load_resources
from crucible.core.plan import DEFAULT_NAMESPACE, PlanError, default_output_uri, plan
from crucible.operator.render import DEFAULT_IMAGE, RenderSettings, render

DEFAULT_STORAGE_ROOT = "s3://crucible"
ENV_STORAGE_ROOT = "CRUCIBLE_STORAGE_ROOT"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="FILE|DIR", help="YAML files or folders of resources")
    parser.add_argument("--storage-root", default=os.environ.get(ENV_STORAGE_ROOT, DEFAULT_STORAGE_ROOT),
                        help=f"where outputs and checkpoints go when the spec sets none (env {ENV_STORAGE_ROOT}; "
                             f"default {DEFAULT_STORAGE_ROOT})")
    parser.add_argument("--attempt", type=int, default=0, help="attempt number to render (default 0)")
    parser.add_argument("--exclude-node", action="append", default=[], metavar="NODE",
                        help="render as if this node had failed an earlier attempt (repeatable)")
    parser.add_argument("--image", default=DEFAULT_IMAGE, help="trainer image when resources.image is empty")
    parser.add_argument("--uid", default=None, help="uid for the owner references (default: a placeholder)")
    parser.add_argument("-o", "--output", choices=("yaml", "json"), default="yaml", help="output format")


def output_uri_of(resource: Resource, storage_root: str) -> str:
    """The outputURI a run will report: its spec.output.uri or the default under the root."""
    explicit = resource.spec.output.uri
    if explicit:
        return str(explicit)
    ns = resource.metadata.namespace or DEFAULT_NAMESPACE
    return default_output_uri(storage_root, ns, resource.kind, resource.name)


def resolve_inputs(resource: Resource, loaded: Sequence[Loaded], storage_root: str) -> dict[str, str]:
    """Each ``fromRun`` of ``resource`` as the URI the referenced run will report: its
    ``spec.output.uri`` when it is among ``loaded``, else its default output under the root."""
    by_key = {item.key: item.resource for item in loaded}
    inputs: dict[str, str] = {}
    for path, ref in resource.input_refs().items():
        target = by_key.get((ref.kind, ref.name))
        if target is not None:
            inputs[path] = output_uri_of(target, storage_root)
        else:
            ns = resource.metadata.namespace or DEFAULT_NAMESPACE
            inputs[path] = default_output_uri(storage_root, ns, ref.kind, ref.name)
    return inputs


def render_loaded(loaded: Sequence[Loaded], *, storage_root: str, attempt: int = 0,
                  excluded: Sequence[str] = (), settings: RenderSettings | None = None,
                  uid: str | None = None) -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = []
    for item in loaded:
        res = item.resource
        inputs = resolve_inputs(res, loaded, storage_root)
        p = plan(res, storage_root=storage_root, attempt=attempt, excluded_nodes=excluded, inputs=inputs)
        objects += render(res, p, settings=settings, uid=uid).objects()
    return objects


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings (the spec JSON stays readable)."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(objects: Sequence[dict[str, Any]]) -> str:
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False)


def run(args: argparse.Namespace) -> int:
    result = load_resources(args.paths)
    for problem in result.problems:
        print(problem, file=sys.stderr)
    if result.problems:
        print(f"{len(result.problems)} problem(s); nothing rendered", file=sys.stderr)
        return 1
    try:
        objects = render_loaded(result.resources, storage_root=args.storage_root, attempt=args.attempt,
                                excluded=args.exclude_node, settings=RenderSettings(image=args.image), uid=args.uid)
    except PlanError as exc:
        print(f"crucible render: {exc}", file=sys.stderr)
        return 1
    if args.output == "json":
        print(json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}, indent=2))
    else:
        print(to_yaml(objects), end="")
    return 0
