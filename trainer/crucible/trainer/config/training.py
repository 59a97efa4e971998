"""Configuration of the training engine shared by pretraining, SFT and preference runs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from crucible.trainer.config.common import InputRef, StrictModel, check_uri


class MoEConfig(StrictModel):
    """Mixture of experts (Mixtral-style): the MLP of every ``everyNLayers``-th block becomes
    ``numExperts`` SwiGLU experts of which a learned router picks ``topK`` per token."""

    num_experts: int = Field(default=8, ge=2, le=256, description="Experts per MoE block.")
    top_k: int = Field(default=2, ge=1, le=16, description="Experts each token is routed to (token choice).")
    expert_intermediate_size: int | None = Field(
        default=None, ge=8, le=262144, description="Width of each expert's MLP; empty: the dense MLP width."
    )
    every_n_layers: int = Field(
        default=1,
        ge=1,
        le=512,
        description=(
            "Every Nth block (the last of each N) is a MoE block, the others dense. With N > 1 the "
            "dense blocks are exported to Mixtral as identical experts, so expertIntermediateSize must "
            "equal the dense width."
        ),
    )
    aux_loss_coef: float = Field(
        default=0.01, ge=0, le=10, description="Weight of the Switch load-balancing loss (numExperts · Σ f·P)."
    )
    router_z_loss_coef: float = Field(
        default=0.0, ge=0, le=10, description="Weight of the router z-loss (mean logsumexp² of router logits, ST-MoE)."
    )
    capacity_factor: float | None = Field(
        default=None,
        gt=0,
        le=64,
        description=(
            "Training only: an expert takes at most capacityFactor × tokens × topK / numExperts "
            "tokens per micro-batch, the rest are dropped (counted); empty: no limit."
        ),
    )

    @model_validator(mode="after")
    def _top_k(self) -> MoEConfig:
        if self.top_k > self.num_experts:
            raise ValueError(f"topK: {self.top_k} exceeds numExperts ({self.num_experts})")
        return self


SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size",
                "max_position_embeddings", "rope_theta", "tie_word_embeddings", "initializer_range")
"""The fields that build a fresh model; a ``source`` model brings its own."""


class ModelConfig(StrictModel):
    """The causal LM to train: a Llama shape built from scratch, or a Hugging Face model.

    Set ``source`` to start from an existing Hugging Face-format model (continued
    pretraining); otherwise the shape fields build a fresh Llama.
    """

    source: InputRef | None = Field(
        default=None,
        description=(
            "Start from a Hugging Face-format model (continued pretraining): another run's "
            "output (fromRun) or a uri. Empty: build a fresh Llama from the shape fields."
        ),
    )
    architecture: Literal["llama", "mixtral"] = Field(
        default="llama",
        description=(
            "llama: dense Llama blocks; mixtral: Llama blocks with mixture-of-experts MLPs (model.moe), "
            "exported in the Mixtral format. With source: must match the source model's family."
        ),
    )
    hidden_size: int = Field(default=256, ge=8, le=65536, description="Width of the residual stream.")
    intermediate_size: int | None = Field(
        default=None, ge=8, le=262144, description="MLP width; empty: 8/3 × hidden, rounded to 64."
    )
    num_layers: int = Field(default=4, ge=1, le=512, description="Transformer blocks.")
    num_heads: int = Field(default=4, ge=1, le=512, description="Attention heads.")
    num_kv_heads: int | None = Field(
        default=None, ge=1, le=512, description="Key/value heads (GQA); empty: numHeads."
    )
    vocab_size: int | None = Field(
        default=None,
        ge=16,
        le=1048576,
        description="Vocabulary size; empty: taken from the tokenizer.",
    )
    max_position_embeddings: int = Field(
        default=2048, ge=16, le=1048576, description="Longest sequence the model supports."
    )
    rope_theta: float = Field(default=10000.0, gt=0, description="RoPE base frequency.")
    tie_word_embeddings: bool = Field(default=False, description="Share input and output embeddings.")
    initializer_range: float = Field(default=0.02, gt=0, le=1, description="Std of weight init.")
    moe: MoEConfig | None = Field(
        default=None, description="Mixture-of-experts blocks (architecture mixtral); empty with mixtral: the defaults."
    )

    @property
    def moe_config(self) -> MoEConfig | None:
        """The MoE settings in effect: ``moe``, or its defaults for architecture mixtral; None for llama."""
        if self.architecture != "mixtral":
            return None
        return self.moe or MoEConfig()

    @model_validator(mode="after")
    def _shape_or_source(self) -> ModelConfig:
        if self.source is not None:
            # by value, not by model_fields_set: a spec that went through JSON has every default set
            given = sorted(f for f in SHAPE_FIELDS if getattr(self, f) != ModelConfig.model_fields[f].default)
            if given:
                names = ", ".join(ModelConfig.model_fields[f].alias or f for f in given)
                raise ValueError(
                    f"{ModelConfig.model_fields[given[0]].alias or given[0]}: the shape fields ({names}) are not "
                    "used when source is set (the source model's config.json decides); remove them, or remove "
                    "source to build a fresh model of this shape"
                )
        return self

    @model_validator(mode="after")
    def _shape(self) -> ModelConfig:
        if self.moe is not None and self.architecture != "mixtral":
            raise ValueError("moe: set architecture: mixtral to train a mixture-of-experts model")
        if self.moe is not None:
            if self.moe.every_n_layers > self.num_layers:
                raise ValueError(
                    f"moe.everyNLayers: {self.moe.every_n_layers} exceeds numLayers ({self.num_layers}); "
                    "no block would be a MoE block"
                )
            dense_width = self.intermediate_size or int(64 * round(8 * self.hidden_size / 3 / 64)) or 64
            width = self.moe.expert_intermediate_size or dense_width
            if self.moe.every_n_layers > 1 and width != dense_width:
                raise ValueError(
                    f"moe.expertIntermediateSize: with everyNLayers > 1 it must equal the dense MLP width "
                    f"({dense_width}): Mixtral has one MLP width, and the dense blocks are exported as "
                    "identical experts"
                )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hiddenSize: {self.hidden_size} must be divisible by numHeads ({self.num_heads})"
            )
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            raise ValueError(
                f"numKvHeads: numHeads ({self.num_heads}) must be divisible by numKvHeads ({kv})"
            )
        return self


class OptimizerConfig(StrictModel):
    """AdamW with warmup and a decay schedule."""

    lr: float = Field(default=3e-4, gt=0, le=1, description="Peak learning rate.")
    min_lr_ratio: float = Field(
        default=0.1, ge=0, le=1, description="Final learning rate as a fraction of lr."
    )
    weight_decay: float = Field(default=0.1, ge=0, le=1, description="Decoupled weight decay.")
    beta1: float = Field(default=0.9, ge=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(default=0.95, ge=0, lt=1, description="AdamW beta2.")
    eps: float = Field(default=1e-8, gt=0, description="AdamW epsilon.")
    grad_clip: float = Field(default=1.0, ge=0, description="Max global grad norm; 0 turns clipping off.")
    schedule: Literal["cosine", "wsd", "constant", "linear"] = Field(
        default="cosine", description="Decay after warmup: cosine, warmup-stable-decay, constant, linear."
    )
    warmup_steps: int = Field(default=100, ge=0, description="Linear warmup steps.")
    decay_fraction: float = Field(
        default=0.2, gt=0, le=1, description="WSD only: fraction of steps spent in the final decay."
    )


class ParallelismConfig(StrictModel):
    """A 4-D layout of the world: dataReplicate × dataShard × pipeline × tensor ranks.

    Ranks are laid out with tensor innermost (consecutive ranks, inside one node), then pipeline
    stages, then the FSDP shard group, then replicas (HSDP): rank = ((r·S + s)·P + p)·T + t.
    """

    tensor: int = Field(default=1, ge=1, le=64, description="Tensor-parallel degree (DTensor; inside a node).")
    pipeline: int = Field(default=1, ge=1, le=128, description="Pipeline stages (layers cut evenly; across nodes).")
    data_shard: int | None = Field(
        default=None, ge=1, le=65536, description="FSDP2 shard group size; empty: the rest of the world."
    )
    data_replicate: int = Field(
        default=1, ge=1, le=65536, description="Replicas of the shard group (HSDP); 1: plain FSDP."
    )
    expert: int = Field(
        default=1,
        ge=1,
        le=256,
        description=(
            "Expert-parallel degree (mixture of experts): each group of this many consecutive dataShard "
            "ranks splits every MoE block's experts (numExperts / expert each) and exchanges the routed "
            "tokens with all-to-all; the experts are FSDP-sharded over the remaining data-parallel ranks "
            "only. Must divide model.moe.numExperts and dataShard; 1: every rank holds every expert."
        ),
    )
    pipeline_schedule: Literal["1f1b", "interleaved-1f1b"] = Field(
        default="1f1b",
        description=(
            "1f1b: one stage per rank; interleaved-1f1b: two virtual stages per rank (less bubble). "
            "The microbatches are the step's accumulation steps (globalBatchTokens / (microBatchSize · "
            "seqLen · dataReplicate · dataShard))."
        ),
    )

    @property
    def stages_per_rank(self) -> int:
        return 2 if self.pipeline_schedule == "interleaved-1f1b" else 1

    def data_size(self, world_size: int) -> int:
        """Data-parallel ranks (replicate × shard) for a world of ``world_size``."""
        return world_size // (self.tensor * self.pipeline)

    def resolve(self, world_size: int) -> tuple[int, int, int, int]:
        """(dataReplicate, dataShard, pipeline, tensor) for ``world_size`` ranks; ValueError naming the field."""
        model_par = self.tensor * self.pipeline * self.data_replicate
        if self.data_shard is None:
            if world_size % model_par:
                raise ValueError(
                    f"parallelism: tensor × pipeline × dataReplicate = {self.tensor} × {self.pipeline} × "
                    f"{self.data_replicate} = {model_par} does not divide the {world_size} ranks "
                    "(resources.nodes × gpusPerNode)"
                )
            shard = world_size // model_par
        else:
            shard = self.data_shard
            if model_par * shard != world_size:
                raise ValueError(
                    f"parallelism: dataReplicate × dataShard × pipeline × tensor = {self.data_replicate} × "
                    f"{shard} × {self.pipeline} × {self.tensor} = {model_par * shard}, but the world has "
                    f"{world_size} ranks (resources.nodes × gpusPerNode); make them equal or leave dataShard empty"
                )
        if shard % self.expert:
            raise ValueError(
                f"parallelism.expert: {self.expert} must divide dataShard ({shard}); an expert-parallel group "
                "is that many ranks of one FSDP shard group"
            )
        return self.data_replicate, shard, self.pipeline, self.tensor


class TrainingConfig(StrictModel):
    """Batching, length, precision and parallelism of the training loop."""

    seq_len: int = Field(default=512, ge=8, le=1048576, description="Tokens per sequence.")
    global_batch_tokens: int = Field(
        default=65536,
        ge=8,
        description=(
            "Tokens per optimizer step across all ranks; gradient accumulation makes up the "
            "difference to microBatchSize × seqLen × world size."
        ),
    )
    micro_batch_size: int = Field(default=8, ge=1, le=65536, description="Sequences per rank per forward pass.")
    max_steps: int | None = Field(default=None, ge=1, le=10**10, description="Optimizer steps to run.")
    max_tokens: int | None = Field(
        default=None, ge=1, description="Alternative to maxSteps: stop after this many tokens."
    )
    seed: int = Field(default=1234, ge=0, description="Seed for init, data order and dropout.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        default="auto",
        description=(
            "bf16: bf16 autocast, fp32 master weights; fp16: fp16 autocast with dynamic loss scaling "
            "(overflow steps skipped and counted); fp32; auto: bf16 on GPUs that have it, else fp16, "
            "fp32 on CPU (the choice is recorded in the results). A precision the device cannot run "
            "is an error at start."
        ),
    )
    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field(
        default="ddp", description="Data parallelism: DDP, FSDP2 fully_shard, or DeepSpeed ZeRO."
    )
    zero_stage: Literal[1, 2, 3] = Field(default=2, description="DeepSpeed ZeRO stage (strategy deepspeed).")
    parallelism: ParallelismConfig | None = Field(
        default=None,
        description=(
            "Tensor / pipeline / data-parallel layout (strategy fsdp, PretrainRun); empty: data "
            "parallel only, as the strategy says."
        ),
    )
    activation_checkpointing: bool = Field(default=False, description="Recompute activations in backward.")
    compile: bool = Field(default=False, description="torch.compile the model.")
    eval_every: int = Field(default=200, ge=0, description="Held-out perplexity every N steps; 0: only at the end.")
    eval_batches: int = Field(default=20, ge=1, description="Batches per held-out evaluation.")

    @model_validator(mode="after")
    def _length(self) -> TrainingConfig:
        if self.max_steps is None and self.max_tokens is None:
            raise ValueError("maxSteps: set maxSteps or maxTokens to say how long to train")
        if self.global_batch_tokens < self.seq_len:
            raise ValueError(
                f"globalBatchTokens: {self.global_batch_tokens} must hold at least one sequence "
                f"of seqLen ({self.seq_len})"
            )
        if self.parallelism is not None and self.strategy != "fsdp":
            raise ValueError(
                "parallelism: tensor and pipeline layouts compose with FSDP2 only; set strategy: fsdp "
                "(or remove parallelism)"
            )
        if self.compile and self.strategy == "deepspeed":
            raise ValueError(
                "compile: torch.compile is not applied under strategy deepspeed (its engine wraps the model); "
                "use strategy ddp or fsdp, or remove compile"
            )
        per_micro = self.micro_batch_size * self.seq_len
        if self.global_batch_tokens % per_micro:
            fits = max(1, round(self.global_batch_tokens / per_micro)) * per_micro
            raise ValueError(
                f"globalBatchTokens: {self.global_batch_tokens} must be a multiple of microBatchSize × seqLen = "
                f"{self.micro_batch_size} × {self.seq_len} = {per_micro} (one micro-batch per rank); use {fits}, "
                "or lower microBatchSize"
            )
        return self


def check_layout_fits_model(training: TrainingConfig, model: ModelConfig) -> None:
    """ValueError naming the field when ``training.parallelism`` cannot cut ``model``."""
    par = training.parallelism
    if par is None:
        return
    kv = model.num_kv_heads or model.num_heads
    if par.tensor > 1 and model.source is None:
        for name, value in (("numHeads", model.num_heads), ("numKvHeads", kv)):
            if value % par.tensor:
                raise ValueError(
                    f"training.parallelism.tensor: {par.tensor} must divide model.{name} ({value}); each "
                    "tensor-parallel rank holds whole attention heads"
                )
    if par.tensor > 1 and training.seq_len % par.tensor:
        raise ValueError(
            f"training.parallelism.tensor: {par.tensor} must divide training.seqLen ({training.seq_len}); "
            "sequence parallelism splits every sequence into tensor shards"
        )
    if par.tensor > 1 and (model.architecture == "mixtral" or model.moe is not None):
        raise ValueError(
            "training.parallelism.tensor: mixture-of-experts blocks are not tensor-parallel; use pipeline "
            "and data parallelism (tensor: 1) for architecture mixtral"
        )
    moe = model.moe_config
    if par.expert > 1 and moe is None:
        raise ValueError(
            f"training.parallelism.expert: {par.expert} needs mixture-of-experts blocks; set "
            "model.architecture: mixtral, or expert: 1"
        )
    if par.expert > 1 and moe is not None and moe.num_experts % par.expert and (
            model.source is None or "num_experts" in moe.model_fields_set):
        raise ValueError(
            f"training.parallelism.expert: {par.expert} must divide model.moe.numExperts ({moe.num_experts}); "
            "each expert-parallel rank holds numExperts / expert whole experts"
        )
    chunks = par.pipeline * par.stages_per_rank
    if chunks > 1 and model.source is None and chunks > model.num_layers:
        raise ValueError(
            f"training.parallelism.pipeline: {par.pipeline} stages × {par.stages_per_rank} per rank "
            f"need at least {chunks} layers; the model has numLayers {model.num_layers}"
        )
    if par.pipeline > 1 and model.tie_word_embeddings:
        raise ValueError(
            "training.parallelism.pipeline: tied embeddings cannot be cut across pipeline stages "
            "(the input table lives on the first stage, the output projection on the last); set "
            "model.tieWordEmbeddings: false"
        )
    if par.pipeline > 1 and training.activation_checkpointing:
        raise ValueError(
            "training.parallelism.pipeline: activationCheckpointing is not supported with pipeline "
            "stages yet; set training.activationCheckpointing: false"
        )
    if training.compile and (par.pipeline > 1 or par.tensor > 1):
        raise ValueError("training.compile: not supported with tensor or pipeline parallelism; set it to false")


class CheckpointConfig(StrictModel):
    """Where and how often the full training state is saved."""

    uri: str | None = Field(
        default=None, min_length=1, description="Checkpoint location; empty: <output>/checkpoints."
    )
    interval: int | Literal["auto"] = Field(
        default="auto",
        description="Steps between checkpoints, or auto (Young/Daly from save time and failure rate).",
    )
    keep: int = Field(default=3, ge=1, le=1000, description="Checkpoints kept; older ones are deleted.")
    async_save: bool | None = Field(
        default=None,
        description="Write files in the background after a snapshot; empty: yes, except under strategy deepspeed, "
                    "whose checkpoints are written synchronously.",
    )
    resume: Literal["auto", "never"] = Field(
        default="auto", description="auto: resume from the newest checkpoint whose manifest verifies."
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str | None) -> str | None:
        return check_uri(value)

    @model_validator(mode="after")
    def _interval(self) -> CheckpointConfig:
        if isinstance(self.interval, int) and self.interval < 1:
            raise ValueError("interval: must be a positive number of steps or auto")
        return self


class LossSpikeConfig(StrictModel):
    """Detection of loss spikes by z-score against a moving window of recent losses."""

    enabled: bool = Field(default=True, description="Watch for loss spikes.")
    action: Literal["rollback", "alert"] = Field(
        default="rollback",
        description="rollback: reload the last checkpoint and skip the offending batches; alert: count only.",
    )
    window: int = Field(default=50, ge=5, le=100000, description="Recent steps the z-score is computed against.")
    z_threshold: float = Field(default=6.0, gt=0, description="A loss this many std above the window mean is a spike.")
    min_delta: float = Field(
        default=0.1, ge=0, description="And at least this much above the window mean (guards flat losses)."
    )
    skip_batches: int = Field(
        default=0, ge=0, description="Extra batches skipped after the spike window on rollback."
    )
    max_rollbacks: int = Field(default=5, ge=0, description="Rollbacks before the run fails as unstable.")


class PromptsConfig(StrictModel):
    """A fixed list of prompts answered before and after the stage, written side by side."""

    prompts: list[str] = Field(default_factory=list, description="Questions asked of the model.")
    max_new_tokens: int = Field(default=64, ge=1, le=4096, description="Tokens generated per answer.")
    harness_tasks: list[str] = Field(
        default_factory=list,
        description=(
            "lm-evaluation-harness tasks run on the output model (needs the eval extra). Nothing is "
            "downloaded: the task data must be local (HF datasets cache or tasks in harnessTaskDir)."
        ),
    )
    harness_task_dir: str | None = Field(
        default=None, min_length=1, description="Local folder of extra harness task YAML files (include_path)."
    )
    harness_limit: int | None = Field(default=None, ge=1, description="Examples per harness task; empty: all.")
    references: list[str] = Field(
        default_factory=list,
        description=(
            "A reference answer per prompt (same order). Each answer is scored against its reference "
            "(ROUGE-L F1 over words) in eval/prompts.json and the report: how on-domain the answers became."
        ),
    )

    @model_validator(mode="after")
    def _harness(self) -> PromptsConfig:
        if (self.harness_task_dir or self.harness_limit) and not self.harness_tasks:
            raise ValueError("harnessTaskDir/harnessLimit are set but harnessTasks is empty; name the tasks to run")
        if self.references and len(self.references) != len(self.prompts):
            raise ValueError(
                f"references: {len(self.references)} reference answers for {len(self.prompts)} prompts; "
                "give one per prompt, in the same order (or none)"
            )
        return self


class MemorizationConfig(StrictModel):
    """Extraction test: prompt with the start of training and of held-out documents, count verbatim continuations."""

    documents: int = Field(default=32, ge=1, le=100000, description="Documents sampled from each of train and validation.")
    prefix_tokens: int = Field(default=32, ge=1, le=65536, description="Tokens of each document given as the prompt.")
    continuation_tokens: int = Field(default=16, ge=1, le=4096,
                                     description="Tokens generated greedily and compared with the true continuation.")
    max_train_match_rate: float | None = Field(
        default=None, ge=0, le=1,
        description="Fail the stage when more than this fraction of training documents is continued verbatim.",
    )


class PretrainEvalConfig(PromptsConfig):
    """A PretrainRun's evaluation: the prompts, plus the memorisation check on its own shards."""

    memorization: MemorizationConfig | None = Field(
        default=None, description="Exact-continuation rate on training vs held-out documents (empty: not run)."
    )
