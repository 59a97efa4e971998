"""Instruction data for SFT: records → chat-formatted tokens with prompt tokens masked → (packed) batches.

Records
    jsonl (one file, or every ``*.jsonl`` of a folder in name order; local or s3://), each line
    either ``{prompt, response}`` or ``{messages: [{role, content}, ...]}`` (field names from
    ``spec.dataset``). ``format: auto`` picks per record.

Formatting
    Both shapes become a conversation (``{prompt, response}`` is one user turn and one assistant
    turn) rendered with a chat template: ``spec.chatTemplate``, else the model tokenizer's own,
    else :data:`DEFAULT_CHAT_TEMPLATE` (plain-text role markers, so it works with any tokenizer;
    the assistant turn ends with the tokenizer's EOS token so the model learns to stop)::

        <|user|>
        What is 2+2?
        <|assistant|>
        4<eos>

    The template the run used is saved with the output's tokenizer, so prompts at inference are
    formatted exactly as in training.

Masking
    Only assistant turns are learned: each token whose text starts inside an assistant message's
    span (the characters between rendering the conversation up to that turn with
    ``add_generation_prompt`` and rendering it including the turn) gets its label; all others get
    -100. This needs a prefix-stable template (rendering fewer turns yields a prefix of the
    full text), which every common template is; one that is not is rejected with a message.

Packing
    With ``packing: true`` whole examples are placed into rows of ``seqLen`` tokens by
    first-fit-decreasing (an example is never split), and ``position_ids`` restart at 0 for
    every example. No ``attention_mask`` is passed, which is what makes transformers 5.x derive
    a block-diagonal causal mask from the position-id resets for the ``sdpa`` and ``eager``
    attention implementations (``masking_utils.find_packed_sequence_indices``) and use varlen
    kernels for ``flash_attention_2``: a packed example attends only to itself. (The detection is
    skipped when a KV cache is passed, so the objective calls the model with ``use_cache=False``;
    tests/posttrain/test_sft_data.py checks that each packed example's logits equal its logits
    alone.) Padding at the end of a row forms its own segment and carries no labels.

Revisions
    A record's identity is a 64-bit hash (xxh3) of its conversation (:func:`record_key`). The output
    holds ``seen.npy``: the sorted keys of every record this run and the earlier outputs named in
    ``spec.dataset.earlierRevisions`` trained on; a record whose key is in theirs is dropped and
    counted as ``seenInEarlierRevision``, so a revision (``spec.revisions``, follow: dataset) trains
    on the new records only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash

from crucible.trainer.config.stages import SftDataset
from crucible.trainer.evaluate import materialize
from crucible.trainer.faults import SpecError
from crucible.trainer.seen import SEEN, read_seen
from crucible.trainer.storage import Storage, is_s3

IGNORE_INDEX = -100
"""In a FinetuneRun's output: the sorted keys of every record it and the earlier revisions trained on."""

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ ('\\n' if messages else '') + '<|assistant|>\\n' }}{% endif %}"
)

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Conversation:
    messages: list[dict[str, str]]
    source: str  # "file:line", for error messages


@dataclass(frozen=True)
class SftExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where the token is not learned

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@dataclass
class SftStats:
    records: int = 0
    truncated: int = 0
    dropped_no_response: int = 0
    train_examples: int = 0
    validation_examples: int = 0
    train_rows: int = 0
    trained_tokens: int = 0
    seen_in_earlier_revision: int | None = None
    template_source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = {
            "records": self.records,
            "truncated": self.truncated,
            "droppedNoResponse": self.dropped_no_response,
            "trainExamples": self.train_examples,
            "validationExamples": self.validation_examples,
            "trainRows": self.train_rows,
            "trainedTokens": self.trained_tokens,
            "seenInEarlierRevision": self.seen_in_earlier_revision,
            "packingEfficiency": self.extra.get("packingEfficiency"),
            "chatTemplate": self.template_source,
        }
        return {k: v for k, v in out.items() if v is not None}


def jsonl_files(uri: str, store: Storage, field_name: str) -> list[Path]:
    """The jsonl files behind ``uri`` (a file or a folder of ``*.jsonl``), downloaded when on S3."""
    try:
        path = materialize(uri, store) if is_s3(uri) else Path(uri)
    except FileNotFoundError as exc:
        raise SpecError(f"{field_name}: {uri}: {exc}") from exc
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.jsonl") if p.is_file())
        if not files:
            raise SpecError(f"{field_name}: {uri} is a folder with no .jsonl files")
        return files
    if not path.exists():
        raise SpecError(f"{field_name}: {uri}: no such file or folder")
    return [path]


def read_jsonl(files: Sequence[Path]) -> list[tuple[dict[str, Any], str]]:
    """Every record of ``files`` with its ``file:line`` for error messages."""
    records: list[tuple[dict[str, Any], str]] = []
    for path in files:
        with path.open(encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise SpecError(f"{where}: not valid JSON ({exc.msg})") from exc
                if not isinstance(record, dict):
                    raise SpecError(f"{where}: each line must be a JSON object")
                records.append((record, where))
    return records


def to_conversation(record: dict[str, Any], where: str, spec: SftDataset) -> Conversation:
    """One record as a conversation, checking its shape against ``spec.dataset``."""
    fmt = spec.format
    if fmt == "auto":
        fmt = "messages" if spec.messages_field in record else "prompt-response"
    if fmt == "messages":
        messages = record.get(spec.messages_field)
        if not isinstance(messages, list) or not messages:
            raise SpecError(
                f"{where}: field {spec.messages_field!r} must be a non-empty list of {{role, content}} "
                "(spec.dataset.messagesField names it)"
            )
        out: list[dict[str, str]] = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                raise SpecError(f"{where}: {spec.messages_field}[{i}] needs a string 'content'")
            role = message.get("role")
            if role not in ROLES:
                raise SpecError(f"{where}: {spec.messages_field}[{i}].role is {role!r}; use one of {', '.join(ROLES)}")
            out.append({"role": role, "content": message["content"]})
        if not any(m["role"] == "assistant" for m in out):
            raise SpecError(f"{where}: the conversation has no assistant message, so nothing would be learned")
        return Conversation(out, where)
    prompt, response = record.get(spec.prompt_field), record.get(spec.response_field)
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise SpecError(
            f"{where}: expected string fields {spec.prompt_field!r} and {spec.response_field!r} "
            f"(spec.dataset.promptField / responseField) or a {spec.messages_field!r} list"
        )
    return Conversation([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], where)


def resolve_chat_template(spec_template: str | None, tokenizer: Any) -> tuple[str, str]:
    """The template to use and where it came from: spec, model or default."""
    if spec_template:
        return spec_template, "spec"
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, str) and own:
        return own, "model"
    return DEFAULT_CHAT_TEMPLATE, "default"


def _render(tokenizer: Any, template: str, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
    )


def assistant_spans(tokenizer: Any, template: str, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    text = _render(tokenizer, template, conv.messages, False)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(conv.messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, template, conv.messages[:i], True) if i else ""
        upto = _render(tokenizer, template, conv.messages[: i + 1], False)
        if not text.startswith(upto) or not upto.startswith(before):
            raise SpecError(
                f"{conv.source}: the chat template is not prefix-stable (rendering the first {i + 1} "
                "messages is not a prefix of the whole conversation), so prompt tokens cannot be "
                "masked; set spec.chatTemplate to a template without look-ahead"
            )
        spans.append((len(before), len(upto)))
    return text, spans


def tokenize_conversation(
    tokenizer: Any, template: str, conv: Conversation, seq_len: int
) -> tuple[SftExample | None, bool]:
    """Tokens and labels of one conversation, cut to ``seq_len``; (None, _) when nothing is learned.

    The second value says whether the example was truncated.
    """
    text, spans = assistant_spans(tokenizer, template, conv)
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as exc:  # slow (Python) tokenizers have no offsets
        raise SpecError(
            "spec.model.uri: prompt masking needs a fast tokenizer (tokenizer.json beside the model); "
            f"this one is {type(tokenizer).__name__}"
        ) from exc
    ids: list[int] = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    for t, (start, _end) in enumerate(enc["offset_mapping"]):
        if any(a <= start < b for a, b in spans):
            labels[t] = ids[t]
    truncated = len(ids) > seq_len
    ids, labels = ids[:seq_len], labels[:seq_len]
    if all(label == IGNORE_INDEX for label in labels):
        return None, truncated
    return SftExample(ids, labels), truncated


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of example indices whose lengths sum to at most ``capacity``; deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    for members in bins:
        members.sort()
    return bins


class SftBatches:
    """Examples as items (``packing: false``) or packed rows (``packing: true``) for BatchIterator."""

    def __init__(self, examples: list[SftExample], seq_len: int, packing: bool, pad_id: int) -> None:
        self.examples = examples
        self.seq_len = seq_len
        self.packing = packing
        self.pad_id = pad_id
        if packing:
            self.rows = first_fit_decreasing([len(e.input_ids) for e in examples], seq_len)
        else:
            self.rows = [[i] for i in range(len(examples))]

    @property
    def num_items(self) -> int:
        return len(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def fetch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        rows = [self.rows[i] for i in indices]
        if self.packing:
            return self._packed(rows)
        return self._padded([self.examples[r[0]] for r in rows])

    def _packed(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        width = self.seq_len
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
        positions = np.zeros((len(rows), width), dtype=np.int64)
        for r, members in enumerate(rows):
            cursor = 0
            for i in members:
                ex = self.examples[i]
                n = len(ex.input_ids)
                ids[r, cursor : cursor + n] = ex.input_ids
                labels[r, cursor : cursor + n] = ex.labels
                positions[r, cursor : cursor + n] = np.arange(n)
                cursor += n
            positions[r, cursor:] = np.arange(width - cursor)  # padding: its own segment
        return {
            "input_ids": torch.from_numpy(ids),  # (B, T)
            "labels": torch.from_numpy(labels),  # (B, T), unshifted; the model shifts
            "position_ids": torch.from_numpy(positions),  # (B, T), 0 at each example start
            "token_count": torch.tensor([sum(len(self.examples[i].input_ids) for i in m) for m in rows]),  # (B,)
        }

    def _padded(self, examples: list[SftExample]) -> dict[str, torch.Tensor]:
        width = max(len(e.input_ids) for e in examples)
        ids = np.full((len(examples), width), self.pad_id, dtype=np.int64)
        labels = np.full((len(examples), width), IGNORE_INDEX, dtype=np.int64)
        mask = np.zeros((len(examples), width), dtype=np.int64)
        for r, ex in enumerate(examples):
            n = len(ex.input_ids)
            ids[r, :n], labels[r, :n], mask[r, :n] = ex.input_ids, ex.labels, 1
        return {
            "input_ids": torch.from_numpy(ids),
            "labels": torch.from_numpy(labels),
            "attention_mask": torch.from_numpy(mask),
            "token_count": torch.from_numpy(mask.sum(1)),  # (B,) real tokens per row
        }


def split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded train/validation split of ``n`` records; validation gets ⌈n·fraction⌉ (≥ 1 when fraction > 0)."""
    if fraction <= 0 or n < 2:
        return list(range(n)), []
    order = np.random.Generator(np.random.PCG64([seed, 0x5F7])).permutation(n)
    k = min(n - 1, max(1, math.ceil(n * fraction)))
    return sorted(order[k:].tolist()), sorted(order[:k].tolist())


@dataclass
class SftData:
    train: SftBatches
    validation: SftBatches | None
    template: str
    stats: SftStats
    seen: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))
    """Sorted keys of the records this run trains on and those the earlier revisions did (its ``seen.npy``)."""


def record_key(conv: Conversation) -> int:
    """A record's identity across revisions: a 64-bit hash of its conversation (not its file or line)."""
    return int(xxhash.xxh3_64_intdigest(json.dumps(conv.messages, sort_keys=True, ensure_ascii=False).encode()))


def load_seen(spec: SftDataset, store: Storage) -> np.ndarray | None:
    """The keys of the records the outputs in ``spec.dataset.earlierRevisions`` trained on; None when none named."""
    return read_seen(store, spec.earlier_revisions, "spec.dataset.earlierRevisions",
                     "a finished FinetuneRun (a revision before this one)")


def save_seen(data: SftData, folder: Path) -> None:
    np.save(folder / SEEN, data.seen)


def pad_id_of(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise SpecError("the model's tokenizer has neither a pad nor an EOS token; add one to tokenizer_config.json")
    return int(pad)


def build_sft_data(
    spec: SftDataset,
    tokenizer: Any,
    seq_len: int,
    packing: bool,
    seed: int,
    chat_template: str | None = None,
    store: Storage | None = None,
) -> SftData:
    """Read, format, mask, split and (optionally) pack the instruction data of a FinetuneRun."""
    store = store or Storage()
    records = read_jsonl(jsonl_files(spec.uri, store, "spec.dataset.uri"))
    if not records:
        raise SpecError(f"spec.dataset.uri: {spec.uri} holds no records")
    template, source = resolve_chat_template(chat_template, tokenizer)
    stats = SftStats(records=len(records), template_source=source)
    earlier = load_seen(spec, store)
    examples: list[SftExample] = []
    keys: list[int] = []
    for record, where in records:
        conv = to_conversation(record, where, spec)
        key = record_key(conv)
        if earlier is not None and _contains(earlier, key):
            stats.seen_in_earlier_revision = (stats.seen_in_earlier_revision or 0) + 1
            continue
        example, truncated = tokenize_conversation(tokenizer, template, conv, seq_len)
        stats.truncated += int(truncated)
        if example is None:
            stats.dropped_no_response += 1
            continue
        examples.append(example)
        keys.append(key)
    if earlier is not None:
        stats.seen_in_earlier_revision = stats.seen_in_earlier_revision or 0
        if not examples and stats.seen_in_earlier_revision:
            raise SpecError(
                f"spec.dataset.uri: every one of its {len(records)} records was trained on by an earlier revision "
                "(spec.dataset.earlierRevisions); add new records to the dataset, or set "
                "spec.revisions.dedupAgainstEarlier: false to train on all of them again"
            )
    if not examples:
        raise SpecError(
            f"spec.dataset.uri: no record keeps a response token within training.seqLen {seq_len}; "
            "raise training.seqLen or shorten the prompts"
        )
    train_idx, val_idx = split_indices(len(examples), spec.validation_fraction, seed)
    pad = pad_id_of(tokenizer)
    train = SftBatches([examples[i] for i in train_idx], seq_len, packing, pad)
    validation = SftBatches([examples[i] for i in val_idx], seq_len, packing, pad) if val_idx else None
    stats.train_examples, stats.validation_examples = len(train_idx), len(val_idx)
    stats.train_rows = train.num_items
    stats.trained_tokens = sum(e.trained_tokens for e in train.examples)
    if packing:  # share of each packed row that is real tokens rather than padding
        real = sum(len(e.input_ids) for e in train.examples)
        stats.extra["packingEfficiency"] = round(real / (train.num_items * seq_len), 4)
    seen = np.unique(np.concatenate([earlier if earlier is not None else np.zeros(0, dtype=np.uint64),
                                     np.array(keys, dtype=np.uint64)]))
    return SftData(train=train, validation=validation, template=template, stats=stats, seen=seen)


def _contains(sorted_keys: np.ndarray, key: int) -> bool:
    i = int(np.searchsorted(sorted_keys, np.uint64(key)))
    return i < len(sorted_keys) and int(sorted_keys[i]) == key
