"""Load and check Crucible resources offline (``crucible validate FILE|DIR ...``).

``load_resources`` is the one loader every entry point uses (validate, render, the embedded
runner): it reads multi-document YAML from files and folders, validates each document with
the typed models, and checks what only makes sense across documents — duplicate names,
``fromRun`` kinds, and cycles of ``fromRun`` references. Every problem is a ``Problem`` with
the file, the resource, the dotted field and what to do; nothing raises a traceback at a user.
"""

from __future__ import annotations

import argparse
import difflib
import posixpath
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from crucible.api import API_VERSION, KIND_MODELS, Resource, yamlsafe
from crucible.api.common import world_batch_problem

YAML_SUFFIXES = (".yaml", ".yml")
EXIT_BAD_INPUT = 2
"""``crucible validate`` exits 2 on any problem, as ``crucible run`` and the trainer do for bad input."""
# A validator message that starts with "fieldName: " (or "a.b: ") names the field it is about.
_FIELD_PREFIX = re.compile(r"^([a-zA-Z][a-zA-Z0-9]*(?:\.(?:[a-zA-Z][a-zA-Z0-9]*|[0-9]+))*): (.+)$", re.S)
_PATTERN_HINTS = {
    "^([0-9]{1,4}h)?([0-9]{1,6}m)?([0-9]{1,8}s)?$": "is not a duration; write it like 90s, 30m or 1h30m",
    "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$": "must be a DNS label: lowercase letters, digits and '-', starting and ending alphanumeric",
    "^[a-z]([-a-z0-9]*[a-z0-9])?$": ("must be a DNS label starting with a letter (RFC 1035): lowercase letters, digits "
                                     "and '-', ending alphanumeric (it names Services and pods)"),
    "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$": "must be a DNS name: lowercase letters, digits, '-' and '.'",
}


@dataclass(frozen=True)
class Problem:
    file: str
    resource: str  # "Kind/name", or "document N" when it has no usable kind/name
    field: str  # dotted path, "" for the whole document
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        field_part = f" {self.field}:" if self.field else ""
        return f"{where}: {self.resource}:{field_part} {self.message}"


@dataclass
class Loaded:
    """A validated resource and where it came from."""

    resource: Resource
    file: str
    line: int

    @property
    def key(self) -> tuple[str, str]:
        return (self.resource.kind, self.resource.name)


@dataclass
class LoadResult:
    resources: list[Loaded] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class ResourceError(Exception):
    """Raised by :func:`load_or_raise`; its message lists every problem, one per line."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in problems))


def iter_yaml_files(paths: Iterable[str | Path]) -> tuple[list[Path], list[Problem]]:
    files: list[Path] = []
    problems: list[Problem] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in YAML_SUFFIXES and p.is_file())
            if not found:
                problems.append(Problem(str(path), "-", "", "folder holds no .yaml or .yml files"))
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            problems.append(Problem(str(path), "-", "", "no such file or folder"))
    return files, problems


def _dotted(loc: Sequence[Any]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif isinstance(item, str) and ("[" in item or "(" in item or item.startswith("function-")):
            continue  # pydantic's union/validator branch names are noise to a user
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def _known_fields(model: type[BaseModel], loc: Sequence[Any]) -> list[str]:
    """camelCase field names valid at ``loc`` (for 'did you mean')."""
    current: Any = model
    for item in loc[:-1]:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        match = next(
            (f for n, f in current.model_fields.items() if item in (n, f.alias)),
            None,
        )
        if match is None:
            return []
        current = _model_in(match.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [f.alias or n for n, f in current.model_fields.items()]
    return []


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _message(err: Any, model: type[BaseModel]) -> str:
    kind = err["type"]
    msg = str(err["msg"])
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if kind == "extra_forbidden":
        known = _known_fields(model, err["loc"])
        close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
        hint = f"; did you mean {close[0]}?" if close else (f"; known fields: {', '.join(known)}" if known else "")
        return f"unknown field{hint}"
    if kind == "int_parsing_size":
        return f"{err.get('input')!r} is too large; it must fit in a 64-bit integer"
    if kind == "finite_number":
        return f"must be a finite number, got {err.get('input')!r}"
    if kind == "missing":
        return "required field is missing"
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if kind in bounds:
        ctx = err.get("ctx") or {}
        limit = next(iter(ctx.values()), "?")
        return f"must be {bounds[kind]} {limit}, got {err.get('input')!r}"
    if kind in ("too_short", "too_long", "string_too_short", "string_too_long"):
        return f"{msg} (got {err.get('input')!r})"
    if kind == "string_pattern_mismatch":
        pattern = str((err.get("ctx") or {}).get("pattern", ""))
        hint = _PATTERN_HINTS.get(pattern, f"must match {pattern}")
        return f"{err.get('input')!r} {hint}"
    if kind == "literal_error":
        return f"{msg}, got {err.get('input')!r}"
    if kind in ("int_parsing", "int_type", "float_parsing", "bool_parsing", "string_type", "model_type", "dict_type", "list_type"):
        return f"{msg} (got {type(err.get('input')).__name__} {err.get('input')!r})"
    return msg


def _compose(text: str) -> list[Any]:
    """The YAML node tree of each document (for line numbers)."""
    try:
        return list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError:
        return []


def _line_of(node: Any, path: Sequence[Any]) -> int | None:
    """1-based line of the deepest key along ``path`` that exists in the document."""
    if node is None:
        return None
    line = node.start_mark.line + 1
    for part in path:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if getattr(k, "value", None) == part), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _split_field(loc: Sequence[Any], message: str) -> tuple[list[Any], str]:
    """Move a leading "field: " of a validator message into the location."""
    match = _FIELD_PREFIX.match(message)
    if match:
        return [*loc, *(int(p) if p.isdigit() else p for p in match.group(1).split("."))], match.group(2)
    return list(loc), message


def validate_document(
    doc: Any, file: str, index: int, line: int, node: Any = None
) -> tuple[Resource | None, list[Problem]]:
    label = f"document {index + 1}"
    if not isinstance(doc, dict):
        return None, [Problem(file, label, "", f"expected a mapping with apiVersion, kind, metadata, spec; got {type(doc).__name__}", line)]
    kind = doc.get("kind")
    name = (doc.get("metadata") or {}).get("name") if isinstance(doc.get("metadata"), dict) else None
    label = f"{kind if isinstance(kind, str) and kind else '?'}/{name if isinstance(name, str) and name else '?'}"
    problems: list[Problem] = []
    if doc.get("apiVersion") != API_VERSION:
        problems.append(Problem(file, label, "apiVersion", f"must be {API_VERSION}, got {doc.get('apiVersion')!r}", line))
    if not isinstance(kind, str):
        problems.append(Problem(file, label, "kind", f"must be a string such as PretrainRun, got {type(kind).__name__} {kind!r}", line))
    elif kind not in KIND_MODELS:
        close = difflib.get_close_matches(str(kind), list(KIND_MODELS), n=1)
        hint = f"; did you mean {close[0]}?" if close else f"; one of {', '.join(KIND_MODELS)}"
        problems.append(Problem(file, label, "kind", f"unknown kind {kind!r}{hint}", line))
    if problems:
        return None, problems
    model = KIND_MODELS[str(kind)]
    if not isinstance(doc.get("metadata"), dict) or not name:
        return None, [Problem(file, label, "metadata.name", "required field is missing", line)]
    if "spec" not in doc:
        return None, [Problem(file, label, "spec", "required field is missing", line)]
    try:
        return model.model_validate(doc), []
    except ValidationError as exc:
        for err in exc.errors():
            message = _message(err, model)
            loc = [p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-")))]
            if err["type"] == "value_error":
                loc, message = _split_field(loc, message)
            problems.append(Problem(file, label, _dotted(loc), message, _line_of(node, loc) or line))
        return None, problems


def check_graph(loaded: Sequence[Loaded]) -> tuple[list[Problem], list[Problem]]:
    """Duplicate names, fromRun kinds, dangling references and cycles across documents."""
    problems: list[Problem] = []
    warnings: list[Problem] = []
    by_key: dict[tuple[str, str], Loaded] = {}
    for item in loaded:
        if item.key in by_key:
            first = by_key[item.key]
            problems.append(
                Problem(item.file, "/".join(item.key), "metadata.name",
                        f"duplicate {item.key[0]} named {item.key[1]!r} (first defined in {first.file}:{first.line}); rename one", item.line)
            )
        else:
            by_key[item.key] = item
    edges: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for item in by_key.values():
        res = item.resource
        label = "/".join(item.key)
        for path, ref in res.input_refs().items():
            # fromRun kinds were checked by the model; here only what needs the other documents
            target = (ref.kind, ref.name)
            if target == item.key:
                problems.append(Problem(item.file, label, f"spec.{path}.fromRun", "a resource cannot depend on itself", item.line))
                continue
            edges.setdefault(item.key, []).append(target)
            if target not in by_key:
                warnings.append(
                    Problem(item.file, label, f"spec.{path}.fromRun",
                            f"{ref.kind}/{ref.name} is not among these files; it must exist in the cluster (or pass its file too)", item.line)
                )
    problems += _revisions_to_follow(by_key)
    problems += _location_collisions(list(by_key.values()))
    for item in by_key.values():
        batch = world_batch_problem(item.resource.spec)
        if batch:
            warnings.append(Problem(item.file, "/".join(item.key), "spec.training.globalBatchTokens", batch, item.line))
    for cycle in _cycles(edges):
        first = by_key[cycle[0]]
        chain = " -> ".join("/".join(k) for k in [*cycle, cycle[0]])
        problems.append(Problem(first.file, "/".join(cycle[0]), "spec", f"fromRun references form a cycle: {chain}; break it", first.line))
    return problems, warnings


def _revisions_to_follow(by_key: dict[tuple[str, str], Loaded]) -> list[Problem]:
    """A FinetuneRun with ``revisions.follow: model`` needs a model.fromRun run that has revisions: a run
    without them has one output, so on the cluster no second revision would ever start."""
    problems = []
    for item in by_key.values():
        spec = item.resource.spec
        ref = item.resource.input_refs().get("model")
        if getattr(getattr(spec, "revisions", None), "follow", None) != "model" or ref is None:
            continue
        target = by_key.get((ref.kind, ref.name))
        if target is not None and getattr(target.resource.spec, "revisions", None) is None:
            problems.append(Problem(item.file, "/".join(item.key), "spec.revisions.follow",
                                    f"model follows the revisions of {ref.kind}/{ref.name} (model.fromRun), which "
                                    f"declares no spec.revisions ({target.file}:{target.line}); add spec.revisions "
                                    "to it, or use follow: dataset", item.line))
    return problems


def _norm(uri: str) -> str:
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme.lower()}://{posixpath.normpath(rest)}"
    return posixpath.normpath(uri)


def _overlaps(a: str, b: str) -> bool:
    """Equal, or one inside the other (so writing one changes the other)."""
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def _uris(node: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted field, value) of every string ``uri`` in a spec's wire form."""
    out: list[tuple[str, str]] = []
    if isinstance(node, dict):
        for k, v in node.items():
            path = f"{prefix}.{k}" if prefix else k
            if k == "uri" and isinstance(v, str):
                out.append((path, v))
            else:
                out += _uris(v, path)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _uris(v, f"{prefix}[{i}]")
    return out


WRITTEN_FIELDS = ("output.uri", "checkpoint.uri")


def _location_collisions(loaded: Sequence[Loaded]) -> list[Problem]:
    """Outputs that are also inputs (of the same run) or that another run writes too."""
    problems: list[Problem] = []
    writers: list[tuple[str, str, Loaded]] = []  # (normalized uri, field, resource)
    for item in loaded:
        label = "/".join(item.key)
        fields = _uris(item.resource.spec.to_wire())
        written = [(f, _norm(v)) for f, v in fields if f in WRITTEN_FIELDS]
        read = [(f, _norm(v)) for f, v in fields if f not in WRITTEN_FIELDS]
        for wf, w in written:
            for rf, r in read:
                if _overlaps(w, r):
                    problems.append(Problem(item.file, label, f"spec.{wf}", (
                        f"{w} overlaps the run's own input spec.{rf} ({r}); the stage would overwrite or read back "
                        "what it writes. Give the output a folder of its own"), item.line))
        if len(written) == 2 and _overlaps(written[0][1], written[1][1]):
            problems.append(Problem(item.file, label, "spec.checkpoint.uri", (
                f"{written[1][1]} overlaps spec.output.uri ({written[0][1]}); keep checkpoints and the output apart"),
                item.line))
        for wf, w in written:
            for other_uri, other_field, other in writers:
                if other.key != item.key and _overlaps(w, other_uri):
                    problems.append(Problem(item.file, label, f"spec.{wf}", (
                        f"{w} is also where {'/'.join(other.key)} writes (spec.{other_field}, {other.file}:{other.line}); "
                        "two runs sharing an output would report each other's results. Give each its own"), item.line))
            writers.append((w, wf, item))
    return problems


def _cycles(edges: dict[tuple[str, str], list[tuple[str, str]]]) -> list[list[tuple[str, str]]]:
    """Each elementary cycle once (found by DFS colouring; a cycle is reported from its smallest node)."""
    found: list[list[tuple[str, str]]] = []
    seen_sets: set[frozenset[tuple[str, str]]] = set()
    state: dict[tuple[str, str], int] = {}
    stack: list[tuple[str, str]] = []

    def visit(node: tuple[str, str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in edges.get(node, []):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):]
                key = frozenset(cycle)
                if key not in seen_sets:
                    seen_sets.add(key)
                    start = cycle.index(min(cycle))
                    found.append(cycle[start:] + cycle[:start])
            elif state.get(nxt) is None:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if state.get(node) is None:
            visit(node)
    return found


def load_resources(paths: Iterable[str | Path]) -> LoadResult:
    """Read, validate and cross-check every resource under ``paths``."""
    result = LoadResult()
    files, result.problems = iter_yaml_files(paths)
    for path in files:
        name = str(path)
        try:
            text = yamlsafe.read_file(path)
        except UnicodeDecodeError as exc:
            result.problems.append(Problem(name, "-", "", f"not UTF-8 text ({exc.reason} at byte {exc.start})"))
            continue
        except yamlsafe.YamlLimitError as exc:
            result.problems.append(Problem(name, "-", "", str(exc), exc.line))
            continue
        except OSError as exc:
            result.problems.append(Problem(name, "-", "", f"cannot read it ({exc.strerror or exc})"))
            continue
        try:
            docs = yamlsafe.load_all(text)
        except yamlsafe.YamlLimitError as exc:
            result.problems.append(Problem(name, "-", "", str(exc), exc.line))
            continue
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = mark.line + 1 if mark is not None else None
            detail = getattr(exc, "problem", None) or str(exc)
            result.problems.append(Problem(name, "-", "", f"not valid YAML: {detail}", line))
            continue
        if not any(doc is not None for doc in docs):
            result.problems.append(Problem(name, "-", "", "holds no YAML documents (the file is empty); "
                                           "kubectl refuses it too (\"no objects passed\")"))
            continue
        nodes = _compose(text)
        for i, doc in enumerate(docs):
            if doc is None:
                continue
            node = nodes[i] if i < len(nodes) else None
            line = node.start_mark.line + 1 if node is not None else 1
            resource, problems = validate_document(doc, name, i, line, node)
            result.problems.extend(problems)
            if resource is not None:
                result.resources.append(Loaded(resource, name, line))
    graph_problems, result.warnings = check_graph(result.resources)
    result.problems.extend(graph_problems)
    return result


def load_or_raise(paths: Iterable[str | Path]) -> list[Loaded]:
    result = load_resources(paths)
    if result.problems:
        raise ResourceError(result.problems)
    return result.resources


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="FILE|DIR", help="YAML files or folders (searched recursively)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print problems only")


def run(args: argparse.Namespace) -> int:
    result = load_resources(args.paths)
    for problem in result.problems:
        print(problem)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if result.problems:
        print(f"{len(result.problems)} problem(s) in {len(args.paths)} path(s)", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not args.quiet:
        for item in result.resources:
            print(f"ok  {item.file}:{item.line}  {item.resource.kind}/{item.resource.name}")
        print(f"{len(result.resources)} resource(s) valid")
    return 0
