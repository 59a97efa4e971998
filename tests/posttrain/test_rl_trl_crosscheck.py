"""Our GRPO and RLOO advantages and losses against TRL's own GRPOTrainer / RLOOTrainer on one fixed batch.

TRL is given the same prompts, the same completions (its ``_generate`` returns ours) and the same rewards
(a reward function returning fixed numbers); its ``_generate_and_score_completions`` then computes the
advantages (and old/reference log-probs) and its ``_compute_loss`` the loss, which we compare with
:mod:`crucible.trainer.rl.losses` fed by our own log-prob computation. Equal within 1e-5.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from crucible.trainer.rl import losses
from crucible.trainer.rl.loop import collate, completion_terms

GROUP = 4
PROMPTS = ["one two", "good bad", "yes no"]
COMPLETIONS = [" brown fox", " lazy", " jumps over the", " dog", " three", " four five", " ten", " six seven",
               " bird", " fish apple", " banana", " cherry good"]
REWARDS = [1.0, 0.0, 0.5, 0.25, 1.0, 1.0, 0.0, 0.75, 0.2, 0.9, 0.1, 0.4]


@pytest.fixture(scope="module")
def setup(tiny_model_dir: Path):
    torch.manual_seed(3)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():  # differ from the reference so the KL is not 0
        for param in policy.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    assert len({len(p) for p in prompt_ids}) == 1, "equal prompt lengths: no left padding, identical positions"
    eos = tokenizer.eos_token_id
    completion_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] + [eos] for c in COMPLETIONS]
    return policy, tokenizer, prompt_ids, completion_ids


def _trainer(kind: str, policy, tokenizer, tmp_path: Path, prompt_ids, completion_ids, beta: float, iterations: int):
    pytest.importorskip("trl")
    from datasets import Dataset

    if kind == "grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer
    else:
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer

    def reward(prompts, completions, **_):  # TRL's reward-function signature; the fixed rewards in order
        return list(REWARDS)

    extra = {"loss_type": "grpo"} if kind == "grpo" else {}  # TRL's default is dapo; ours is the paper's grpo
    args = Config(output_dir=str(tmp_path / kind), **extra, per_device_train_batch_size=len(COMPLETIONS),
                  num_generations=GROUP, max_completion_length=8, beta=beta, num_iterations=iterations,
                  epsilon=0.2, report_to=[], use_cpu=True, bf16=False, temperature=1.0, logging_steps=1)
    trainer = Trainer(model=policy, reward_funcs=[reward], args=args,
                      train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}), processing_class=tokenizer)
    rows = [ids for ids in prompt_ids for _ in range(GROUP)]
    texts = [tokenizer.decode(c, skip_special_tokens=True) for c in completion_ids]

    def fixed_generate(prompts):  # the two trainers' _generate return different tuples
        if kind == "grpo":
            return rows, completion_ids, None, texts, None, {}, None, None
        return rows, completion_ids, texts

    trainer._generate = fixed_generate
    trainer.model.eval()
    inputs = [{"prompt": p} for p in PROMPTS for _ in range(GROUP)]
    return trainer, inputs


def _ours(policy, prompt_ids, completion_ids, advantages):
    samples = [{"prompt": p, "completion": c, "advantages": float(a)}
               for p, c, a in zip([ids for ids in prompt_ids for _ in range(GROUP)], completion_ids,
                                  advantages.tolist(), strict=True)]
    batch = collate(samples, pad_id=0)
    logps, _, _ = completion_terms(policy, batch, 1.0)
    return batch, logps


@pytest.mark.parametrize(("beta", "iterations"), [(0.0, 1), (0.04, 1), (0.1, 2)])
def test_grpo_advantages_and_loss_match_trl(setup, tmp_path: Path, beta: float, iterations: int) -> None:
    policy, tokenizer, prompt_ids, completion_ids = setup
    trainer, inputs = _trainer("grpo", policy, tokenizer, tmp_path, prompt_ids, completion_ids, beta, iterations)
    with torch.no_grad():
        theirs = trainer._generate_and_score_completions(inputs)
        trl_loss = float(trainer._compute_loss(trainer.model, theirs))
    advantages = losses.grpo_advantages(torch.tensor(REWARDS), GROUP)
    torch.testing.assert_close(advantages, theirs["advantages"].float(), atol=1e-5, rtol=0)
    with torch.no_grad():
        batch, logps = _ours(policy, prompt_ids, completion_ids, advantages)
        mask = batch["completion_mask"]
        ref = None
        if beta:
            ref_model = trainer.ref_model if trainer.ref_model is not None else None
            assert ref_model is not None
            ref, _, _ = completion_terms(ref_model, batch, 1.0)
            torch.testing.assert_close(ref * mask, theirs["ref_per_token_logps"] * mask, atol=1e-5, rtol=0)
        old = logps if iterations > 1 else None  # TRL computes old log-probs only when it reuses samples
        ours = losses.grpo_loss(logps, old, ref, advantages, mask, clip_range=0.2, kl_coef=beta)
    assert abs(float(ours.loss) - trl_loss) < 1e-5, (float(ours.loss), trl_loss)


@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_rloo_advantages_and_loss_match_trl(setup, tmp_path: Path, beta: float) -> None:
    policy, tokenizer, prompt_ids, completion_ids = setup
    trainer, inputs = _trainer("rloo", policy, tokenizer, tmp_path, prompt_ids, completion_ids, beta, 1)
    with torch.no_grad():
        theirs = trainer._generate_and_score_completions(inputs)
        trl_loss = float(trainer._compute_loss(trainer.model, theirs))
        batch, logps = _ours(policy, prompt_ids, completion_ids, torch.zeros(len(REWARDS)))
        mask = batch["completion_mask"]
        rewards = torch.tensor(REWARDS)
        ref = None
        if beta:
            ref, _, _ = completion_terms(trainer.ref_model, batch, 1.0)
            rewards = losses.rloo_kl_rewards(rewards, logps, ref, mask, beta)
        advantages = losses.rloo_advantages(rewards, GROUP)
        torch.testing.assert_close(advantages, theirs["advantages"].float(), atol=1e-5, rtol=0)
        ours = losses.rloo_loss(logps, logps, ref, advantages, mask, clip_range=0.2)
    assert abs(float(ours.loss) - trl_loss) < 1e-5, (float(ours.loss), trl_loss)
