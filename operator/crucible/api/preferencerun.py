"""PreferenceRun: DPO (sigmoid, IPO, hinge), a reward model, online RL (GRPO, RLOO, PPO), critique-revision pairs."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from crucible.api.common import NODE_LOCAL_CHECKPOINT_CEL, PlacementMixin, Resource
from crucible.api.pretrainrun import MODEL_KINDS, TRAINING_COLUMNS
from crucible.api.registry import Kind, one_role
from crucible.trainer.config.stages import PreferenceConfig


class PreferenceRunSpec(PreferenceConfig, PlacementMixin):
    """Spec of a PreferenceRun: the trainer's PreferenceConfig plus placement."""


class PreferenceRun(Resource):
    """Preference optimization (DPO, IPO, hinge), a reward model, online RL (GRPO, RLOO, PPO) against a reward,
    or critique-revision pairs for DPO."""

    KIND: ClassVar[str] = "PreferenceRun"
    PLURAL: ClassVar[str] = "preferenceruns"
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("prr",)
    INPUTS: ClassVar[dict[str, tuple[str, ...]]] = {
        "model": MODEL_KINDS,
        "reference": MODEL_KINDS,
        "dataset": ("PreferenceRun",),  # pairs written by a critique-revision run
        "prompts": ("PreferenceRun",),  # the prompts of a critique-revision run's pairs
        "reward.model": ("PreferenceRun",),  # a reward-model run (checked by the trainer)
    }
    IMMUTABLE: ClassVar[tuple[str, ...]] = ("model", "reference", "dataset", "prompts", "reward", "method")
    EXTRA_CEL: ClassVar[list[dict[str, str]]] = [NODE_LOCAL_CHECKPOINT_CEL]

    spec: PreferenceRunSpec = Field(description="What to align and where.")


_roles, _role_names = one_role("trainer")
KIND = Kind(
    PreferenceRun,
    entry=("-m", "crucible.trainer", "preference"),
    roles=_roles,
    role_names=_role_names,
    checkpoints=True,
    produces_model=True,
    printer_columns=TRAINING_COLUMNS,
    results=(("preferenceAccuracy", "pref. acc {:.2f}"), ("rewardMargin", "margin {:.3f}"),
             ("rewardAfter", "reward {:.3f}"), ("winRate", "win rate {:.2f}"), ("pairs", "{} pairs"),
             ("finalLoss", "loss {:.3f}")),
    report_section="crucible.local.report:preference_section",
)
