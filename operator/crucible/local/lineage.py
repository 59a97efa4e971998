"""``crucible lineage PATH``: walk a model back to the raw sources it was trained on.

Every stage writes ``_SUCCESS`` last, with ``inputs`` (what it read, each ``{uri, sha256}``:
the sha256 of an upstream output's own ``_SUCCESS``, of a data manifest, of a file) and
``outputs`` (the sha256 of every file it wrote). A DataPipeline output also holds
``manifest.json``: the funnel, each source's licence, consent, origin and raw files with their
sha256, and the tokens each source contributed. Lineage follows ``inputs`` from the model to the
sources, re-hashes whatever it can reach, and says which hashes held, which did not (a tampered
or replaced file) and which it could not check (unreachable, or recorded without a hash).

PATH is an output folder (local or ``s3://``), a run of the embedded work directory
(``NAME`` or ``KIND/NAME``, with ``-w``), or ``KIND/NAME`` on the cluster (``--cluster``: its
``status.outputURI`` is read through the current kubeconfig).

Exit status: 0 every reachable hash held; 1 a hash did not hold; 2 PATH is not a finished output.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUCCESS = "_SUCCESS"
MANIFEST = "manifest.json"
MAX_DEPTH = 32


class LineageError(RuntimeError):
    """PATH cannot be walked at all; the message says why and what to pass instead."""


GROWING_INPUTS = ("spec.dataset", "spec.prompts")
"""Folders of jsonl records that may grow (new files for a later revision): a file added to one after a
run is not what that run read, and not a change to it; a file added to a model folder is."""


@dataclass
class Check:
    what: str  # e.g. "inputs.model", "outputs/model.safetensors", "sources.stdlib/docs.jsonl"
    uri: str
    status: str  # "ok" | "mismatch" | "unchecked"
    detail: str = ""
    field: str = ""  # the spec field the input came from (spec.model.source, ...), when the receipt names it

    def to_json(self) -> dict[str, Any]:
        out = {"what": self.what, "uri": self.uri, "status": self.status, "detail": self.detail}
        if self.field:
            out["field"] = self.field
        return out


@dataclass
class Node:
    uri: str
    stage: str = ""
    run: str = ""
    finished_at: str = ""
    results: dict[str, Any] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    inputs: dict[str, Node] = field(default_factory=dict)
    data: dict[str, Any] | None = None  # the DataPipeline manifest's funnel and sources
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"uri": self.uri, "stage": self.stage, "run": self.run, "finishedAt": self.finished_at,
                               "results": self.results, "checks": [c.to_json() for c in self.checks],
                               "inputs": {k: v.to_json() for k, v in self.inputs.items()}}
        if self.data is not None:
            out["data"] = self.data
        if self.error:
            out["error"] = self.error
        return out

    def all_checks(self) -> list[Check]:
        found = list(self.checks)
        for child in self.inputs.values():
            found += child.all_checks()
        return found


class Reader:
    """Reads local paths and ``s3://`` objects (boto3 only when an s3 uri is met)."""

    def __init__(self) -> None:
        self._store: Any = None

    def _s3(self) -> Any:
        if self._store is None:
            from crucible.trainer.storage import Storage

            self._store = Storage()
        return self._store

    @staticmethod
    def join(uri: str, name: str) -> str:
        return uri.rstrip("/") + "/" + name

    def read(self, uri: str) -> bytes | None:
        try:
            if uri.startswith("s3://"):
                return bytes(self._s3().read_bytes(uri))
            return Path(uri).read_bytes()
        except Exception:  # unreachable is reported as unchecked, never as a crash
            return None

    def sha256(self, uri: str) -> str | None:
        if uri.startswith("s3://"):
            data = self.read(uri)
            return hashlib.sha256(data).hexdigest() if data is not None else None
        path = Path(uri)
        if not path.is_file():
            return None
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()

    def is_dir(self, uri: str) -> bool:
        if uri.startswith("s3://"):
            return self.read(self.join(uri, SUCCESS)) is not None
        return Path(uri).is_dir()


@dataclass
class Entry:
    """One input a receipt names: where it was, its recorded hash and what the hash is of."""

    name: str  # dotted, e.g. inputs.modelSource
    uri: str
    recorded: str | None
    spec_field: str = ""
    hash_of: str = ""  # file | manifest.json | _SUCCESS | files | rawFiles | missing ("" in older receipts)
    files: dict[str, str] = field(default_factory=dict)


def _input_entries(inputs: Any, prefix: str = "inputs") -> list[Entry]:
    """Every input a receipt names (``{uri, sha256, ...}`` entries, and the flat form of older receipts)."""
    found: list[Entry] = []
    if isinstance(inputs, dict):
        if isinstance(inputs.get("uri"), str):
            recorded = inputs.get("sha256")
            files = inputs.get("files")
            found.append(Entry(prefix, inputs["uri"], recorded if isinstance(recorded, str) else None,
                               str(inputs.get("field") or ""), str(inputs.get("hashOf") or ""),
                               {str(k): str(v) for k, v in files.items()} if isinstance(files, dict) else {}))
            return found
        for key, value in inputs.items():
            if isinstance(value, str) and key.endswith("Sha256"):
                continue  # a flat receipt's hash, attached to its uri below
            name = f"{prefix}.{key}"
            if isinstance(value, str) and (value.startswith(("s3://", "/")) or "/" in value):
                flat_hash = inputs.get(f"{key}Sha256") or inputs.get(f"{key}ManifestSha256")
                found.append(Entry(name, value, flat_hash if isinstance(flat_hash, str) else None))
            elif isinstance(value, dict | list):
                found += _input_entries(value, name)
    elif isinstance(inputs, list):
        for i, value in enumerate(inputs):
            found += _input_entries(value, f"{prefix}[{i}]")
    return found


def _fix(entry: Entry, node: Node) -> str:
    """What to do about an input that changed since ``node``'s run read it."""
    who = f"run {node.run} again" if node.run else f"run the {node.stage or 'stage'} again"
    where = f" ({entry.spec_field})" if entry.spec_field else ""
    return f"restore the input{where} to what the run read, or {who} to train on what is there now"


class Walker:
    def __init__(self, reader: Reader | None = None) -> None:
        self.reader = reader or Reader()
        self.seen: dict[str, Node] = {}

    def walk(self, uri: str, depth: int = 0) -> Node:
        uri = uri.rstrip("/") if uri != "/" else uri
        if uri in self.seen:
            return self.seen[uri]
        node = Node(uri=uri)
        self.seen[uri] = node
        raw = self.reader.read(self.reader.join(uri, SUCCESS))
        if raw is None:
            node.error = f"no {SUCCESS} at {uri}: not a finished Crucible output (or unreachable)"
            return node
        try:
            receipt = json.loads(raw)
        except ValueError as exc:
            node.error = f"{uri}/{SUCCESS} is not JSON ({exc}): the receipt is damaged"
            return node
        node.stage = str(receipt.get("stage", ""))
        node.run = str(receipt.get("run", "") or "")
        node.finished_at = str(receipt.get("finishedAt", ""))
        node.results = receipt.get("results") or {}
        self._check_outputs(node, receipt.get("outputs"))
        if node.stage == "data":
            self._data(node)
        if depth >= MAX_DEPTH:
            node.error = f"stopped after {MAX_DEPTH} levels"
            return node
        checked_sources = set((node.data or {}).get("sourcesWithRawFiles", []))
        for entry in _input_entries(receipt.get("inputs") or {}):
            if entry.name.removeprefix("inputs.sources.") in checked_sources:
                continue  # its raw files are checked one by one from the manifest
            self._input(node, entry, depth)
        return node

    def _input(self, node: Node, entry: Entry, depth: int) -> None:
        reader = self.reader
        name, uri, recorded = entry.name, entry.uri, entry.recorded
        fix = _fix(entry, node)
        if entry.hash_of == "missing":
            node.checks.append(Check(name, uri, "unchecked", "nothing was there when the run read it", entry.spec_field))
            return
        if entry.hash_of == "files":
            self._input_files(node, entry, fix)
            if reader.read(reader.join(uri, SUCCESS)) is not None:
                node.inputs[name] = self.walk(uri, depth + 1)
            return
        is_file = entry.hash_of == "file" or uri.endswith((".jsonl", ".json", ".gguf", ".txt"))
        upstream = reader.read(reader.join(uri, SUCCESS)) if not is_file else None
        if upstream is not None:
            receipt_hash = hashlib.sha256(upstream).hexdigest()
            manifest = reader.read(reader.join(uri, MANIFEST))
            manifest_hash = hashlib.sha256(manifest).hexdigest() if manifest is not None else None
            if recorded and (entry.hash_of == MANIFEST or recorded == manifest_hash):
                node.checks.append(_compare(f"{name} (its {MANIFEST})", reader.join(uri, MANIFEST), recorded,
                                            manifest_hash, entry.spec_field, fix))
            else:
                node.checks.append(_compare(f"{name} (its {SUCCESS})", reader.join(uri, SUCCESS), recorded,
                                            receipt_hash, entry.spec_field, fix))
            node.inputs[name] = self.walk(uri, depth + 1)
            return
        actual = reader.sha256(uri)
        if actual is None and reader.is_dir(uri):
            node.checks.append(Check(name, uri, "unchecked", "a folder without a receipt", entry.spec_field))
            return
        node.checks.append(_compare(name, uri, recorded, actual, entry.spec_field, fix))

    def _input_files(self, node: Node, entry: Entry, fix: str) -> None:
        """A folder recorded file by file (a model or tokenizer folder that no Crucible stage wrote):
        each file re-hashed and named, and on a local disk any file added since."""
        reader = self.reader
        for rel, recorded in sorted(entry.files.items()):
            uri = reader.join(entry.uri, rel)
            node.checks.append(_compare(f"{entry.name} {rel}", uri, recorded, reader.sha256(uri), entry.spec_field, fix))
        root = Path(entry.uri)
        if entry.uri.startswith("s3://") or not root.is_dir():
            return
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root).as_posix()
            if (path.is_file() and rel not in entry.files and rel != SUCCESS and not path.name.endswith(".tmp")
                    and rel.split("/")[0] not in ("checkpoints", "_work")):
                if entry.spec_field in GROWING_INPUTS:
                    # records that arrived later (a later revision's data): what this run read is intact
                    node.checks.append(Check(f"{entry.name} {rel}", str(path), "unchecked",
                                             "added since the run (not among the files it read)", entry.spec_field))
                    continue
                node.checks.append(Check(f"{entry.name} {rel}", str(path), "mismatch",
                                         f"added since the run (not among the files it read); {fix}", entry.spec_field))

    def _check_outputs(self, node: Node, outputs: Any) -> None:
        if not isinstance(outputs, dict) or not outputs:
            node.checks.append(Check("outputs", node.uri, "unchecked", "the receipt lists no output hashes"))
            return
        for rel, recorded in sorted(outputs.items()):
            actual = self.reader.sha256(self.reader.join(node.uri, rel))
            node.checks.append(_compare(f"outputs/{rel}", self.reader.join(node.uri, rel), str(recorded), actual))

    def _data(self, node: Node) -> None:
        raw = self.reader.read(self.reader.join(node.uri, MANIFEST))
        if raw is None:
            node.checks.append(Check(MANIFEST, node.uri, "unchecked", "manifest.json unreachable"))
            return
        recorded = node.results.get("manifestSha256")
        node.checks.append(_compare(MANIFEST, self.reader.join(node.uri, MANIFEST),
                                    recorded if isinstance(recorded, str) else None, hashlib.sha256(raw).hexdigest()))
        manifest = json.loads(raw)
        tokens_total = sum(int(s.get("tokens", {}).get("train", 0)) for s in (manifest.get("sources") or {}).values())
        sources: dict[str, Any] = {}
        for name, src in (manifest.get("sources") or {}).items():
            train_tokens = int(src.get("tokens", {}).get("train", 0))
            sources[name] = {
                "license": src.get("license"), "consent": src.get("consent"), "origin": src.get("origin"),
                "documentsIn": src.get("documentsIn"), "documentsOut": src.get("documentsOut"),
                "trainTokens": train_tokens,
                "trainTokenShare": round(train_tokens / tokens_total, 4) if tokens_total else 0.0,
            }
            for raw_file in src.get("rawFiles") or []:
                uri = str(raw_file.get("uri", ""))
                node.checks.append(_compare(f"sources.{name} raw file", uri, raw_file.get("sha256"),
                                            self.reader.sha256(uri)))
        for split, info in (manifest.get("splits") or {}).items():
            for shard in info.get("shards") or []:
                rel = f"{split}/{shard.get('name')}.bin"
                uri = self.reader.join(node.uri, rel)
                node.checks.append(_compare(f"shards/{rel}", uri, shard.get("sha256"), self.reader.sha256(uri)))
        node.data = {"funnel": manifest.get("funnel") or [], "sources": sources,
                     "sourcesWithRawFiles": [n for n, src in (manifest.get("sources") or {}).items() if src.get("rawFiles")],
                     "documentsIn": manifest.get("documentsIn"), "documentsOut": manifest.get("documentsOut")}


def _compare(what: str, uri: str, recorded: str | None, actual: str | None, field: str = "", fix: str = "") -> Check:
    if actual is None:
        return Check(what, uri, "unchecked", "unreachable", field)
    if not recorded:
        return Check(what, uri, "unchecked", f"no hash recorded (now {actual[:12]})", field)
    if recorded == actual:
        return Check(what, uri, "ok", actual[:12], field)
    detail = f"recorded {recorded[:12]}, now {actual[:12]}: changed since the run"
    return Check(what, uri, "mismatch", f"{detail}; {fix}" if fix else detail, field)


# -- text ----------------------------------------------------------------------------------

MARK = {"ok": "✓", "mismatch": "✗", "unchecked": "?"}


def render(node: Node, indent: str = "", name: str = "", printed: set[str] | None = None) -> list[str]:
    printed = set() if printed is None else printed
    head = f"{indent}{name + ': ' if name else ''}{node.stage or '?'} {node.run or ''} {node.uri}".rstrip()
    lines = [head + (f"  (finished {node.finished_at})" if node.finished_at else "")]
    pad = indent + "    "
    if node.error:
        lines.append(f"{pad}! {node.error}")
    if node.uri in printed:
        lines.append(f"{pad}(shown above)")
        return lines
    printed.add(node.uri)
    bad = [c for c in node.checks if c.status == "mismatch"]
    ok = sum(c.status == "ok" for c in node.checks)
    unchecked = [c for c in node.checks if c.status == "unchecked"]
    lines.append(f"{pad}hashes: {ok} ok, {len(bad)} changed, {len(unchecked)} not checked")
    lines += [f"{pad}{MARK[c.status]} {c.what}{f' ({c.field})' if c.field else ''}: {c.detail}  [{c.uri}]"
              for c in bad + unchecked]
    if node.data is not None:
        lines.append(f"{pad}funnel: {node.data.get('documentsIn')} raw documents -> {node.data.get('documentsOut')} kept")
        for row in node.data["funnel"]:
            dropped = sum(int(v) for v in (row.get("dropped") or {}).values())
            if dropped:
                lines.append(f"{pad}  {row.get('step')}: -{dropped}")
        for src_name, src in node.data["sources"].items():
            lines.append(f"{pad}source {src_name}: licence {src['license'] or 'not declared'}, consent "
                         f"{src['consent'] or 'not declared'}, origin {src['origin'] or 'not declared'}; "
                         f"{src['trainTokenShare']:.1%} of training tokens ({src['trainTokens']})")
    for input_name, child in node.inputs.items():
        lines += render(child, pad, input_name.removeprefix("inputs."), printed)
    return lines


# -- the command ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH",
                        help="an output folder (local or s3://), a run of the work directory (NAME or KIND/NAME), "
                             "or KIND/NAME on the cluster with --cluster")
    from crucible.local.cli_common import add_workdir_argument

    add_workdir_argument(parser)
    parser.add_argument("--cluster", action="store_true", help="read KIND/NAME's status.outputURI from the cluster")
    parser.add_argument("-n", "--namespace", default="default", help="namespace of KIND/NAME (default: default)")
    parser.add_argument("--json", action="store_true", help="the chain as JSON")


def resolve(args: argparse.Namespace) -> str:
    path = args.path
    if path.startswith("s3://") or Path(path).exists():
        return path
    if args.cluster:
        uri, args.revisions = _cluster_output(path, args.namespace)
        return uri
    from crucible.local.cli_common import find_workdir
    from crucible.local.workdir import WorkDir

    root = find_workdir(args.workdir)
    if root is None:
        raise LineageError(f"{path}: not a folder, and no work directory to find it in (pass -w)")
    workdir = WorkDir(root)
    kind, _, name = path.rpartition("/")
    matches = [s for s in workdir.find(name) if not kind or s.kind.lower() == kind.lower()]
    if not matches:
        raise LineageError(f"{path}: neither a folder nor a run of the work directory {root}; "
                           "pass an output folder, NAME or KIND/NAME (crucible status lists them)")
    if len(matches) > 1:
        raise LineageError(f"{path}: several runs match ({', '.join(f'{s.kind}/{s.name}' for s in matches)}); "
                           "name it as KIND/NAME")
    state = matches[0]
    uri = state.status.output_uri or str(workdir.run_dir(state.namespace, state.kind, state.name) / "output")
    args.revisions = [r.model_dump(mode="json", by_alias=True) for r in state.status.revisions]
    return uri


def render_revisions(revisions: list[dict[str, Any]]) -> list[str]:
    """The logged revisions of a run (status.revisions), newest first."""
    lines = ["revisions (status.revisions):"]
    for r in reversed(revisions):
        finetune = r.get("evalMetric") == "loss"  # a FinetuneRun's: records of a dataset, not documents of a manifest
        parts = [f"  revision {r['revision']}: {r.get('outputURI')}", f"finished {r.get('finishedAt')}"]
        if r.get("modelURI"):
            parts.append(f"from {r['modelURI']}")
        if r.get("dataManifestSha256"):
            parts.append(f"{'dataset' if finetune else 'data manifest'} {r['dataManifestSha256'][:12]}")
        if r.get("newTokens") is not None:
            parts.append(f"{r['newTokens']} new {'trained ' if finetune else ''}tokens")
        if r.get("documentsSeenEarlier"):
            parts.append(f"{r['documentsSeenEarlier']} {'records' if finetune else 'documents'} seen in earlier "
                         "revisions dropped")
        if r.get("evalAfter") is not None:
            before = f"{r['evalBefore']:.2f}" if r.get("evalBefore") is not None else "-"
            parts.append(f"held-out {r.get('evalMetric') or 'perplexity'} {before} -> {r['evalAfter']:.2f}")
        if r.get("receiptSha256"):
            parts.append(f"receipt {r['receiptSha256'][:12]}")
        lines.append(", ".join(parts))
    return lines


def _cluster_output(path: str, namespace: str) -> tuple[str, list[dict[str, Any]]]:
    kind, _, name = path.partition("/")
    if not name:
        raise LineageError(f"{path}: with --cluster, name the run as KIND/NAME (e.g. PretrainRun/my-run)")
    try:
        from kubernetes import client, config  # type: ignore[import-not-found]
    except ImportError as exc:
        raise LineageError("--cluster needs the kubernetes client: pip install 'crucible[operator]'") from exc
    config.load_kube_config()
    plural = kind.lower() + ("es" if kind.lower().endswith("s") else "s")
    obj = client.CustomObjectsApi().get_namespaced_custom_object("crucible.dev", "v1alpha1", namespace, plural, name)
    uri = (obj.get("status") or {}).get("outputURI")
    if not uri:
        raise LineageError(f"{kind}/{name} in {namespace} has no status.outputURI yet: it has not succeeded")
    return str(uri), list((obj.get("status") or {}).get("revisions") or [])


def run(args: argparse.Namespace) -> int:
    try:
        uri = resolve(args)
    except LineageError as exc:
        print(f"crucible lineage: {exc}", file=sys.stderr)
        return 2
    root = Walker().walk(uri)
    if root.error and not root.stage:
        print(f"crucible lineage: {root.error}", file=sys.stderr)
        return 2
    checks = root.all_checks()
    revisions = getattr(args, "revisions", None) or []
    if args.json:
        doc = root.to_json()
        if revisions:
            doc["revisions"] = revisions
        print(json.dumps(doc, indent=2, default=str))
    else:
        print("\n".join(render(root)))
        if revisions:
            print("\n".join(render_revisions(revisions)))
        bad = [c for c in checks if c.status == "mismatch"]
        unchecked = [c for c in checks if c.status == "unchecked"]
        print(f"\n{sum(c.status == 'ok' for c in checks)} hash(es) verified, {len(bad)} changed, "
              f"{len(unchecked)} not checked")
    return 1 if any(c.status == "mismatch" for c in checks) else 0
