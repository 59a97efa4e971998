"""The trainer-side spec of each stage: what ``python -m crucible.trainer STAGE`` reads.

The operator's resource specs (``crucible.api``) extend these with placement, scheduling and
suspend; the trainer ignores those fields (see :func:`parse_stage_spec`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from crucible.trainer.config.common import (
    FailurePolicy,
    InputRef,
    MetricsConfig,
    OutputConfig,
    RunRef,
    StorageConfig,
    StrictModel,
    check_uri,
)
from crucible.trainer.config.data import DataPipelineConfig
from crucible.trainer.config.rl import CritiqueConfig, PromptDataset, RewardConfig, RlConfig
from crucible.trainer.config.training import (
    CheckpointConfig,
    LossSpikeConfig,
    ModelConfig,
    OptimizerConfig,
    PretrainEvalConfig,
    PromptsConfig,
    TrainingConfig,
)


class TrainStageConfig(StrictModel):
    """Everything a training stage shares: the loop, checkpoints, faults, metrics, output."""

    training: TrainingConfig = Field(description="Batching, length, precision and parallelism.")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description="AdamW and schedule.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpointing.")
    loss_spike: LossSpikeConfig = Field(default_factory=LossSpikeConfig, description="Loss-spike detection.")
    failure_policy: FailurePolicy = Field(default_factory=FailurePolicy, description="Restarts after infrastructure faults.")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="Prometheus metrics of rank 0.")
    eval: PromptsConfig = Field(default_factory=PromptsConfig, description="Prompts answered before and after.")
    output: OutputConfig = Field(default_factory=OutputConfig, description="Where the final model goes.")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Object storage settings.")

    @model_validator(mode="after")
    def _layouts_where_supported(self) -> TrainStageConfig:
        if self.training.parallelism is not None and not isinstance(self, PretrainConfig):
            raise ValueError(
                "training.parallelism: tensor/pipeline layouts are for PretrainRun; remove it and use "
                "training.strategy for data parallelism"
            )
        return self


def _check_async_save(config: TrainStageConfig) -> None:
    if config.training.strategy == "deepspeed" and config.checkpoint.async_save:
        raise ValueError(
            "checkpoint.asyncSave: DeepSpeed writes its checkpoint synchronously (save_checkpoint blocks), so "
            "asyncSave has no effect under strategy deepspeed; remove it (or set it to false)"
        )


class PretrainConfig(TrainStageConfig):
    """Next-token pretraining on packed token shards."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="Model shape or starting point.")
    data: InputRef = Field(description="Token shards: a DataPipeline's output (fromRun) or their uri.")
    eval: PretrainEvalConfig = Field(  # type: ignore[assignment]  # a PromptsConfig with the memorisation check
        default_factory=PretrainEvalConfig, description="Prompts answered before and after; the memorisation check."
    )
    tokenizer: InputRef | None = Field(
        default=None, description="Tokenizer to ship with the model; empty: the data pipeline's."
    )

    @model_validator(mode="after")
    def _layout_fits_model(self) -> PretrainConfig:
        from crucible.trainer.config.training import check_layout_fits_model

        check_layout_fits_model(self.training, self.model)
        return self

    @model_validator(mode="after")
    def _async_save(self) -> PretrainConfig:
        _check_async_save(self)
        return self

    @model_validator(mode="after")
    def _positions(self) -> PretrainConfig:
        if self.model.source is not None:
            return self  # the source model's config decides; the trainer checks it when it loads it
        limit = self.model.max_position_embeddings
        if self.training.seq_len > limit:
            raise ValueError(
                f"training.seqLen: {self.training.seq_len} is longer than the model supports "
                f"(model.maxPositionEmbeddings {limit}); lower seqLen or raise maxPositionEmbeddings"
            )
        if self.eval.prompts and self.eval.max_new_tokens >= limit:
            raise ValueError(
                f"eval.maxNewTokens: {self.eval.max_new_tokens} leaves no room for the prompt within "
                f"model.maxPositionEmbeddings ({limit}); lower it"
            )
        return self


class LoraConfig(StrictModel):
    r: int = Field(default=16, ge=1, le=1024, description="LoRA rank.")
    alpha: float = Field(default=32, gt=0, description="LoRA scaling numerator (alpha / r).")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout on the LoRA path.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="Module names that get adapters.",
    )


class SftDataset(StrictModel):
    """Instruction data: jsonl of {prompt, response} or chat {messages}."""

    uri: str = Field(min_length=1, description="jsonl file or folder; local path or s3://.")
    format: Literal["auto", "prompt-response", "messages"] = Field(default="auto", description="Record shape.")
    prompt_field: str = Field(default="prompt", description="Prompt field (prompt-response).")
    response_field: str = Field(default="response", description="Response field (prompt-response).")
    messages_field: str = Field(default="messages", description="Chat messages field (messages).")
    validation_fraction: float = Field(default=0.1, ge=0, lt=1, description="Held-out fraction for eval loss.")
    earlier_revisions: list[str] = Field(
        default_factory=list, max_length=1000,
        description="Outputs of earlier FinetuneRuns: a record one of them trained on (its seen.npy) is dropped and "
                    "counted as seenInEarlierRevision. The backends fill it in for a revision (spec.revisions, "
                    "follow: dataset); set it by hand to train only on records an earlier output did not see.",
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str) -> str:
        return check_uri(value) or value

    @field_validator("earlier_revisions")
    @classmethod
    def _earlier(cls, value: list[str]) -> list[str]:
        for uri in value:
            check_uri(uri)
        return value


class FinetuneConfig(TrainStageConfig):
    """Supervised fine-tuning with prompt tokens masked from the loss."""

    model: InputRef = Field(description="Base model (Hugging Face format): a run's output or a uri.")
    dataset: SftDataset = Field(description="Instruction data.")
    method: Literal["full", "lora", "qlora"] = Field(default="lora", description="Which weights train.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="Adapter settings (lora, qlora).")
    merge_adapter: bool = Field(default=True, description="Write the merged model instead of the adapter.")
    packing: bool = Field(default=True, description="Pack examples into full sequences without cross-attention.")
    chat_template: str | None = Field(default=None, description="Jinja chat template; empty: the model's or Crucible's default.")

    @model_validator(mode="after")
    def _method(self) -> FinetuneConfig:
        # the backends send the whole spec (defaults included): only non-default adapter settings conflict
        if self.method == "full" and "lora" in self.model_fields_set and self.lora != LoraConfig():
            raise ValueError("lora: adapter settings are set but method is full; use method: lora or remove lora")
        _check_async_save(self)
        return self


class PreferenceDataset(StrictModel):
    uri: str | None = Field(default=None, min_length=1, description="jsonl of {prompt, chosen, rejected}; local path or s3://.")
    from_run: RunRef | None = Field(
        default=None, description="The pairs a critique-revision PreferenceRun wrote (its output's jsonl files)."
    )
    prompt_field: str = Field(default="prompt", description="Prompt field.")
    chosen_field: str = Field(default="chosen", description="Preferred response field.")
    rejected_field: str = Field(default="rejected", description="Dispreferred response field.")
    validation_fraction: float = Field(default=0.1, ge=0, lt=1, description="Held-out fraction.")

    @model_validator(mode="after")
    def _one_source(self) -> PreferenceDataset:
        if (self.uri is None) == (self.from_run is None):
            raise ValueError("uri: set exactly one of fromRun or uri")
        return self

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str | None) -> str | None:
        return check_uri(value)


class DpoConfig(StrictModel):
    beta: float = Field(default=0.1, gt=0, le=10, description="Strength of the KL constraint.")
    loss: Literal["sigmoid", "ipo", "hinge"] = Field(default="sigmoid", description="DPO loss variant.")
    label_smoothing: float = Field(default=0.0, ge=0, lt=0.5, description="Conservative DPO smoothing (sigmoid).")
    precompute_reference: bool = Field(
        default=False, description="Compute reference log-probs once before training instead of per step."
    )


RL_METHODS = ("grpo", "rloo", "ppo")
PAIR_METHODS = ("dpo", "reward-model")


class PreferenceConfig(TrainStageConfig):
    """Preference optimization: DPO variants, a Bradley-Terry reward model, online RL against a reward
    (GRPO, RLOO, PPO), or critique-revision pairs for DPO written by the model itself."""

    model: InputRef = Field(description="Policy to start from (Hugging Face format).")
    reference: InputRef | None = Field(default=None, description="Frozen reference; empty: the starting policy.")
    dataset: PreferenceDataset | None = Field(default=None, description="Preference pairs (dpo, reward-model).")
    method: Literal["dpo", "reward-model", "grpo", "rloo", "ppo", "critique-revision"] = Field(
        default="dpo", description="What to train (or, critique-revision, which pairs to write)."
    )
    dpo: DpoConfig = Field(default_factory=DpoConfig, description="DPO settings.")
    prompts: PromptDataset | None = Field(default=None, description="Prompts (grpo, rloo, ppo, critique-revision).")
    reward: RewardConfig | None = Field(default=None, description="What a completion scores (grpo, rloo, ppo).")
    rl: RlConfig = Field(default_factory=RlConfig, description="Sampling and optimisation (grpo, rloo, ppo).")
    critique: CritiqueConfig | None = Field(default=None, description="Principles and prompts (critique-revision).")
    lora: LoraConfig | None = Field(default=None, description="Train a LoRA adapter; the reference is the base with it disabled.")
    merge_adapter: bool = Field(default=True, description="Write the merged model instead of the adapter.")

    @model_validator(mode="before")
    @classmethod
    def _critique_trains_nothing(cls, data: Any) -> Any:
        """critique-revision only generates: it needs no length of training (and takes none)."""
        if isinstance(data, dict) and data.get("method") == "critique-revision":
            training = data.get("training")
            if isinstance(training, dict):
                for name in ("maxSteps", "maxTokens", "max_steps", "max_tokens"):
                    if training.get(name) not in (None, 1):  # 1: what this validator fills in (a resolved spec)
                        raise ValueError(f"training.{name}: critique-revision trains nothing; remove it (seqLen, "
                                         "microBatchSize and seed are what it uses)")
                data = {**data, "training": {**training, "maxSteps": 1}}
        return data

    @model_validator(mode="after")
    def _method_fields(self) -> PreferenceConfig:
        rl, pairs = self.method in RL_METHODS, self.method in PAIR_METHODS
        wants = {
            "dataset": pairs, "prompts": not pairs, "reward": rl, "critique": self.method == "critique-revision",
        }
        for name, needed in wants.items():
            present = getattr(self, name) is not None
            if needed and not present:
                raise ValueError(f"{name}: method {self.method} needs {name}")
            if present and not needed:
                raise ValueError(f"{name}: method {self.method} does not use {name}; remove it")
        if self._changed("dpo") and self.method != "dpo":
            raise ValueError(f"dpo: method {self.method} does not use dpo settings; remove them")
        if self._changed("rl") and not rl:
            raise ValueError(f"rl: method {self.method} does not use rl settings; remove them")
        if rl:
            self._check_rl()
        if self.method == "critique-revision":
            unused = [f for f in ("reference", "lora", "optimizer", "checkpoint", "loss_spike", "eval")
                      if self._changed(f)]
            if unused:
                wire = {"loss_spike": "lossSpike"}.get(unused[0], unused[0])
                raise ValueError(f"{wire}: critique-revision only generates pairs and does not use it; remove it")
        return self

    def _changed(self, name: str) -> bool:
        """Set to something else than its default (a resolved spec carries every default, so "was it set" is not
        the question)."""
        return bool(getattr(self, name) != type(self).model_fields[name].get_default(call_default_factory=True))

    def _check_rl(self) -> None:
        group = self.rl.group_size
        if group < 2 and self.method in ("grpo", "rloo"):
            what = "normalises rewards within a group" if self.method == "grpo" else "uses the other samples as baseline"
            raise ValueError(f"rl.groupSize: {self.method} {what}, so 1 sample per prompt learns nothing; use 2 or more")
        sequences = self.training.global_batch_tokens // self.training.seq_len
        if sequences % group:
            raise ValueError(
                f"training.globalBatchTokens: {self.training.global_batch_tokens} // seqLen {self.training.seq_len} = "
                f"{sequences} completions per step, not a multiple of rl.groupSize ({group}); use a multiple of "
                f"{group * self.training.seq_len}"
            )
        if self.rl.max_new_tokens >= self.training.seq_len:
            raise ValueError(
                f"rl.maxNewTokens: {self.rl.max_new_tokens} leaves no room for the prompt in training.seqLen "
                f"{self.training.seq_len}; seqLen bounds prompt + completion"
            )
        spike = self.loss_spike
        if spike.enabled and spike.action == "rollback":
            if "action" in spike.model_fields_set:
                raise ValueError(
                    "lossSpike.action: rollback replays the same samples after a policy-gradient loss spike "
                    f"(the {self.method} loss is not a likelihood); use action: alert or enabled: false"
                )
            self.loss_spike = spike.model_copy(update={"action": "alert"})

    @model_validator(mode="after")
    def _reward_model(self) -> PreferenceConfig:
        if self.method == "reward-model":
            if self.eval.prompts or self.eval.harness_tasks:
                raise ValueError(
                    "eval: a reward model scores text, it does not answer prompts or run harness tasks; remove "
                    "eval.prompts and eval.harnessTasks (or use method dpo)"
                )
            if self.reference is not None:
                raise ValueError(
                    "reference: method reward-model trains a Bradley-Terry reward model, which has no reference "
                    "model; remove reference (or use method dpo)"
                )
        _check_async_save(self)
        return self


class QuantEval(StrictModel):
    data: InputRef | None = Field(
        default=None, description="Held-out text: token shards (a DataPipeline) or a jsonl/text uri."
    )
    max_batches: int = Field(default=20, ge=1, description="Batches of the perplexity evaluation.")
    seq_len: int = Field(default=256, ge=8, description="Sequence length of the evaluation.")


class QuantizeConfig(StrictModel):
    """Weight-only post-training quantization, evaluated."""

    model: InputRef = Field(description="Model to quantize (Hugging Face format).")
    method: Literal["int8", "int4", "gptq", "awq"] = Field(
        default="int8", description="int8/int4: weight-only on any device; gptq/awq: need CUDA."
    )
    group_size: int = Field(
        default=128, ge=8, le=8192,
        description="Weights per quantization group (int8, int4); gptq and awq use llm-compressor's W4A16 scheme, "
                    "whose group size is 128.",
    )
    evaluation: QuantEval = Field(default_factory=QuantEval, description="Perplexity before/after.")
    max_perplexity_increase: float = Field(
        default=0.05,
        ge=0,
        description="Fail when perplexity rises by more than this fraction (0.05 = 5%).",
    )
    eval: PromptsConfig = Field(default_factory=PromptsConfig, description="Prompts answered before and after.")
    output: OutputConfig = Field(default_factory=OutputConfig, description="Where the quantized model goes.")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Object storage settings.")

    @model_validator(mode="before")
    @classmethod
    def _no_metrics(cls, data: Any) -> Any:
        if isinstance(data, dict) and "metrics" in data:
            raise ValueError(
                "metrics: a QuantizeJob serves no Prometheus metrics (it has no training steps to report; its "
                "numbers are in status.results); remove metrics"
            )
        return data

    @model_validator(mode="after")
    def _group_size(self) -> QuantizeConfig:
        if self.method in ("gptq", "awq") and self.group_size != 128:
            raise ValueError(
                f"groupSize: {self.method} runs llm-compressor's W4A16 scheme, whose group size is 128; remove "
                f"groupSize (or use method int4, which takes any group size)"
            )
        return self


STAGE_CONFIGS: dict[str, type[StrictModel]] = {
    "data": DataPipelineConfig,
    "pretrain": PretrainConfig,
    "finetune": FinetuneConfig,
    "preference": PreferenceConfig,
    "quantize": QuantizeConfig,
}

KIND_TO_STAGE = {
    "DataPipeline": "data",
    "PretrainRun": "pretrain",
    "FinetuneRun": "finetune",
    "PreferenceRun": "preference",
    "QuantizeJob": "quantize",
}


def parse_stage_spec(stage: str, spec: dict[str, Any]) -> StrictModel:
    """Validate a resource spec for the trainer, ignoring operator-only fields.

    Every ``fromRun`` must have been resolved to a ``uri`` before the trainer sees it.
    """
    model = STAGE_CONFIGS[stage]
    known = {f.alias or name for name, f in model.model_fields.items()} | set(model.model_fields)
    return model.model_validate({k: v for k, v in spec.items() if k in known})
