"""``python -m crucible.trainer preference --spec FILE``: DPO (sigmoid / IPO / hinge) or a reward model.

DPO (Rafailov et al. 2023). With ``π`` the policy, ``π_ref`` the frozen reference and summed
response log-probs ``log π(y|x)``, the implicit rewards are ``r = β·(log π(y|x) − log π_ref(y|x))``
and ``Δ = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))``:

* ``sigmoid``  ``−(1−ε)·log σ(βΔ) − ε·log σ(−βΔ)`` (ε = ``dpo.labelSmoothing``, conservative DPO;
               ε = 0 is the paper's loss)
* ``ipo``      ``(Δ̄ − 1/(2β))²`` with Δ̄ the difference of *per-token mean* log-ratios (Azar et al.
               2023, normalised by response length as TRL does, which the IPO authors confirmed)
* ``hinge``    ``max(0, 1 − βΔ)`` (SLiC)

The reference is frozen: with ``lora`` it is the policy itself with the adapter disabled (no second
copy in memory); otherwise a second, gradient-free copy of ``spec.reference`` (default: the starting
policy). ``dpo.precomputeReference`` computes the reference log-probs of every pair once before
training (split over ranks), after which a separate reference copy is freed. Metrics per step
(metrics.jsonl) and on held-out pairs (``_SUCCESS``): chosen and rejected rewards, their margin and
the preference accuracy (share of pairs whose chosen reward is higher).

Reward model (``method: reward-model``): a Bradley–Terry model ``P(y_w ≻ y_l) = σ(s(x,y_w) − s(x,y_l))``
on the same pairs, with ``s`` a scalar head on the last token (``AutoModelForSequenceClassification``
with one label); the loss is ``−log σ(s_w − s_l)``. It is scored on held-out pairs before and after
training; the output loads with ``AutoModelForSequenceClassification``.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from crucible.trainer.config.stages import PreferenceConfig
from crucible.trainer.engine import Batch, Engine, TrainContext
from crucible.trainer.faults import SpecError
from crucible.trainer.posttrain import (
    Workspace,
    check_seq_len,
    export_trained,
    fixed_eval_batches,
    input_receipts,
    load_exported_lm,
    load_tokenizer,
    log,
    open_workspace,
    publish_and_succeed,
    write_prompts,
)
from crucible.trainer.preference_data import PreferenceData, PreferencePairs, build_preference_data
from crucible.trainer.sampler import BatchIterator, GlobalSampler

STAGE = "preference"
LossType = Literal["sigmoid", "ipo", "hinge"]


# -- the math ---------------------------------------------------------------------------------


def sequence_logps(model: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the completion tokens of each row, and their counts; both (2B,)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    logits = out.logits[:, :-1].float()  # (2B, T-1, V): position t predicts token t+1
    labels = batch["input_ids"][:, 1:]  # (2B, T-1)
    mask = batch["completion_mask"][:, 1:].to(logits.dtype)  # (2B, T-1)
    token_logps = torch.gather(logits.log_softmax(-1), 2, labels.unsqueeze(-1)).squeeze(-1)  # (2B, T-1)
    return (token_logps * mask).sum(-1), mask.sum(-1)


@dataclass(frozen=True)
class DpoTerms:
    losses: torch.Tensor  # (B,)
    chosen_rewards: torch.Tensor  # (B,) β·log-ratio, detached
    rejected_rewards: torch.Tensor  # (B,)
    likelihood_margin: torch.Tensor  # (B,) log π(y_w|x) − log π(y_l|x), detached

    def metrics(self) -> dict[str, torch.Tensor]:
        """Implicit-reward metrics, plus how often the policy itself finds the chosen response likelier
        (meaningful before training too, when every implicit reward is 0)."""
        margin = self.chosen_rewards - self.rejected_rewards
        return {
            "rewardChosen": self.chosen_rewards.mean(),
            "rewardRejected": self.rejected_rewards.mean(),
            "rewardMargin": margin.mean(),
            "preferenceAccuracy": (margin > 0).float().mean(),
            "likelihoodAccuracy": (self.likelihood_margin > 0).float().mean(),
        }


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    *,
    beta: float,
    loss_type: LossType = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> DpoTerms:
    """Per-pair DPO losses and implicit rewards from summed response log-probs (all (B,))."""
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the IPO loss needs the response token counts")
        mean_delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (mean_delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}; use sigmoid, ipo or hinge")
    return DpoTerms(
        losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach(), (policy_chosen - policy_rejected).detach()
    )


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """``−log σ(s_w − s_l)`` per pair."""
    return -F.logsigmoid(chosen_scores - rejected_scores)


# -- the reference ----------------------------------------------------------------------------


class Reference:
    """Frozen reference log-probs: the policy with its adapter disabled, or a separate frozen copy."""

    def __init__(self, adapter_model: Any = None, frozen: Any = None) -> None:
        if (adapter_model is None) == (frozen is None):
            raise ValueError("give exactly one of adapter_model or frozen")
        self.adapter_model = adapter_model
        self.frozen = frozen
        if frozen is not None:
            frozen.eval()
            frozen.requires_grad_(False)

    @torch.no_grad()
    def logps(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.adapter_model is not None:
            was_training = self.adapter_model.training
            self.adapter_model.eval()  # no adapter dropout in the reference
            try:
                with self.adapter_model.disable_adapter():
                    return sequence_logps(self.adapter_model, batch)
            finally:
                self.adapter_model.train(was_training)
        return sequence_logps(self.frozen, batch)

    def release(self) -> None:
        """Drop a separate copy once its log-probs are precomputed."""
        self.frozen = None


@torch.no_grad()
def precompute_reference(reference: Reference, pairs: PreferencePairs, micro_batch_size: int,
                         device: torch.device, rank: int, world_size: int) -> None:
    """Reference log-probs of every pair, computed once (each rank a share, then summed across ranks)."""
    chosen = torch.zeros(pairs.num_items, dtype=torch.float64, device=device)
    rejected = torch.zeros_like(chosen)
    mine = list(range(rank, pairs.num_items, world_size))
    for start in range(0, len(mine), micro_batch_size):
        indices = mine[start : start + micro_batch_size]
        batch = {k: v.to(device) for k, v in pairs.fetch(indices).items()}
        logps, _ = reference.logps(batch)
        c, r = logps.double().chunk(2)
        chosen[indices] = c
        rejected[indices] = r
    if world_size > 1:
        torch.distributed.all_reduce(chosen)
        torch.distributed.all_reduce(rejected)
    pairs.reference = (chosen.float().cpu(), rejected.float().cpu())


# -- objectives -------------------------------------------------------------------------------


class _PairObjective:
    def __init__(self, data: PreferenceData) -> None:
        self.data = data

    def train_batches(self, ctx: TrainContext) -> BatchIterator:
        train = self.data.train
        sampler = GlobalSampler(train.num_items, ctx.micro_batch_size, ctx.env.rank, ctx.env.world_size, ctx.seed)
        return BatchIterator(sampler, train.fetch)

    def eval_batches(self, ctx: TrainContext) -> Iterable[Batch] | None:
        val = self.data.validation
        return None if val is None else fixed_eval_batches(val.num_items, val.fetch, ctx)

    def tokens(self, batch: Batch) -> int:
        return int(batch["attention_mask"].sum())


class DpoObjective(_PairObjective):
    def __init__(self, data: PreferenceData, reference: Reference, beta: float, loss_type: LossType,
                 label_smoothing: float) -> None:
        super().__init__(data)
        self.reference = reference
        self.beta = beta
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing

    def terms(self, model: Any, batch: Batch) -> DpoTerms:
        logps, counts = sequence_logps(model, batch)
        policy_chosen, policy_rejected = logps.chunk(2)
        chosen_tokens, rejected_tokens = counts.chunk(2)
        if "ref_chosen_logps" in batch:
            ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = self.reference.logps(batch)[0].chunk(2)
        return dpo_loss(
            policy_chosen, policy_rejected, ref_chosen.to(logps.dtype), ref_rejected.to(logps.dtype),
            beta=self.beta, loss_type=self.loss_type, label_smoothing=self.label_smoothing,
            chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens,
        )

    def loss(self, model: Any, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        terms = self.terms(model, batch)
        return terms.losses.mean(), terms.metrics()


def pair_scores(model: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Reward-model scores of the chosen and the rejected rows, (B,) each."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    scores = out.logits.squeeze(-1).float()  # (2B,)
    chosen, rejected = scores.chunk(2)
    return chosen, rejected


class RewardModelObjective(_PairObjective):
    def loss(self, model: Any, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        chosen, rejected = pair_scores(model, batch)
        margin = (chosen - rejected).detach()
        return bradley_terry_loss(chosen, rejected).mean(), {
            "rewardChosen": chosen.detach().mean(),
            "rewardRejected": rejected.detach().mean(),
            "rewardMargin": margin.mean(),
            "preferenceAccuracy": (margin > 0).float().mean(),
        }


@torch.no_grad()
def held_out_pairs(objective: Any, model: Any, pairs: PreferencePairs | None, micro_batch_size: int) -> dict[str, float]:
    """Loss, rewards, margin and accuracy over every held-out pair (same on every rank)."""
    if pairs is None:
        return {}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    try:
        for start in range(0, pairs.num_items, micro_batch_size):
            indices = list(range(start, min(start + micro_batch_size, pairs.num_items)))
            batch = {k: v.to(device) for k, v in pairs.fetch(indices).items()}
            loss, metrics = objective.loss(model, batch)
            for key, value in {"loss": loss, **metrics}.items():
                sums[key] = sums.get(key, 0.0) + float(value) * len(indices)
    finally:
        model.train(was_training)
    return {k: v / pairs.num_items for k, v in sums.items()}


# -- the stage -------------------------------------------------------------------------------


def _reward_model_class() -> Any:
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification


def build_policy(config: PreferenceConfig, ws: Workspace, pad_id: int) -> Any:
    from crucible.trainer import lora

    if config.method == "reward-model":
        model = lora.load_base(ws.base_dir, "lora", _reward_model_class(), num_labels=1, pad_token_id=pad_id)
        torch.manual_seed(config.training.seed)  # a fresh head, the same on every rank
        torch.nn.init.normal_(model.score.weight, std=model.config.initializer_range)
        task = "SEQ_CLS"
    else:
        model = lora.load_base(ws.base_dir, "lora")
        task = "CAUSAL_LM"
    check_seq_len(model, config.training.seq_len)
    if config.lora is None:
        return model
    return lora.wrap(model, config.lora, task, seed=config.training.seed)


def check_same_tokenizer(tokenizer: Any, ref_dir: Any) -> None:
    """The reference's token log-probs are compared with the policy's token by token: same vocabulary."""
    from transformers import AutoTokenizer

    try:
        ref_tok = AutoTokenizer.from_pretrained(str(ref_dir))
    except (OSError, ValueError) as exc:
        raise SpecError(f"spec.reference.uri: {ref_dir} has no usable tokenizer ({exc})") from exc
    if ref_tok.get_vocab() != tokenizer.get_vocab() or ref_tok.eos_token_id != tokenizer.eos_token_id:
        raise SpecError(
            f"spec.reference.uri: the reference's tokenizer differs from the policy's ({len(ref_tok)} vs "
            f"{len(tokenizer)} tokens, EOS {ref_tok.eos_token_id} vs {tokenizer.eos_token_id}); the KL compares "
            "their log-probs token by token, so use a reference trained from the same base"
        )


def build_reference(config: PreferenceConfig, ws: Workspace, policy: Any, device: torch.device,
                    tokenizer: Any = None) -> Reference:
    from crucible.trainer import lora
    from crucible.trainer.posttrain import local_model

    ref_uri = config.reference.uri if config.reference is not None else None
    if config.reference is not None and not ref_uri:
        raise SpecError("spec.reference.fromRun was not resolved to spec.reference.uri")
    if config.lora is not None and ref_uri in (None, ws.base_uri):
        return Reference(adapter_model=policy)
    ref_dir = ws.base_dir if ref_uri in (None, ws.base_uri) else local_model(
        ws.store, str(ref_uri), "spec.reference.uri", ws.cache / "reference"
    )
    if tokenizer is not None:
        check_same_tokenizer(tokenizer, ref_dir)
    frozen = lora.load_base(ref_dir, "lora").to(device)
    if frozen.config.vocab_size != policy.config.vocab_size:
        raise SpecError(
            f"spec.reference.uri: the reference has vocabulary {frozen.config.vocab_size}, the policy "
            f"{policy.config.vocab_size}; they must share a tokenizer"
        )
    return Reference(frozen=frozen)


def run(config: PreferenceConfig) -> int:
    from crucible.trainer import evaluate, lora
    from crucible.trainer.config.stages import RL_METHODS
    from crucible.trainer.distributed import barrier, init_distributed, shutdown
    from crucible.trainer.sft_data import pad_id_of

    if config.method in RL_METHODS:
        from crucible.trainer.rl.stage import run as run_rl

        return run_rl(config)
    if config.method == "critique-revision":
        from crucible.trainer.rl.critique import run as run_critique

        return run_critique(config)
    dataset = config.dataset
    assert dataset is not None  # the config requires it for dpo and reward-model
    if not dataset.uri:
        raise SpecError("spec.dataset.fromRun was not resolved to spec.dataset.uri")
    if config.method == "reward-model" and config.eval.harness_tasks:
        raise SpecError("eval.harnessTasks: a reward model scores text, it is not a causal LM the harness can run; "
                        "remove harnessTasks or use method dpo")
    evaluate.check_harness(config.eval)
    ws = open_workspace(config, STAGE)
    if ws is None:
        return 0
    env = init_distributed(timeout_s=float(config.failure_policy.hang_timeout_seconds))
    try:
        tokenizer = load_tokenizer(ws.base_dir)
        data = build_preference_data(dataset, tokenizer, config.training.seq_len, config.training.seed, ws.store)
        log(f"data: {data.stats.to_json()}")
        policy = build_policy(config, ws, pad_id_of(tokenizer))
        trainable, total = lora.trainable_parameters(policy)
        log(f"{config.method}: {trainable:,} of {total:,} parameters train")
        mbs = config.training.micro_batch_size
        objective: DpoObjective | RewardModelObjective
        policy.to(env.device)
        if config.method == "dpo":
            reference = build_reference(config, ws, policy, env.device, tokenizer)
            objective = DpoObjective(data, reference, config.dpo.beta, config.dpo.loss, config.dpo.label_smoothing)
            if config.dpo.precompute_reference:
                for pairs in (data.train, data.validation):
                    if pairs is not None:
                        precompute_reference(reference, pairs, mbs, env.device, env.rank, env.world_size)
                reference.release()
                log("reference log-probs precomputed for every pair")
        else:
            objective = RewardModelObjective(data)
            if config.eval.prompts:
                log("eval.prompts ignored: a reward model scores text, it does not answer prompts")
        before = held_out_pairs(objective, policy, data.validation, mbs)
        answers_before: list[str] = []
        if config.eval.prompts and env.is_main and config.method == "dpo":
            answers_before = evaluate.answer_prompts(policy, tokenizer, config.eval.prompts, config.eval.max_new_tokens,
                                                     tokenizer.chat_template)
        engine = Engine(config, policy, objective, tokenizer, env, ws.store)
        try:
            result = engine.fit()
            after = held_out_pairs(objective, engine.strategy.model, data.validation, mbs)
            reward_model = config.method == "reward-model"
            written = export_trained(
                engine, ws, config.lora, config.merge_adapter, tokenizer,
                model_class=_reward_model_class() if reward_model else None,
                task_type="SEQ_CLS" if reward_model else "CAUSAL_LM",
                config_overrides={"num_labels": 1, "pad_token_id": pad_id_of(tokenizer)} if reward_model else None,
            )
        finally:
            engine.close()
        if env.is_main:
            assert written is not None
            if config.eval.prompts and config.method == "dpo":
                tuned = load_exported_lm(ws.staging, written, ws.base_dir)
                write_prompts(config, ws.staging, tokenizer, answers_before, tuned,
                              tokenizer.chat_template, "preference optimization")
            # The engine's eval* numbers cover training.evalBatches batches (they stay in metrics.jsonl);
            # the results report every held-out pair instead, and exp of a preference loss is no perplexity.
            fit = {k: v for k, v in result.results().items() if not k.startswith("eval") and k != "perplexity"}
            results: dict[str, Any] = {
                **fit,
                **evaluate.harness_results(config.eval, ws.staging,
                                           str(ws.base_dir) if written == "adapter" else None,
                                           lineage=[ws.base_uri], store=ws.store),
                "method": config.method,
                "output": written if config.method == "dpo" else f"{written} (AutoModelForSequenceClassification)",
                "trainableParameters": trainable,
                "parameters": total,
                **{k: v for k, v in after.items() if k != "loss"},
                **({"heldOutLoss": after["loss"]} if "loss" in after else {}),
                **{f"{k}Before": v for k, v in before.items()
                   if k in (("likelihoodAccuracy", "loss") if config.method == "dpo" else ("preferenceAccuracy", "loss"))},
                **{f"data{k[0].upper()}{k[1:]}": v for k, v in data.stats.to_json().items()},
            }
            if config.method == "dpo":
                results.update({"beta": config.dpo.beta, "dpoLoss": config.dpo.loss,
                                "referencePrecomputed": config.dpo.precompute_reference})
            ref = config.reference.uri if config.reference is not None else None
            publish_and_succeed(ws, STAGE, input_receipts(ws, model=ws.base_uri, reference=ref,
                                                          dataset=dataset.uri), results)
            log(f"wrote {written} to {ws.out_uri}; held-out preference accuracy "
                f"{before.get('preferenceAccuracy')} -> {after.get('preferenceAccuracy')}")
        barrier()
        engine.close_metrics()
        return 0
    finally:
        shutil.rmtree(ws.cache, ignore_errors=True)
        shutdown()


def main(argv: list[str] | None = None) -> int:
    from crucible.trainer.stage_io import stage_main

    return stage_main(STAGE, PreferenceConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
