"""The online loop inside the training engine: rollouts as the data, GRPO/RLOO/PPO as the objective.

The engine stays the one loop (checkpoints, watchdog, metrics, strategies); RL plugs in as an
:class:`~crucible.trainer.engine.Objective` whose ``train_batches`` is a :class:`RolloutIterator`:

* A *rollout* is this rank's share of one batch of samples: ``microBatchSize × accumulation /
  groupSize`` prompts, each sampled ``groupSize`` times with the current policy (KV cache,
  :mod:`.generate`), scored (:mod:`.rewards`), with the old/reference log-probs and advantages it
  needs. The engine's optimizer step consumes ``accumulation`` micro-batches, so one rollout feeds
  ``rl.epochs`` optimizer steps (TRL's ``num_iterations``) and then the next one is sampled.
* Sampling is seeded by (``training.seed``, rollout number, rank) through its own generator, so
  the same checkpoint gives the same samples; the iterator's ``state_dict`` (saved in every
  checkpoint through the engine's data state) holds the prompt position, the rollout number, the
  cursor into the rollout and — when a checkpoint falls inside a rollout — the rollout itself,
  gathered from every rank. A resume after SIGKILL therefore continues bit for bit.
* Rollout statistics (reward mean/std, components, response length, generation time) are reduced
  over ranks when the rollout is made and ride along every micro-batch, so the engine's per-step
  metrics carry them unchanged; the loss adds KL, entropy and clip fraction.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from crucible.trainer.config.stages import PreferenceConfig
from crucible.trainer.engine import Batch, TrainContext
from crucible.trainer.faults import SpecError
from crucible.trainer.rl import losses
from crucible.trainer.rl.generate import generate, left_pad, positions
from crucible.trainer.rl.prompts import Prompt
from crucible.trainer.rl.rewards import Reward, Sample
from crucible.trainer.sampler import GlobalSampler

# -- the policy (and PPO's value head) -------------------------------------------------------


class PolicyWithValue(torch.nn.Module):
    """PPO's actor-critic: the causal LM and a scalar value head on its last hidden state."""

    def __init__(self, policy: Any, seed: int) -> None:
        super().__init__()
        self.policy = policy
        hidden = int(policy.config.hidden_size)
        torch.manual_seed(seed)  # the same head on every rank
        self.value_head = torch.nn.Linear(hidden, 1)
        torch.nn.init.normal_(self.value_head.weight, std=float(getattr(policy.config, "initializer_range", 0.02)))
        torch.nn.init.zeros_(self.value_head.bias)

    @property
    def config(self) -> Any:
        return self.policy.config

    def forward(self, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.policy(**kwargs, output_hidden_states=True)
        keep = kwargs.get("logits_to_keep", 0) or out.hidden_states[-1].size(1)
        values = self.value_head(out.hidden_states[-1][:, -keep:].float()).squeeze(-1)  # (B, keep)
        return out.logits, values


def language_model(module: Any) -> Any:
    return module.policy if isinstance(module, PolicyWithValue) else module


def completion_terms(model: Any, batch: Batch, temperature: float, with_values: bool = False,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per completion token: log-prob under ``model`` (logits / temperature), entropy, value; each (B, C)."""
    c = batch["completion_mask"].size(1)
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "position_ids": batch["position_ids"], "use_cache": False, "logits_to_keep": c + 1}
    values = None
    if with_values:
        logits, values = model(**kwargs)
        values = values[:, :-1]  # (B, C): the value of the state before each completion token
    else:
        logits = model(**kwargs).logits
    logits = logits[:, :-1].float() / temperature  # (B, C, V): position t predicts completion token t
    logp_all = logits.log_softmax(-1)
    targets = batch["input_ids"][:, -c:]
    logps = torch.gather(logp_all, 2, targets.unsqueeze(-1)).squeeze(-1)  # (B, C)
    entropy = -(logp_all.exp() * logp_all).sum(-1)  # (B, C)
    return logps, entropy, values


# -- rollouts ---------------------------------------------------------------------------------


@dataclass
class Rollout:
    """One rank's samples of one batch: JSON-safe lists (floats are float32 values, exact in JSON)."""

    samples: list[dict[str, Any]]
    stats: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"samples": self.samples, "stats": self.stats}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Rollout:
        return cls(list(data["samples"]), {k: float(v) for k, v in data["stats"].items()})


def collate(samples: list[dict[str, Any]], pad_id: int) -> Batch:
    """Left-padded prompts then right-padded completions: ``input_ids`` (B, P + C), masks, per-token fields."""
    prompt_ids, prompt_mask = left_pad([s["prompt"] for s in samples], pad_id)  # (B, P)
    width = max(len(s["completion"]) for s in samples)
    completion = torch.full((len(samples), width), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((len(samples), width), dtype=torch.float32)
    per_token: dict[str, torch.Tensor] = {}
    for key in ("oldLogps", "refLogps", "oldValues", "returns", "advantages"):
        if samples[0].get(key) is not None and isinstance(samples[0][key], list):
            per_token[key] = torch.zeros((len(samples), width), dtype=torch.float32)
    for i, s in enumerate(samples):
        n = len(s["completion"])
        completion[i, :n] = torch.tensor(s["completion"], dtype=torch.long)
        completion_mask[i, :n] = 1
        for key, tensor in per_token.items():
            tensor[i, :n] = torch.tensor(s[key], dtype=torch.float32)
    attention = torch.cat([prompt_mask, completion_mask.long()], dim=1)
    batch: Batch = {
        "input_ids": torch.cat([prompt_ids, completion], dim=1),  # (B, P + C)
        "attention_mask": attention,
        "position_ids": positions(attention),
        "completion_mask": completion_mask,  # (B, C)
        **{f"per_token_{k}": v for k, v in per_token.items()},
    }
    if "advantages" in samples[0] and not isinstance(samples[0]["advantages"], list):
        batch["advantages"] = torch.tensor([s["advantages"] for s in samples], dtype=torch.float32)  # (B,)
    return batch


class RolloutMaker:
    """Samples, scores and prepares one rollout with the current policy (bound after the engine is built)."""

    def __init__(self, config: PreferenceConfig, prompts: list[Prompt], reward: Reward, reference: Any,
                 tokenizer: Any, pad_id: int, env: Any, lockstep: bool) -> None:
        self.config = config
        self.rl = config.rl
        self.method = config.method
        self.prompts = prompts
        self.reward = reward
        self.reference = reference
        self.tokenizer = tokenizer
        self.pad_id = pad_id
        self.env = env
        self.lockstep = lockstep
        self.module: Any = None  # the policy (PolicyWithValue for PPO), set by RlObjective.bind
        self.on_rollout: Any = None

    def _seeded(self, index: int) -> torch.Generator:
        generator = torch.Generator(device=self.env.device)
        generator.manual_seed((self.config.training.seed * 1_000_003 + index * 7_919 + self.env.rank) % (2**63))
        return generator

    def sample(self, prompts: list[Prompt], index: int, temperature: float | None = None, group: int | None = None,
               ) -> tuple[list[list[int]], list[list[int]]]:
        """(prompt ids, completion ids) of ``group`` samples per prompt, group by group."""
        group = self.rl.group_size if group is None else group
        rows = [p.ids for p in prompts for _ in range(group)]
        gen = generate(language_model(self.module), rows, max_new_tokens=self.rl.max_new_tokens,
                       eos_id=self.tokenizer.eos_token_id, pad_id=self.pad_id,
                       temperature=self.rl.temperature if temperature is None else temperature,
                       top_p=self.rl.top_p, generator=self._seeded(index), lockstep=self.lockstep)
        # an empty completion (EOS cut at 0 tokens cannot happen; max_new_tokens ≥ 1) always has ≥ 1 token
        return rows, gen.completions

    def score(self, prompts: list[Prompt], completions: list[list[int]], group: int,
              ) -> tuple[list[float], dict[str, list[float]]]:
        samples = []
        for i, ids in enumerate(completions):
            prompt = prompts[i // group]
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            samples.append(Sample(prompt.record[self.config.prompts.prompt_field] if self.config.prompts else "",
                                  prompt.record, text, len(ids)))
        return self.reward.score(samples)

    @torch.no_grad()
    def _token_terms(self, rows: list[dict[str, Any]]) -> None:
        """Old log-probs (and values) under the current policy, reference log-probs, per sample."""
        rl = self.rl
        need_old = rl.epochs > 1 or self.method in ("rloo", "ppo")
        need_ref = rl.kl_coef > 0
        mbs = self.config.training.micro_batch_size
        was_training = self.module.training
        self.module.eval()
        try:
            for start in range(0, len(rows), mbs):
                chunk = rows[start : start + mbs]
                batch = {k: v.to(self.env.device) for k, v in collate(chunk, self.pad_id).items()}
                lengths = [len(s["completion"]) for s in chunk]
                if need_old:
                    logps, _, values = completion_terms(self.module, batch, rl.temperature, self.method == "ppo")
                    for s, n, row in zip(chunk, lengths, logps.cpu(), strict=True):
                        s["oldLogps"] = row[:n].tolist()
                    if values is not None:
                        for s, n, row in zip(chunk, lengths, values.cpu(), strict=True):
                            s["oldValues"] = row[:n].tolist()
                if need_ref:
                    with self.reference_model() as ref:
                        ref_logps, _, _ = completion_terms(ref, batch, rl.temperature)
                    for s, n, row in zip(chunk, lengths, ref_logps.cpu(), strict=True):
                        s["refLogps"] = row[:n].tolist()
        finally:
            self.module.train(was_training)

    def reference_model(self) -> Any:
        import contextlib

        reference = self.reference

        @contextlib.contextmanager
        def ctx() -> Iterator[Any]:
            if reference.adapter_model is not None:
                with reference.adapter_model.disable_adapter():
                    yield reference.adapter_model
            else:
                yield reference.frozen

        return ctx()

    def make(self, indices: list[int], index: int) -> Rollout:
        started = time.perf_counter()
        prompts = [self.prompts[i] for i in indices]
        group = self.rl.group_size
        rows, completions = self.sample(prompts, index)
        generation_s = time.perf_counter() - started
        totals, components = self.score(prompts, completions, group)
        samples = [{"prompt": p, "completion": c, "reward": r} for p, c, r in zip(rows, completions, totals, strict=True)]
        self._token_terms(samples)
        self._advantages(samples)
        stats = self._stats(samples, components, generation_s, time.perf_counter() - started)
        rollout = Rollout(samples, stats)
        if self.on_rollout is not None:
            self.on_rollout(index, rollout)
        return rollout

    def _advantages(self, samples: list[dict[str, Any]]) -> None:
        group, rl = self.rl.group_size, self.rl
        rewards = torch.tensor([s["reward"] for s in samples], dtype=torch.float32)
        if self.method == "grpo":
            advantages = losses.grpo_advantages(rewards, group)
        elif self.method == "rloo":
            batch = collate(samples, self.pad_id)
            ref = batch.get("per_token_refLogps")
            if ref is not None:
                rewards = losses.rloo_kl_rewards(rewards, batch["per_token_oldLogps"], ref, batch["completion_mask"],
                                                 rl.kl_coef)
            advantages = losses.rloo_advantages(rewards, group)
        else:
            batch = collate(samples, self.pad_id)
            mask = batch["completion_mask"]
            token_rewards = losses.ppo_token_rewards(rewards, batch["per_token_oldLogps"],
                                                     batch.get("per_token_refLogps"), mask, rl.kl_coef)
            token_adv, returns = losses.gae(token_rewards, batch["per_token_oldValues"], mask, rl.gamma, rl.lam)
            token_adv = losses.whiten(token_adv, mask)
            for i, s in enumerate(samples):
                n = len(s["completion"])
                s["advantages"] = token_adv[i, :n].tolist()
                s["returns"] = returns[i, :n].tolist()
            return
        for s, a in zip(samples, advantages.tolist(), strict=True):
            s["advantages"] = a

    def _stats(self, samples: list[dict[str, Any]], components: dict[str, list[float]], generation_s: float,
               rollout_s: float) -> dict[str, float]:
        """Global (all-rank) statistics of the rollout, identical on every rank."""
        rewards = [s["reward"] for s in samples]
        lengths = [len(s["completion"]) for s in samples]
        eos = self.tokenizer.eos_token_id
        ended = [float(bool(s["completion"]) and s["completion"][-1] == eos) for s in samples]
        names = sorted(components)
        sums = [float(len(samples)), sum(rewards), sum(r * r for r in rewards), float(sum(lengths)), sum(ended),
                *[sum(components[n]) for n in names]]
        totals = torch.tensor(sums, dtype=torch.float64)
        timing = torch.tensor([generation_s, rollout_s], dtype=torch.float64)
        if self.env.world_size > 1:
            torch.distributed.all_reduce(totals)
            torch.distributed.all_reduce(timing, op=torch.distributed.ReduceOp.MAX)
        n, total, squares, length, finished, *parts = totals.tolist()
        mean = total / n
        variance = max(squares / n - mean * mean, 0.0) * n / max(n - 1, 1)
        stats = {"rewardMean": mean, "rewardStd": variance**0.5, "responseLength": length / n,
                 "finishedFraction": finished / n, "generationSeconds": timing[0].item(),
                 "rolloutSeconds": timing[1].item()}
        stats.update({f"reward_{name}": value / n for name, value in zip(names, parts, strict=True)})
        return stats


class RolloutIterator:
    """The engine's data iterator for RL: micro-batches of the current rollout, a new rollout when spent."""

    def __init__(self, maker: RolloutMaker, sampler: GlobalSampler, micro_batch_size: int, grad_accum: int,
                 epochs: int, log: Any) -> None:
        self.maker = maker
        self.sampler = sampler
        self.micro_batch_size = micro_batch_size
        self.grad_accum = grad_accum
        self.epochs = epochs
        self.log = log
        self.rollout: Rollout | None = None
        self.index = 0  # rollouts made so far
        self.cursor = 0  # micro-batches of the current rollout consumed

    @property
    def position(self) -> int:
        return self.sampler.position

    def __iter__(self) -> RolloutIterator:
        return self

    def __next__(self) -> Batch:
        if self.rollout is None or self.cursor >= self.grad_accum * self.epochs:
            self.rollout = self.maker.make(self.sampler.next_indices(), self.index)
            self.index += 1
            self.cursor = 0
        micro = self.cursor % self.grad_accum
        first_pass = self.cursor < self.grad_accum
        self.cursor += 1
        chunk = self.rollout.samples[micro * self.micro_batch_size : (micro + 1) * self.micro_batch_size]
        batch = collate(chunk, self.maker.pad_id)
        stats = dict(self.rollout.stats)
        if not first_pass:  # later epochs reuse the samples: no time spent generating in this step
            stats["generationSeconds"] = stats["rolloutSeconds"] = 0.0
        batch["stats"] = stats  # type: ignore[assignment]  # plain floats ride along, the engine passes them through
        return batch

    def skip(self, start: int, end: int) -> None:
        self.sampler.skip(start, end)

    def state_dict(self) -> dict[str, Any]:
        """Collective (every rank saves at the same step): the rollout is gathered from all ranks."""
        mine = self.rollout.to_json() if self.rollout is not None and self.cursor < self.grad_accum * self.epochs else None
        rollouts: list[Any] = [mine]
        world = self.maker.env.world_size
        if world > 1:
            rollouts = [None] * world
            torch.distributed.all_gather_object(rollouts, mine)
        return {**self.sampler.state_dict(), "rollout": self.index, "cursor": self.cursor, "rollouts": rollouts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
        self.index = int(state.get("rollout", 0))
        self.cursor = int(state.get("cursor", 0))
        rollouts = state.get("rollouts") or []
        env = self.maker.env
        if len(rollouts) == env.world_size and rollouts[env.rank] is not None:
            self.rollout = Rollout.from_json(rollouts[env.rank])
        else:
            if any(r is not None for r in rollouts):
                self.log(f"the checkpoint holds a partly used batch of samples from {len(rollouts)} ranks, this "
                         f"attempt has {env.world_size}; it is dropped and the next batch is sampled")
            self.rollout = None
            self.cursor = self.grad_accum * self.epochs


# -- the objective ---------------------------------------------------------------------------


def _log(msg: str) -> None:
    print(f"[crucible rl] {msg}", file=sys.stderr, flush=True)


class RlObjective:
    """GRPO / RLOO / PPO losses on the micro-batches of a :class:`RolloutIterator`."""

    def __init__(self, config: PreferenceConfig, maker: RolloutMaker, num_prompts: int) -> None:
        self.config = config
        self.rl = config.rl
        self.method = config.method
        self.maker = maker
        self.num_prompts = num_prompts

    def bind(self, module: Any, step_log: Any) -> None:
        self.maker.module = module
        if step_log is not None:
            self.maker.on_rollout = lambda index, rollout: self._log_rollout(step_log, index, rollout)

    def _log_rollout(self, step_log: Any, index: int, rollout: Rollout) -> None:
        import hashlib
        import json

        tok = self.maker.tokenizer
        digest = hashlib.sha256(json.dumps([[s["completion"], s["reward"]] for s in rollout.samples]).encode())
        shown = rollout.samples[: self.rl.group_size]
        step_log.event("samples", rollout=index, rank=self.maker.env.rank, sha256=digest.hexdigest()[:16],
                       prompt=tok.decode(shown[0]["prompt"], skip_special_tokens=True),
                       completions=[tok.decode(s["completion"], skip_special_tokens=True) for s in shown],
                       rewards=[s["reward"] for s in shown])

    def train_batches(self, ctx: TrainContext) -> RolloutIterator:
        per_rank = ctx.micro_batch_size * ctx.grad_accum
        if per_rank % self.rl.group_size:
            raise SpecError(
                f"rl.groupSize: each rank samples microBatchSize × accumulation = {ctx.micro_batch_size} × "
                f"{ctx.grad_accum} = {per_rank} completions per step, not whole groups of {self.rl.group_size}; "
                "change training.microBatchSize, training.globalBatchTokens or rl.groupSize"
            )
        prompts_per_rank = per_rank // self.rl.group_size
        if self.num_prompts < prompts_per_rank * ctx.env.world_size:
            raise SpecError(
                f"spec.prompts.uri: {self.num_prompts} training prompts, fewer than one step needs "
                f"({prompts_per_rank} × {ctx.env.world_size} ranks); add prompts or lower training.globalBatchTokens"
            )
        sampler = GlobalSampler(self.num_prompts, prompts_per_rank, ctx.env.rank, ctx.env.world_size, ctx.seed)
        return RolloutIterator(self.maker, sampler, ctx.micro_batch_size, ctx.grad_accum, self.rl.epochs, _log)

    def eval_batches(self, ctx: TrainContext) -> Iterable[Batch] | None:
        return None  # held-out prompts are scored before and after the run (reward and win rate)

    def tokens(self, batch: Batch) -> int:
        return int(batch["attention_mask"].sum())

    def loss(self, model: Any, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        rl, mask = self.rl, batch["completion_mask"]
        logps, entropy, values = completion_terms(model, batch, rl.temperature, self.method == "ppo")
        old, ref = batch.get("per_token_oldLogps"), batch.get("per_token_refLogps")
        if self.method == "grpo":
            terms = losses.grpo_loss(logps, old, ref, batch["advantages"], mask, clip_range=rl.clip_range,
                                     kl_coef=rl.kl_coef)
        elif self.method == "rloo":
            assert old is not None
            terms = losses.rloo_loss(logps, old, ref, batch["advantages"], mask, clip_range=rl.clip_range)
        else:
            assert old is not None and values is not None
            terms = losses.ppo_loss(logps, old, ref, batch["per_token_advantages"], values,
                                    batch["per_token_oldValues"], batch["per_token_returns"], mask,
                                    clip_range=rl.clip_range, value_coef=rl.value_coef)
        metrics: dict[str, Any] = {
            "kl": terms.kl, "clipFraction": terms.clip_fraction,
            "entropy": ((entropy.detach() * mask).sum() / mask.sum().clamp(min=1.0)),
            **batch.get("stats", {}),  # type: ignore[dict-item]
        }
        if terms.value_loss is not None:
            metrics["valueLoss"] = terms.value_loss
        return terms.loss, metrics

    @staticmethod
    def step_metrics(extras: dict[str, float], step_seconds: float) -> tuple[dict[str, float], dict[str, float | None]]:
        """The engine's per-step hook: extra record fields and the Prometheus gauges (``crucible_rl_*``)."""
        generation = extras.get("generationSeconds", 0.0)
        share = min(1.0, generation / step_seconds) if step_seconds > 0 else 0.0
        gauges = {
            "rl_reward_mean": extras.get("rewardMean"), "rl_reward_std": extras.get("rewardStd"),
            "rl_kl": extras.get("kl"), "rl_entropy": extras.get("entropy"),
            "rl_clip_fraction": extras.get("clipFraction"), "rl_response_length": extras.get("responseLength"),
            "rl_generation_share": share,
        }
        return {"generationShare": share}, gauges
