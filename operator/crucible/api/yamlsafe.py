"""The one way Crucible reads YAML: bounded in size and aliases, strict about duplicate keys.

PyYAML's ``safe_load`` builds no objects, but it still expands aliases without limit (nine
levels of nine aliases — a "billion laughs" — turn a 1 KiB file into billions of nodes, and the
validators then hang the process), and it lets a repeated key silently replace the first one.
:func:`load_all` refuses both, and files larger than :data:`MAX_BYTES`, with a
:class:`YamlLimitError` that says what to change. Every place that reads YAML goes through
here: ``crucible validate``, ``render``, ``plan``, ``run`` (``crucible.api.validate``) and the
kubeconfig reader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MAX_BYTES = 4 * 1024 * 1024
"""A resource is stored in etcd (limit ~1.5 MiB); a pipeline folder's file is far below this."""
MAX_ALIASES = 100
"""Aliases per file; real resources use none or a handful (shared tolerations, env)."""
MAX_NODES = 200_000
"""Nodes per file after alias expansion (a large resource has a few thousand)."""


class YamlLimitError(yaml.YAMLError):
    """The text is valid YAML but breaks a limit (size, aliases, duplicate keys); ``line`` is 1-based."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.line = line

    def __str__(self) -> str:
        return self.message


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that counts aliases and expanded nodes and rejects duplicate mapping keys."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._aliases = 0
        self._nodes = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise YamlLimitError(
                    f"more than {MAX_ALIASES} YAML aliases (*{event.anchor}); write the values out "
                    "instead of repeating anchors", event.start_mark.line + 1)
        return super().compose_node(parent, index)

    def construct_document(self, node: Any) -> Any:
        self._nodes = 0
        self._count(node)
        return super().construct_document(node)

    def _count(self, node: Any) -> None:
        """Nodes after alias expansion (an alias is its target again), bounded by MAX_NODES."""
        stack = [node]
        while stack:
            current = stack.pop()
            self._nodes += 1
            if self._nodes > MAX_NODES:
                raise YamlLimitError(
                    f"the document expands to more than {MAX_NODES} YAML nodes (aliases nested in "
                    "aliases); write it out without anchors", node.start_mark.line + 1)
            if isinstance(current, yaml.MappingNode):
                for key, value in current.value:
                    stack.append(key)
                    stack.append(value)
            elif isinstance(current, yaml.SequenceNode):
                stack.extend(current.value)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    raise YamlLimitError(f"a mapping key must be a plain value, got {type(key).__name__}",
                                         key_node.start_mark.line + 1) from None
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise YamlLimitError(
                        f"duplicate key {key!r} (first on line {seen[key]}); YAML keeps only the last one, "
                        "so remove or rename one of them", line)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)




def check_size(size: int, name: str) -> None:
    if size > MAX_BYTES:
        raise YamlLimitError(f"{name} is {size:,} bytes; Crucible reads YAML files up to {MAX_BYTES:,} bytes "
                             "(split it into several files)")


def load_all(text: str) -> list[Any]:
    """Every document of ``text``; :class:`YamlLimitError` or ``yaml.YAMLError`` when it cannot be read."""
    check_size(len(text.encode("utf-8", errors="replace")), "the text")
    loader = _BoundedLoader(text)
    try:
        docs = []
        while loader.check_data():
            docs.append(loader.get_data())
        return docs
    finally:
        loader.dispose()


def load(text: str) -> Any:
    """The single document of ``text`` (None when empty)."""
    docs = load_all(text)
    if len(docs) > 1:
        raise YamlLimitError(f"expected one YAML document, found {len(docs)}")
    return docs[0] if docs else None


def read_file(path: Path) -> str:
    """The text of a YAML file, refusing one larger than :data:`MAX_BYTES` before reading it."""
    check_size(path.stat().st_size, str(path))
    return path.read_text(encoding="utf-8")
