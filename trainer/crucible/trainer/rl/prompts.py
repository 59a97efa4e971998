"""Prompts for online RL and critique-revision: jsonl records → rendered, tokenized prompts.

A record's ``promptField`` is text or a list of chat messages; both are rendered exactly as the
preference data renders prompts (the model's chat template with a generation prompt, or the text
as is for a tokenizer without one), so a policy sees the prompts it was tuned on. Prompts longer
than ``seqLen − maxNewTokens`` tokens are dropped and counted; a missing field is an error naming
the file and line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from crucible.trainer.config.rl import PromptDataset
from crucible.trainer.config.stages import PreferenceDataset
from crucible.trainer.faults import SpecError
from crucible.trainer.storage import Storage


@dataclass(frozen=True)
class Prompt:
    record: dict[str, Any]
    text: str  # rendered
    ids: list[int]


@dataclass
class PromptSet:
    train: list[Prompt]
    validation: list[Prompt]
    stats: dict[str, int] = field(default_factory=dict)


def render(prompt: Any, where: str, prompt_field: str, tokenizer: Any) -> str:
    from crucible.trainer.preference_data import render_prompt

    if isinstance(prompt, str) and not prompt.strip():
        raise SpecError(f"{where}: field {prompt_field!r} is empty")
    return render_prompt(prompt, where, PreferenceDataset(uri="-", prompt_field=prompt_field), tokenizer)


def read_prompts(spec: PromptDataset, tokenizer: Any, max_prompt_tokens: int, seed: int, store: Storage,
                 check: Any = None) -> PromptSet:
    """Read, render, tokenize and split; ``check(record, where)`` may reject a record (reward fields)."""
    from crucible.trainer.sft_data import jsonl_files, read_jsonl, split_indices

    uri = spec.uri
    if not uri:
        raise SpecError("spec.prompts.fromRun was not resolved to spec.prompts.uri")
    records = read_jsonl(jsonl_files(uri, store, "spec.prompts.uri"))
    if not records:
        raise SpecError(f"spec.prompts.uri: {uri} holds no records")
    prompts: list[Prompt] = []
    too_long = 0
    for record, where in records:
        if spec.prompt_field not in record:
            raise SpecError(
                f"{where}: missing field {spec.prompt_field!r}; every prompt record needs it "
                "(a string or chat messages; spec.prompts.promptField names it)"
            )
        if check is not None:
            check(record, where)
        text = render(record[spec.prompt_field], where, spec.prompt_field, tokenizer)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if not ids:
            raise SpecError(f"{where}: the prompt renders to no tokens")
        if len(ids) > max_prompt_tokens:
            too_long += 1
            continue
        prompts.append(Prompt(record, text, ids))
    if not prompts:
        raise SpecError(
            f"spec.prompts.uri: every prompt is longer than training.seqLen − rl.maxNewTokens = {max_prompt_tokens} "
            "tokens; raise seqLen"
        )
    train_idx, val_idx = split_indices(len(prompts), spec.validation_fraction, seed)
    stats = {"records": len(records), "droppedLongPrompt": too_long, "trainPrompts": len(train_idx),
             "validationPrompts": min(len(val_idx), spec.max_validation)}
    return PromptSet([prompts[i] for i in train_idx], [prompts[i] for i in val_idx][: spec.max_validation], stats)
