"""Decontamination: training text that shares a word n-gram with an evaluation set.

Words are the lowercase ``\\w+`` runs of the text; an n-gram is ``ngram`` consecutive words,
hashed (xxh3 per word, a polynomial over the window, splitmix finalizer). An evaluation record
shorter than ``ngram`` words (a short question) contributes its whole word sequence, if it has
at least :data:`MIN_WORDS` words, and training text is searched for sequences of that length
too. A training document containing any of a set's n-grams is contaminated by that set: it is
dropped with reason ``contaminated:<set>`` (the first set in spec order that matches), or with
``action: redact`` the matching word spans are cut out of it (dropped as
``empty_after_decontamination`` if nothing is left).

Sets: files (``uri``), an lm-evaluation-harness task's evaluation documents (``harnessTask``;
the prompt joined with the gold answer, data local only), and the run's own validation split
(``validation: true``), which the tokenize stage checks the train split against: each filter
part writes the n-grams of its documents that will be held out (:func:`save_table`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from crucible.trainer.config.data import DecontaminationSet, DecontaminationStep, SourceConfig
from crucible.trainer.data import private_tmp
from crucible.trainer.data.document import Document
from crucible.trainer.data.minhash import mix64
from crucible.trainer.data.step import Step
from crucible.trainer.stage_io import SUCCESS, SpecError
from crucible.trainer.storage import Storage

log = logging.getLogger("crucible.data")

MIN_WORDS = 5
_WORD = re.compile(r"\w+")
_MULT = np.uint64(0x9E3779B97F4A7C15)


class EvalSetError(SpecError):
    """An evaluation set that cannot be read (exit 2); the message names the field."""


def words_of(text: str) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """(hash of every word (W,), character span of every word)."""
    spans, hashes = [], []
    for m in _WORD.finditer(text):  # spans of the text itself: lower() may change lengths
        spans.append(m.span())
        hashes.append(xxhash.xxh3_64_intdigest(m.group().lower().encode("utf-8", "surrogatepass")))
    return np.array(hashes, dtype=np.uint64), spans


def window_hashes(words: np.ndarray, n: int) -> np.ndarray:
    """Hash of every window of ``n`` consecutive words (W - n + 1,); the length is mixed in."""
    if len(words) < n:
        return np.zeros(0, np.uint64)
    with np.errstate(over="ignore"):
        acc = words[: len(words) - n + 1].copy()
        for k in range(1, n):
            acc = acc * _MULT + words[k : len(words) - n + 1 + k]
        return mix64(acc ^ np.uint64(n))


def gram_table(texts: Iterable[str], n: int) -> tuple[dict[int, np.ndarray], Counter[str]]:
    """{window length: sorted unique hashes} of evaluation texts, and counts (records, short)."""
    found: dict[int, list[np.ndarray]] = {}
    counts: Counter[str] = Counter()
    for text in texts:
        counts["records"] += 1
        words, _ = words_of(text)
        if len(words) >= n:
            found.setdefault(n, []).append(window_hashes(words, n))
        elif len(words) >= MIN_WORDS:
            found.setdefault(len(words), []).append(window_hashes(words, len(words)))
        else:
            counts["tooShort"] += 1
    return {length: np.unique(np.concatenate(parts)) for length, parts in sorted(found.items())}, counts


def keyed_grams(docs: Iterable[tuple[int, str]], n: int) -> dict[str, np.ndarray]:
    """The n-grams of held-out documents with their document keys, saved by a filter part
    (``n<L>``: hashes of windows of L words, ``k<L>``: the key of each), so that the n-grams of
    documents dedup later removes can be left out (:func:`held_out_table`)."""
    grams: dict[int, list[np.ndarray]] = {}
    keys: dict[int, list[np.ndarray]] = {}
    for key, text in docs:
        words, _ = words_of(text)
        length = n if len(words) >= n else len(words)
        if length < MIN_WORDS:
            continue
        w = window_hashes(words, length)
        grams.setdefault(length, []).append(w)
        keys.setdefault(length, []).append(np.full(len(w), key, np.uint64))
    out: dict[str, np.ndarray] = {}
    for length in sorted(grams):
        out[f"n{length}"] = np.concatenate(grams[length])
        out[f"k{length}"] = np.concatenate(keys[length])
    return out


def held_out_table(parts: Iterable[tuple[dict[str, np.ndarray], Any]]) -> dict[int, np.ndarray]:
    """Merge filter parts' :func:`keyed_grams`, without the grams of documents whose key the
    part's drop decisions (``reasons(keys) -> codes``) remove."""
    found: dict[int, list[np.ndarray]] = {}
    for arrays, decisions in parts:
        for name in arrays:
            if not name.startswith("n"):
                continue
            keep = decisions.reasons(arrays["k" + name[1:]]) == 0
            found.setdefault(int(name[1:]), []).append(arrays[name][keep])
    return {length: np.unique(np.concatenate(g)) for length, g in sorted(found.items())}


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = private_tmp(path)
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]
    os.replace(tmp, path)


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def table_sha256(table: dict[int, np.ndarray]) -> str:
    h = hashlib.sha256()
    for length, grams in sorted(table.items()):
        h.update(int(length).to_bytes(4, "little"))
        h.update(np.ascontiguousarray(grams, np.uint64).tobytes())
    return h.hexdigest()


def merge_tables(tables: Iterable[dict[int, np.ndarray]]) -> dict[int, np.ndarray]:
    parts: dict[int, list[np.ndarray]] = {}
    for t in tables:
        for length, grams in t.items():
            parts.setdefault(length, []).append(grams)
    return {length: np.unique(np.concatenate(g)) for length, g in sorted(parts.items())}


def save_table(path: Path, table: dict[int, np.ndarray]) -> None:
    tmp = private_tmp(path)
    with open(tmp, "wb") as f:
        np.savez(f, **{f"n{length}": grams for length, grams in table.items()})  # type: ignore[arg-type]
    os.replace(tmp, path)


def load_table(path: Path) -> dict[int, np.ndarray]:
    with np.load(path) as z:
        return {int(k[1:]): z[k] for k in z.files}


def _hits(table: dict[int, np.ndarray], words: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """[(window length, start index of every matching window)]."""
    out = []
    for length, grams in table.items():
        if len(words) < length or not len(grams):
            continue
        windows = window_hashes(words, length)
        idx = np.minimum(np.searchsorted(grams, windows), len(grams) - 1)
        starts = np.flatnonzero(grams[idx] == windows)
        if len(starts):
            out.append((length, starts))
    return out


def redact(text: str, spans: Sequence[tuple[int, int]], hits: list[tuple[int, np.ndarray]]) -> str:
    """``text`` with every matching window's words (and the text between them) cut out."""
    covered = np.zeros(len(spans) + 1, np.int64)
    for length, starts in hits:
        np.add.at(covered, starts, 1)
        np.add.at(covered, starts + length, -1)
    mask = np.cumsum(covered)[: len(spans)] > 0
    pieces, pos, i = [], 0, 0
    while i < len(spans):
        if not mask[i]:
            i += 1
            continue
        j = i
        while j + 1 < len(spans) and mask[j + 1]:
            j += 1
        pieces.append(text[pos : spans[i][0]])
        pos = spans[j][1]
        i = j + 1
    if not pieces:
        return text
    out = pieces[0]
    for piece in [*pieces[1:], text[pos:]]:
        out = out.rstrip(" \t") + " " + piece.lstrip(" \t")
    return out.strip()


@dataclass
class EvalSet:
    """One evaluation set's n-gram table and what it was built from."""

    name: str
    kind: str  # file | harness | validation
    origin: str
    table: dict[int, np.ndarray]
    counts: Counter[str] = field(default_factory=Counter)
    inputs: list[dict[str, Any]] = field(default_factory=list)  # files: {"uri", "sha256", "bytes"}

    def receipt(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
            "origin": self.origin,
            "records": int(self.counts["records"]),
            "recordsTooShort": int(self.counts["tooShort"]),
            "ngrams": int(sum(len(g) for g in self.table.values())),
            "ngramsSha256": table_sha256(self.table),
        }
        if self.inputs:
            out["files"] = self.inputs
        return out


def file_texts(dset_name: str, uri: str, fields: list[str], storage: Storage, where: str,
                inputs: list[dict[str, Any]]) -> Iterable[str]:
    """Texts of evaluation (or reference) files; every file's sha256 goes into ``inputs``."""
    from crucible.trainer.data.readers import DocumentReader, SourceError, _Opened, list_inputs
    from crucible.trainer.data.shards import sha256_file

    source = SourceConfig(name=dset_name, uri=uri, text_field=fields[0])
    try:
        files = list_inputs([source], storage)
    except SourceError as exc:
        raise EvalSetError(str(exc).replace("sources[0].uri", f"{where}.uri")) from exc
    reader = DocumentReader(storage, 10**9, extra_fields=fields[1:])
    for item in files:
        with _Opened(item, storage) as path:
            inputs.append({"uri": item.uri, "sha256": sha256_file(path), "bytes": os.path.getsize(path)})
        for doc in reader.read(item):
            yield " ".join([doc.text, *(str(doc.meta.get(f, "")) for f in fields[1:])]).strip()
    if sum(reader.errors.counts.values()):
        log.warning("%s: %d unreadable records skipped (%s)", where, sum(reader.errors.counts.values()),
                    dict(reader.errors.counts))


def harness_texts(task: str, task_dir: str | None, where: str) -> tuple[list[str], str]:
    """(prompt + gold answer of every evaluation document of an lm-eval task, origin)."""
    try:
        from lm_eval.tasks import TaskManager  # type: ignore[import-not-found]
    except ImportError as exc:
        raise EvalSetError(f"{where}.harnessTask: needs lm-evaluation-harness: pip install 'crucible[eval]'") from exc
    if task_dir is not None and not Path(task_dir).is_dir():
        raise EvalSetError(f"{where}.harnessTaskDir: {task_dir} is not a folder")
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    manager = TaskManager(include_path=task_dir, include_defaults=False) if task_dir else None
    if manager is None or task not in manager.all_tasks:
        manager = TaskManager(include_path=task_dir) if task_dir else TaskManager()
    if task not in manager.all_tasks:
        raise EvalSetError(f"{where}.harnessTask: {task!r} is not an lm-evaluation-harness task"
                           + (f" nor defined in {task_dir}" if task_dir else "; define it in harnessTaskDir"))
    try:
        loaded = manager.load([task])["tasks"]
    except (ConnectionError, FileNotFoundError, OSError, ValueError) as exc:
        raise EvalSetError(f"{where}.harnessTask {task!r}: the task's data is not available locally ({exc}); "
                           "nothing is downloaded") from exc
    obj = loaded[task]
    texts = []
    for doc in obj.eval_docs:
        prompt = obj.doc_to_text(doc)
        target = obj.doc_to_target(doc)
        if getattr(obj, "OUTPUT_TYPE", None) == "multiple_choice" or obj.config.output_type == "multiple_choice":
            choices = obj.doc_to_choice(doc)
            if isinstance(target, int) and 0 <= target < len(choices):
                target = choices[target]
        if isinstance(target, list):
            target = " ".join(str(t) for t in target)
        texts.append(f"{prompt} {target}")
    return texts, f"lm-eval:{task}" + (f" ({task_dir})" if task_dir else "")


def load_set(dset: DecontaminationSet, index: int, n: int, storage: Storage) -> EvalSet | None:
    """The n-gram table of a file or harness set; None for the validation set (built per part)."""
    where = f"steps.decontamination.sets[{index}]"
    if dset.validation:
        return None
    inputs: list[dict[str, Any]] = []
    if dset.uri is not None:
        texts: Iterable[str] = file_texts(dset.name, dset.uri, dset.text_fields, storage, where, inputs)
        kind, origin = "file", dset.uri
    else:
        assert dset.harness_task is not None
        texts, origin = harness_texts(dset.harness_task, dset.harness_task_dir, where)
        kind = "harness"
    table, counts = gram_table(texts, n)
    if not counts["records"]:
        raise EvalSetError(f"{where}: the set {dset.name!r} has no records; check its uri or task")
    return EvalSet(dset.name, kind, origin, table, counts, inputs)


class Decontaminator(Step):
    """Drops or redacts documents that share an n-gram with one of the sets (spec order)."""

    name = "decontamination"

    def __init__(self, config: DecontaminationStep, sets: list[EvalSet]) -> None:
        super().__init__()
        self.config = config
        self.sets = sets
        self.documents: Counter[str] = Counter()  # contaminated documents per set

    def check(self, text: str) -> tuple[str | None, str]:
        """(first contaminating set or None, the text after redaction)."""
        words, spans = words_of(text)
        first: str | None = None
        all_hits: list[tuple[int, np.ndarray]] = []
        for s in self.sets:
            hits = _hits(s.table, words)
            if hits:
                self.documents[s.name] += 1
                first = first or s.name
                all_hits += hits
        if first is None or self.config.action == "drop":
            return first, text
        return first, redact(text, spans, all_hits)

    def process(self, doc: Document) -> str | None:
        first, text = self.check(doc.text)
        if first is None:
            return None
        if self.config.action == "drop":
            return f"contaminated:{first}"
        self.stats.changes[f"redacted:{first}"] += 1
        doc.text = text
        return "empty_after_decontamination" if not text.strip() else None

    def summary(self) -> dict[str, int]:
        return dict(sorted(self.documents.items()))


# -- what evaluating stages record ---------------------------------------------------------------


def _data_manifests(roots: Sequence[str], store: Storage, depth: int = 8) -> list[tuple[str, dict[str, Any]]]:
    """The DataPipeline manifests behind ``roots`` (data outputs, or models whose ``_SUCCESS``
    inputs lead to them), following ``_SUCCESS`` inputs up to ``depth`` stages back."""
    import json

    from crucible.trainer.storage import StorageError, join

    found: list[tuple[str, dict[str, Any]]] = []
    seen: set[str] = set()

    def uris_in(value: Any) -> Iterable[str]:
        if isinstance(value, str) and value and not value.startswith("sha256:"):
            yield value
        elif isinstance(value, dict):
            if isinstance(value.get("uri"), str):
                yield value["uri"]
            else:
                for v in value.values():
                    yield from uris_in(v)

    def visit(uri: str, left: int) -> None:
        key = uri.rstrip("/")
        if key in seen or left < 0:
            return
        seen.add(key)
        for name in ("manifest.json", SUCCESS):
            try:
                data = json.loads(store.read_bytes(join(uri, name)))
            except (StorageError, OSError, ValueError):
                continue
            if name == "manifest.json" and isinstance(data, dict) and data.get("format") == "crucible-data-manifest":
                found.append((uri, data))
                return
            if name == SUCCESS and isinstance(data, dict):
                for child in uris_in(data.get("inputs", {})):
                    visit(child, left - 1)

    for root in roots:
        if root:
            visit(root, depth)
    return found


def harness_decontamination(tasks: Sequence[str], lineage: Sequence[str], store: Storage) -> dict[str, Any]:
    """Per harness task a stage evaluates on: whether the training data behind ``lineage`` (its
    data and base model URIs) was decontaminated against it, by the DataPipeline manifests found."""
    manifests = _data_manifests(lineage, store)
    out: dict[str, Any] = {}
    for task in tasks:
        against = [uri for uri, m in manifests
                   if any(s.get("harnessTask") == task for s in (m.get("decontamination") or {}).get("sets", {}).values())]
        out[task] = {
            "decontaminated": bool(manifests) and len(against) == len(manifests),
            "dataPipelines": [uri for uri, _ in manifests],
            "decontaminatedIn": against,
        }
    return out
