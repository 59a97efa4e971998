"""What a completion scores: typed rules from the spec and/or a reward model, combined by weights.

``total = modelWeight · s_RM(prompt, completion) + Σ weight_i · rule_i(completion)``. Every rule
scores in [0, 1]; nothing in the spec is executed (a regex is compiled by Python's ``re``, which
runs no user code). The reward model is a ``method: reward-model`` PreferenceRun's output
(``AutoModelForSequenceClassification``, one label) and scores exactly the rows it was trained
on: its own tokenizer's ``render(prompt) + completion + EOS``, right-padded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from crucible.trainer.config.rl import RewardConfig, RewardRule
from crucible.trainer.faults import SpecError
from crucible.trainer.stage_io import SUCCESS


@dataclass(frozen=True)
class Sample:
    """What a reward sees of one completion."""

    prompt: Any  # the record's prompt field (text or chat messages)
    record: dict[str, Any]  # the whole prompt record (reference fields)
    completion: str
    completion_tokens: int


def rule_name(rule: RewardRule, index: int) -> str:
    return rule.name or f"{rule.type}{index}"


class RuleReward:
    """One compiled rule; ``score(sample)`` in [0, 1]."""

    def __init__(self, rule: RewardRule, index: int) -> None:
        self.rule = rule
        self.name = rule_name(rule, index)
        self.where = f"spec.reward.rules[{index}]"
        flags = re.IGNORECASE if rule.ignore_case else 0
        self.regex = re.compile(rule.pattern, flags) if rule.pattern is not None else None

    def check_record(self, record: dict[str, Any], where: str) -> None:
        """A match rule needs its reference field in every prompt record."""
        if self.rule.type in ("exact", "contains") and not isinstance(record.get(self.rule.field or ""), str):
            raise SpecError(
                f"{where}: {self.where} ({self.rule.type}) compares against field {self.rule.field!r}, which this "
                "record lacks or is not a string; add it to every record or change the rule's field"
            )

    def score(self, sample: Sample) -> float:
        rule, text = self.rule, sample.completion
        if rule.type == "regex":
            assert self.regex is not None
            return float(self.regex.search(text) is not None)
        if rule.type in ("exact", "contains"):
            reference = str(sample.record.get(rule.field or "", ""))
            got, want = text.strip(), reference.strip()
            if rule.ignore_case:
                got, want = got.lower(), want.lower()
            return float(got == want) if rule.type == "exact" else float(bool(want) and want in got)
        if rule.type == "length":
            assert rule.target_tokens is not None
            return max(0.0, 1.0 - abs(sample.completion_tokens - rule.target_tokens) / rule.target_tokens)
        return float(_format_ok(rule, text))


def _format_ok(rule: RewardRule, text: str) -> bool:
    if rule.format == "json":
        try:
            json.loads(text)
        except ValueError:
            return False
        return True
    if rule.format == "prefix":
        return text.lstrip().startswith(rule.value or "")
    if rule.format == "suffix":
        return text.rstrip().endswith(rule.value or "")
    return bool(text.strip()) and "\n" not in text.strip()  # single-line


def check_reward_model(directory: Path, uri: str) -> None:
    """``uri`` must be a reward-model run's output: a one-label sequence classifier."""
    field = "spec.reward.model"
    success = directory / SUCCESS
    if success.is_file():
        try:
            method = json.loads(success.read_text()).get("results", {}).get("method")
        except ValueError:
            method = None
        if method is not None and method != "reward-model":
            raise SpecError(
                f"{field}: {uri} is the output of a method {method} run, not a reward model; point fromRun at a "
                "PreferenceRun with method: reward-model"
            )
    config = json.loads((directory / "config.json").read_text())
    architectures = config.get("architectures") or []
    labels = len(config.get("id2label") or {}) or int(config.get("num_labels", 0) or 0)
    if not any(a.endswith("ForSequenceClassification") for a in architectures) or labels != 1:
        raise SpecError(
            f"{field}: {uri} is not a reward model (architectures {architectures}, {labels} labels); it must be the "
            "output of a PreferenceRun with method: reward-model (a one-label AutoModelForSequenceClassification)"
        )


class RewardModelScorer:
    """A frozen Bradley–Terry reward model scoring (prompt, completion) as its training rows did."""

    def __init__(self, directory: Path, device: torch.device, micro_batch_size: int) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(directory))
        self.model = AutoModelForSequenceClassification.from_pretrained(str(directory), dtype=torch.float32).to(device)
        self.model.eval().requires_grad_(False)
        self.device = device
        self.micro_batch_size = micro_batch_size
        self.max_len = int(getattr(self.model.config, "max_position_embeddings", 4096) or 4096)

    @torch.no_grad()
    def score(self, samples: Sequence[Sample]) -> list[float]:
        from crucible.trainer.config.stages import PreferenceDataset
        from crucible.trainer.preference_data import render_prompt
        from crucible.trainer.sft_data import pad_id_of

        spec = PreferenceDataset(uri="-")
        eos = self.tokenizer.eos_token_id
        rows = []
        for s in samples:
            prompt_ids = self.tokenizer(render_prompt(s.prompt, "reward model", spec, self.tokenizer),
                                        add_special_tokens=False)["input_ids"]
            response = list(self.tokenizer(s.completion, add_special_tokens=False)["input_ids"])
            rows.append((list(prompt_ids) + response + ([eos] if eos is not None else []))[: self.max_len])
        pad = pad_id_of(self.tokenizer)
        scores: list[float] = []
        for start in range(0, len(rows), self.micro_batch_size):
            chunk = rows[start : start + self.micro_batch_size]
            width = max(len(r) for r in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, row in enumerate(chunk):
                ids[i, : len(row)] = torch.tensor(row)
                mask[i, : len(row)] = 1
            out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False)
            scores.extend(out.logits.squeeze(-1).float().cpu().tolist())
        return scores


class Reward:
    """The spec's reward: per-sample totals and each component (for metrics)."""

    def __init__(self, config: RewardConfig, model: RewardModelScorer | None) -> None:
        self.config = config
        self.model = model
        self.rules = [RuleReward(rule, i) for i, rule in enumerate(config.rules)]

    def check_record(self, record: dict[str, Any], where: str) -> None:
        for rule in self.rules:
            rule.check_record(record, where)

    def score(self, samples: Sequence[Sample]) -> tuple[list[float], dict[str, list[float]]]:
        components: dict[str, list[float]] = {}
        totals = [0.0] * len(samples)
        if self.model is not None:
            scores = self.model.score(samples)
            components["model"] = scores
            totals = [t + self.config.model_weight * s for t, s in zip(totals, scores, strict=True)]
        for rule in self.rules:
            scores = [rule.score(s) for s in samples]
            components[rule.name] = scores
            totals = [t + rule.rule.weight * s for t, s in zip(totals, scores, strict=True)]
        return totals, components
