"""Preference pairs for DPO and reward models: jsonl records → tokenized pairs → batches.

Records are ``{prompt, chosen, rejected}`` (field names from ``spec.dataset``), one per line,
in a jsonl file or a folder of them, local or s3://. ``prompt`` is a string or a list of chat
messages; ``chosen``/``rejected`` are the two responses, as strings or (TRL's conversational
format) a list holding one assistant message.

Formatting: a chat-message prompt is rendered with the model's chat template (or the documented
default, :data:`crucible.trainer.sft_data.DEFAULT_CHAT_TEMPLATE`) and a generation prompt; a
string prompt is rendered as a single user turn when the model's tokenizer has a chat template
(a FinetuneRun output ships the one it was trained with) and used as is otherwise. Prompt and
response are tokenized separately and an EOS token ends each response, as TRL does, so the
sequences are identical to TRL's for the same records (the cross-check test relies on it).

A batch of B pairs is one forward pass of 2B rows, ``[chosen_1..chosen_B, rejected_1..rejected_B]``,
right-padded, with ``completion_mask`` marking the response tokens whose log-probabilities count.
Pairs longer than ``training.seqLen`` keep their start (the response end is cut); pairs whose
prompt alone fills ``seqLen`` are dropped and counted, as are pairs whose responses are equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from crucible.trainer.config.stages import PreferenceDataset
from crucible.trainer.faults import SpecError
from crucible.trainer.sft_data import (
    DEFAULT_CHAT_TEMPLATE,
    ROLES,
    jsonl_files,
    pad_id_of,
    read_jsonl,
    split_indices,
)
from crucible.trainer.storage import Storage


@dataclass(frozen=True)
class PreferencePair:
    prompt_ids: list[int]
    chosen_ids: list[int]  # response tokens, EOS included
    rejected_ids: list[int]


@dataclass
class PreferenceStats:
    records: int = 0
    truncated: int = 0
    dropped_long_prompt: int = 0
    dropped_identical: int = 0
    train_pairs: int = 0
    validation_pairs: int = 0

    def to_json(self) -> dict[str, int]:
        return {
            "records": self.records,
            "truncated": self.truncated,
            "droppedLongPrompt": self.dropped_long_prompt,
            "droppedIdentical": self.dropped_identical,
            "trainPairs": self.train_pairs,
            "validationPairs": self.validation_pairs,
        }


def render_prompt(prompt: Any, where: str, spec: PreferenceDataset, tokenizer: Any) -> str:
    own = getattr(tokenizer, "chat_template", None) or None
    if isinstance(prompt, str):
        if own is None:
            return prompt
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt:
        messages = []
        for i, message in enumerate(prompt):
            if not isinstance(message, dict) or not isinstance(message.get("content"), str) or message.get("role") not in ROLES:
                raise SpecError(
                    f"{where}: {spec.prompt_field}[{i}] must be {{role, content}} with role one of {', '.join(ROLES)}"
                )
            messages.append({"role": message["role"], "content": message["content"]})
    else:
        raise SpecError(
            f"{where}: field {spec.prompt_field!r} must be a string or a list of chat messages "
            "(spec.dataset.promptField names it)"
        )
    return tokenizer.apply_chat_template(
        messages, chat_template=own or DEFAULT_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True
    )


def _response_text(value: Any) -> str | None:
    """A response as text: a string, or ``[{"role": "assistant", "content": ...}]``."""
    if isinstance(value, str):
        return value
    if (
        isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict)
        and value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str)
    ):
        return str(value[0]["content"])
    return None


def tokenize_pair(
    record: dict[str, Any], where: str, spec: PreferenceDataset, tokenizer: Any, seq_len: int
) -> tuple[PreferencePair | None, str]:
    """The tokenized pair (or None) and what happened: "ok", "truncated", "long-prompt", "identical"."""
    chosen = _response_text(record.get(spec.chosen_field))
    rejected = _response_text(record.get(spec.rejected_field))
    if chosen is None or rejected is None:
        raise SpecError(
            f"{where}: expected string fields {spec.chosen_field!r} and {spec.rejected_field!r} "
            "(or one assistant message each, as in TRL's conversational format; "
            "spec.dataset.chosenField / rejectedField)"
        )
    if spec.prompt_field not in record:
        raise SpecError(f"{where}: missing field {spec.prompt_field!r} (spec.dataset.promptField)")
    if chosen == rejected:
        return None, "identical"
    prompt_ids = tokenizer(render_prompt(record[spec.prompt_field], where, spec, tokenizer), add_special_tokens=False)[
        "input_ids"
    ]
    eos = tokenizer.eos_token_id
    tail = [eos] if eos is not None else []
    chosen_ids = list(tokenizer(chosen, add_special_tokens=False)["input_ids"]) + tail
    rejected_ids = list(tokenizer(rejected, add_special_tokens=False)["input_ids"]) + tail
    room = seq_len - len(prompt_ids)
    if room < 1:
        return None, "long-prompt"
    status = "truncated" if max(len(chosen_ids), len(rejected_ids)) > room else "ok"
    return PreferencePair(list(prompt_ids), chosen_ids[:room], rejected_ids[:room]), status


class PreferencePairs:
    """Pairs as items for BatchIterator; ``fetch`` yields the 2B-row batch (plus reference log-probs once set)."""

    def __init__(self, pairs: list[PreferencePair], pad_id: int) -> None:
        self.pairs = pairs
        self.pad_id = pad_id
        # Precomputed reference log-probs per pair (chosen, rejected); None: computed on the fly.
        self.reference: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def num_items(self) -> int:
        return len(self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def fetch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        pairs = [self.pairs[i] for i in indices]
        rows = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        attention = np.zeros((len(rows), width), dtype=np.int64)
        completion = np.zeros((len(rows), width), dtype=np.int64)
        for r, row in enumerate(rows):
            pair = pairs[r % len(pairs)]
            ids[r, : len(row)] = row
            attention[r, : len(row)] = 1
            completion[r, len(pair.prompt_ids) : len(row)] = 1
        batch = {
            "input_ids": torch.from_numpy(ids),  # (2B, T): chosen rows, then rejected rows
            "attention_mask": torch.from_numpy(attention),  # (2B, T)
            "completion_mask": torch.from_numpy(completion),  # (2B, T): response tokens
            "pair_index": torch.tensor(indices, dtype=torch.long),  # (B,)
        }
        if self.reference is not None:
            index = batch["pair_index"]
            batch["ref_chosen_logps"] = self.reference[0][index]  # (B,)
            batch["ref_rejected_logps"] = self.reference[1][index]  # (B,)
        return batch


@dataclass
class PreferenceData:
    train: PreferencePairs
    validation: PreferencePairs | None
    stats: PreferenceStats


def build_preference_data(
    spec: PreferenceDataset, tokenizer: Any, seq_len: int, seed: int, store: Storage | None = None
) -> PreferenceData:
    """Read, tokenize and split the pairs of a PreferenceRun."""
    store = store or Storage()
    if not spec.uri:
        raise SpecError("spec.dataset.fromRun was not resolved to spec.dataset.uri")
    records = read_jsonl(jsonl_files(spec.uri, store, "spec.dataset.uri"))
    if not records:
        raise SpecError(f"spec.dataset.uri: {spec.uri} holds no records")
    stats = PreferenceStats(records=len(records))
    pairs: list[PreferencePair] = []
    for record, where in records:
        pair, status = tokenize_pair(record, where, spec, tokenizer, seq_len)
        stats.truncated += status == "truncated"
        stats.dropped_long_prompt += status == "long-prompt"
        stats.dropped_identical += status == "identical"
        if pair is not None:
            pairs.append(pair)
    if not pairs:
        raise SpecError(
            f"spec.dataset.uri: no usable pair ({stats.dropped_long_prompt} prompts fill training.seqLen "
            f"{seq_len}, {stats.dropped_identical} pairs have equal responses)"
        )
    train_idx, val_idx = split_indices(len(pairs), spec.validation_fraction, seed)
    pad = pad_id_of(tokenizer)
    train = PreferencePairs([pairs[i] for i in train_idx], pad)
    validation = PreferencePairs([pairs[i] for i in val_idx], pad) if val_idx else None
    stats.train_pairs, stats.validation_pairs = len(train_idx), len(val_idx)
    return PreferenceData(train=train, validation=validation, stats=stats)
