"""A PreferenceRun with ``method: grpo | rloo | ppo``: online policy optimisation against a reward.

parse → base policy + tokenizer → reward (reward-model run checked, rules compiled) → prompts
(every record checked) → policy (LoRA or full; PPO: + value head) → frozen reference (the adapter
disabled under LoRA; a separate copy with the same tokenizer otherwise) → held-out prompts
answered greedily and scored → :class:`~crucible.trainer.engine.Engine` with
:class:`~crucible.trainer.rl.loop.RlObjective` → the same held-out prompts after, reward before /
after and the win rate of after over before → export (merged or adapter; PPO's value head is not
part of the model) → ``_SUCCESS``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from crucible.trainer.config.stages import PreferenceConfig
from crucible.trainer.faults import SpecError
from crucible.trainer.rl.loop import PolicyWithValue, RlObjective, RolloutMaker, language_model
from crucible.trainer.rl.prompts import Prompt
from crucible.trainer.rl.rewards import Reward, RewardModelScorer, check_reward_model

STAGE = "preference"


def build_reward(config: PreferenceConfig, ws: Any, device: torch.device) -> Reward:
    from crucible.trainer.posttrain import local_model

    assert config.reward is not None
    scorer = None
    if config.reward.model is not None:
        uri = config.reward.model.uri
        if not uri:
            raise SpecError("spec.reward.model.fromRun was not resolved to spec.reward.model.uri")
        directory = local_model(ws.store, uri, "spec.reward.model.uri", ws.cache / "reward")
        check_reward_model(Path(directory), uri)
        scorer = RewardModelScorer(Path(directory), device, config.training.micro_batch_size)
    return Reward(config.reward, scorer)


def held_out(maker: RolloutMaker, prompts: list[Prompt]) -> dict[str, Any]:
    """``groupSize`` samples per held-out prompt at the training temperature, from the same seed before and
    after (the policy, not the dice, makes the difference); their rewards and reward-model scores."""
    if not prompts:
        return {}
    group = maker.rl.group_size
    _, completions = maker.sample(prompts, index=-1, group=group)
    totals, components = maker.score(prompts, completions, group)
    texts = [maker.tokenizer.decode(c, skip_special_tokens=True) for c in completions]
    return {"answers": texts[::group], "rewards": totals, "modelScores": components.get("model"),
            "group": group}


def win_rate(before: dict[str, Any], after: dict[str, Any]) -> tuple[float, str]:
    """Share of held-out samples whose answer after scores higher than the same draw before (ties count half)."""
    key, under = ("modelScores", "reward model") if before.get("modelScores") is not None else ("rewards", "reward")
    pairs = list(zip(after[key], before[key], strict=True))
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs)
    return wins / len(pairs), under


def write_held_out(out_dir: Path, prompts: list[Prompt], before: dict[str, Any], after: dict[str, Any]) -> None:
    """``eval/rl.{json,md}``: each held-out prompt, its first sample before and after, mean rewards of its samples."""
    group = before["group"]

    def mean_of(rewards: list[float], i: int) -> float:
        return sum(rewards[i * group : (i + 1) * group]) / group

    rows = [{"prompt": p.text, "before": before["answers"][i], "after": after["answers"][i],
             "rewardBefore": mean_of(before["rewards"], i), "rewardAfter": mean_of(after["rewards"], i)}
            for i, p in enumerate(prompts)]
    (out_dir / "eval").mkdir(parents=True, exist_ok=True)
    (out_dir / "eval" / "rl.json").write_text(json.dumps(rows, indent=1))
    lines = ["# Held-out prompts before and after RL", "",
             f"A sample of each prompt; rewards are the mean over its {group} samples.", "",
             "| prompt | before | reward | after | reward |", "| --- | --- | --- | --- | --- |"]

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    for r in rows:
        lines.append(f"| {cell(r['prompt'])} | {cell(r['before'])} | {r['rewardBefore']:.3f} | {cell(r['after'])} "
                     f"| {r['rewardAfter']:.3f} |")
    (out_dir / "eval" / "rl.md").write_text("\n".join(lines) + "\n")


def build_policy(config: PreferenceConfig, base_dir: Path) -> Any:
    from crucible.trainer import lora
    from crucible.trainer.finetune import check_seq_len

    model = lora.load_base(base_dir, "lora")
    check_seq_len(model, config.training.seq_len)
    if config.lora is not None:
        model = lora.wrap(model, config.lora, "CAUSAL_LM", seed=config.training.seed)
    return PolicyWithValue(model, config.training.seed) if config.method == "ppo" else model


def export_policy(engine: Any, ws: Any, config: PreferenceConfig, tokenizer: Any) -> str | None:
    from crucible.trainer import lora

    state = engine.strategy.export_state()  # collective
    if not engine.env.is_main:
        return None
    assert state is not None
    if config.method == "ppo":  # the value head trains the critic; the exported model is the policy alone
        state = {k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")}
    return lora.export(state, ws.staging, ws.base_dir, ws.base_uri, config.lora, config.merge_adapter, tokenizer)


def run(config: PreferenceConfig) -> int:
    from crucible.trainer import evaluate
    from crucible.trainer.distributed import barrier, init_distributed, shutdown
    from crucible.trainer.engine import Engine
    from crucible.trainer.lora import trainable_parameters
    from crucible.trainer.posttrain import (
        input_receipts,
        load_exported_lm,
        load_tokenizer,
        log,
        open_workspace,
        publish_and_succeed,
        write_prompts,
    )
    from crucible.trainer.preference import build_reference
    from crucible.trainer.rl.prompts import read_prompts
    from crucible.trainer.sft_data import pad_id_of

    assert config.prompts is not None and config.reward is not None
    evaluate.check_harness(config.eval)
    ws = open_workspace(config, STAGE)
    if ws is None:
        return 0
    env = init_distributed(timeout_s=float(config.failure_policy.hang_timeout_seconds))
    try:
        tokenizer = load_tokenizer(ws.base_dir)
        pad_id = pad_id_of(tokenizer)
        reward = build_reward(config, ws, env.device)
        tr, rl = config.training, config.rl
        prompts = read_prompts(config.prompts, tokenizer, tr.seq_len - rl.max_new_tokens, tr.seed, ws.store,
                               check=reward.check_record)
        log(f"prompts: {prompts.stats}")
        module = build_policy(config, ws.base_dir).to(env.device)
        trainable, total = trainable_parameters(module)
        log(f"{config.method}: {trainable:,} of {total:,} parameters train")
        reference = build_reference(config, ws, language_model(module), env.device, tokenizer) if rl.kl_coef > 0 else None
        lockstep = env.world_size > 1 and (tr.strategy == "fsdp" or (tr.strategy == "deepspeed" and tr.zero_stage == 3))
        maker = RolloutMaker(config, prompts.train, reward, reference, tokenizer, pad_id, env, lockstep)
        maker.module = module
        before = held_out(maker, prompts.validation)
        answers_before: list[str] = []
        if config.eval.prompts and env.is_main:
            answers_before = evaluate.answer_prompts(language_model(module), tokenizer, config.eval.prompts,
                                                     config.eval.max_new_tokens, tokenizer.chat_template)
        objective = RlObjective(config, maker, len(prompts.train))
        engine = Engine(config, module, objective, tokenizer, env, ws.store)
        try:
            objective.bind(engine.strategy.module, engine.step_log)
            result = engine.fit()
            after = held_out(maker, prompts.validation)
            written = export_policy(engine, ws, config, tokenizer)
        finally:
            engine.close()
        if env.is_main:
            assert written is not None
            if config.eval.prompts:
                tuned = load_exported_lm(ws.staging, written, ws.base_dir)
                write_prompts(config, ws.staging, tokenizer, answers_before, tuned, tokenizer.chat_template,
                              f"{config.method.upper()}")
            held: dict[str, Any] = {}
            if before:
                write_held_out(ws.staging, prompts.validation, before, after)
                rate, under = win_rate(before, after)
                held = {"rewardBefore": sum(before["rewards"]) / len(before["rewards"]),
                        "rewardAfter": sum(after["rewards"]) / len(after["rewards"]),
                        "winRate": rate, "winRateUnder": under, "heldOutPrompts": len(prompts.validation)}
            fit = {k: v for k, v in result.results().items() if not k.startswith("eval") and k != "perplexity"}
            results: dict[str, Any] = {
                **fit, **held,
                **evaluate.harness_results(config.eval, ws.staging, str(ws.base_dir) if written == "adapter" else None),
                "method": config.method, "output": written, "groupSize": rl.group_size, "klCoef": rl.kl_coef,
                "trainableParameters": trainable, "parameters": total,
                **{f"prompts{k[0].upper()}{k[1:]}": v for k, v in prompts.stats.items()},
            }
            ref = config.reference.uri if config.reference is not None else None
            reward_uri = config.reward.model.uri if config.reward.model is not None else None
            publish_and_succeed(ws, STAGE, input_receipts(ws, model=ws.base_uri, reference=ref, prompts=config.prompts.uri,
                                                          rewardModel=reward_uri), results)
            log(f"wrote {written} to {ws.out_uri}; held-out reward {held.get('rewardBefore')} -> "
                f"{held.get('rewardAfter')}, win rate {held.get('winRate')}")
        barrier()
        return 0
    finally:
        shutil.rmtree(ws.cache, ignore_errors=True)
        shutdown()
