"""Spec models of online policy optimisation (GRPO, RLOO, PPO) and critique-revision pairs.

Part of ``PreferenceConfig``: ``prompts`` (what the policy answers), ``reward`` (a reward-model run
and/or typed rules, combined by weights), ``rl`` (sampling, KL, clipping, PPO's value head) and
``critique`` (Constitutional-AI style pairs). Rules are data, never code: a regex, an exact or
contained match against a field of the prompt record, a length target, a format check.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from crucible.trainer.config.common import InputRef, RunRef, StrictModel


class PromptDataset(StrictModel):
    """Prompts as jsonl records: ``prompt`` a string or a list of chat messages (the chat template renders it)."""

    uri: str | None = Field(default=None, min_length=1, description="jsonl file or folder; local path or s3://.")
    from_run: RunRef | None = Field(
        default=None, description="Read the jsonl files of this run's output (e.g. a critique-revision PreferenceRun)."
    )
    prompt_field: str = Field(default="prompt", min_length=1, description="Prompt field: text or chat messages.")
    validation_fraction: float = Field(
        default=0.1, ge=0, lt=1, description="Held-out prompts answered before and after (reward, win rate)."
    )
    max_validation: int = Field(default=64, ge=1, description="At most this many held-out prompts are scored.")

    @model_validator(mode="after")
    def _one_source(self) -> PromptDataset:
        if (self.uri is None) == (self.from_run is None):
            raise ValueError("uri: set exactly one of fromRun or uri")
        return self


RuleType = Literal["regex", "exact", "contains", "length", "format"]


class RewardRule(StrictModel):
    """One scored check of a completion; the score is in [0, 1] and is multiplied by ``weight``."""

    type: RuleType = Field(description="regex | exact | contains | length | format.")
    name: str | None = Field(
        default=None, min_length=1, max_length=63, pattern=r"^[A-Za-z][A-Za-z0-9_]*$",
        description="Name in metrics (reward_<name>); empty: the type and its position.",
    )
    weight: float = Field(default=1.0, description="Multiplier of the rule's score in the total reward.")
    pattern: str | None = Field(default=None, min_length=1, description="regex: Python regular expression searched for.")
    field: str | None = Field(
        default=None, min_length=1, description="exact/contains: field of the prompt record holding the reference answer."
    )
    ignore_case: bool = Field(default=False, description="regex/exact/contains: compare case-insensitively.")
    target_tokens: int | None = Field(
        default=None, ge=1, description="length: the completion length (tokens) that scores 1; 0 at twice or none."
    )
    format: Literal["json", "prefix", "suffix", "single-line"] | None = Field(
        default=None, description="format: json (parses), prefix/suffix (starts/ends with value), single-line."
    )
    value: str | None = Field(default=None, min_length=1, description="format prefix/suffix: the text to check.")

    @model_validator(mode="after")
    def _complete(self) -> RewardRule:
        needs = {"regex": "pattern", "exact": "field", "contains": "field", "length": "target_tokens",
                 "format": "format"}[self.type]
        if getattr(self, needs) is None:
            wire = {"target_tokens": "targetTokens"}.get(needs, needs)
            raise ValueError(f"{wire}: a {self.type} rule needs {wire}")
        allowed = {"regex": {"pattern", "ignore_case"}, "exact": {"field", "ignore_case"},
                   "contains": {"field", "ignore_case"}, "length": {"target_tokens"},
                   "format": {"format", "value"}}[self.type]
        # a resolved spec carries every default, so "set" means "not its default"
        extra = sorted(f for f in ("pattern", "field", "ignore_case", "target_tokens", "format", "value")
                       if getattr(self, f) not in (None, False) and f not in allowed)
        if extra:
            raise ValueError(f"type: a {self.type} rule does not use {', '.join(extra)}; remove them")
        if self.type == "regex":
            assert self.pattern is not None
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"pattern: {self.pattern!r} does not compile: {exc}") from exc
        if self.type == "format" and (self.format in ("prefix", "suffix")) != (self.value is not None):
            raise ValueError(f"value: format {self.format} {'needs' if self.value is None else 'does not use'} value")
        return self


class RewardConfig(StrictModel):
    """What a completion scores: a reward model's score × ``modelWeight`` plus each rule's score × its weight."""

    model: InputRef | None = Field(
        default=None, description="A reward model: a PreferenceRun with method reward-model (fromRun) or its uri."
    )
    model_weight: float = Field(default=1.0, description="Multiplier of the reward model's score.")
    rules: list[RewardRule] = Field(default_factory=list, description="Typed rule rewards, added by weight.")

    @model_validator(mode="after")
    def _something(self) -> RewardConfig:
        if self.model is None and not self.rules:
            raise ValueError("model: give a reward model (fromRun a reward-model PreferenceRun), rules, or both")
        if self.model is None and self.model_weight != 1.0:
            raise ValueError("modelWeight: set but there is no reward model; remove it or add model")
        names = [r.name for r in self.rules if r.name]
        if len(names) != len(set(names)):
            raise ValueError("rules: rule names must be unique")
        return self


class RlConfig(StrictModel):
    """Sampling and optimisation settings of GRPO, RLOO and PPO."""

    group_size: int = Field(default=4, ge=1, le=1024, description="Completions sampled per prompt.")
    max_new_tokens: int = Field(default=32, ge=1, le=32768, description="Longest completion.")
    temperature: float = Field(default=1.0, gt=0, le=10, description="Sampling temperature (also applied to log-probs).")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling threshold.")
    kl_coef: float = Field(default=0.04, ge=0, description="Weight of the KL to the frozen reference (0: no reference).")
    clip_range: float = Field(default=0.2, gt=0, lt=1, description="PPO-style ratio clipping ε.")
    epochs: int = Field(default=1, ge=1, le=64, description="Optimizer steps on each batch of samples.")
    gamma: float = Field(default=1.0, ge=0, le=1, description="PPO: discount γ of GAE.")
    lam: float = Field(default=0.95, ge=0, le=1, description="PPO: GAE λ.")
    value_coef: float = Field(default=0.1, ge=0, description="PPO: weight of the value loss.")


class CritiqueConfig(StrictModel):
    """Constitutional-AI style pairs: answer, critique against a principle, revise; chosen = revision."""

    principles: list[str] = Field(min_length=1, description="Principles the model critiques its answers against.")
    critique_prompt: str = Field(
        default="Critique the answer above against this principle: {principle}",
        description="User turn asking for a critique; {principle} is replaced.",
    )
    revision_prompt: str = Field(
        default="Rewrite the answer so that it follows the principle: {principle}",
        description="User turn asking for the revision; {principle} is replaced.",
    )
    max_new_tokens: int = Field(default=64, ge=1, le=32768, description="Tokens per answer, critique and revision.")
    temperature: float = Field(default=0.7, ge=0, le=10, description="Sampling temperature; 0 is greedy.")

    @model_validator(mode="after")
    def _placeholders(self) -> CritiqueConfig:
        for name, text in (("critiquePrompt", self.critique_prompt), ("revisionPrompt", self.revision_prompt)):
            try:
                text.format(principle="x")
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(f"{name}: only {{principle}} may appear in braces ({exc})") from exc
        return self
