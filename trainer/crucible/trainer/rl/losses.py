"""The math of GRPO, RLOO and PPO: advantages and per-micro-batch losses (checked against TRL).

Shapes: ``G`` completions per prompt, rewards ``(N,)`` ordered group by group (N = prompts × G);
per-token tensors ``(B, C)`` over completion tokens, ``mask`` 1 on real completion tokens (the EOS
included), 0 on padding.

* **GRPO** (Shao et al. 2024; TRL ``GRPOTrainer``, ``loss_type="grpo"``, ``scale_rewards="group"``):
  ``A_i = (r_i − mean_g r) / (std_g r + 1e-4)`` (std with Bessel's correction); per token
  ``−min(ρ·A, clip(ρ, 1−ε, 1+ε)·A) + β·(e^{ref−logπ} − (ref−logπ) − 1)``, averaged over each
  completion's tokens, then over completions.
* **RLOO** (Ahmadian et al. 2024; TRL ``RLOOTrainer``): the KL enters the reward,
  ``r'_i = r_i − β·Σ_t (log π_old − log π_ref)``, the baseline is the mean of the *other*
  completions of the prompt, ``A_i = r'_i − (Σ_g r' − r'_i)/(G−1)``; the loss is sequence-level,
  ``−min(ρ_seq·A, clip(ρ_seq)·A)`` with ``ρ_seq = exp(Σ_t log π − Σ_t log π_old)``.
* **PPO** (Schulman et al. 2017, the RLHF form of Ziegler et al. 2019 / TRL's PPO): per-token reward
  ``−β·(log π_old − log π_ref)`` plus the score on the last token, GAE(γ, λ) over a value head,
  whitened advantages, clipped policy loss and clipped value loss ``½·max((V−R)², (V_clip−R)²)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STD_EPS = 1e-4  # TRL's constant in the group normalisation


def grpo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) → (N,): reward minus its group's mean, over the group's (unbiased) std + 1e-4."""
    grouped = rewards.view(-1, group_size)  # (P, G)
    mean = grouped.mean(dim=1).repeat_interleave(group_size)
    std = grouped.std(dim=1).repeat_interleave(group_size)
    return (rewards - mean) / (std + STD_EPS)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) → (N,): reward minus the mean of the other completions of the same prompt."""
    grouped = rewards.view(-1, group_size)  # (P, G)
    baselines = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baselines).reshape(-1)


def rloo_kl_rewards(rewards: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor,
                    mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """RLOO's reward with the sequence KL estimate subtracted: r − β·Σ_t (log π_old − log π_ref)."""
    if kl_coef == 0:
        return rewards
    return rewards - kl_coef * ((old_logps - ref_logps) * mask).sum(-1)


@dataclass(frozen=True)
class LossTerms:
    loss: torch.Tensor  # scalar, with grad
    kl: torch.Tensor  # mean per-token KL estimate to the reference (detached)
    clip_fraction: torch.Tensor  # share of tokens (GRPO, PPO) or sequences (RLOO) whose ratio was clipped
    value_loss: torch.Tensor | None = None


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def _clipped(ratio: torch.Tensor, advantages: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """−min(ρA, clip(ρ)A) and where the clip was active (TRL's region: low with A<0, high with A>0)."""
    loss = -torch.min(ratio * advantages, torch.clamp(ratio, 1 - eps, 1 + eps) * advantages)
    clipped = ((ratio < 1 - eps) & (advantages < 0)) | ((ratio > 1 + eps) & (advantages > 0))
    return loss, clipped.to(ratio.dtype)


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor | None, ref_logps: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, *, clip_range: float, kl_coef: float) -> LossTerms:
    """GRPO's loss of a micro-batch; ``logps``/``old``/``ref`` (B, C), ``advantages`` (B,)."""
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)  # (B, C)
    per_token, clipped = _clipped(ratio, advantages.unsqueeze(1), clip_range)
    kl = torch.zeros((), dtype=logps.dtype, device=logps.device)
    if kl_coef != 0 and ref_logps is not None:
        delta = ref_logps - logps
        per_token_kl = torch.exp(delta) - delta - 1  # (B, C), k3 estimator, ≥ 0
        per_token = per_token + kl_coef * per_token_kl
        kl = _masked_mean(per_token_kl.detach(), mask)
    loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    return LossTerms(loss, kl, _masked_mean(clipped, mask))


def rloo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, *, clip_range: float) -> LossTerms:
    """RLOO's sequence-level clipped loss of a micro-batch (the KL is already in the advantages)."""
    seq, old_seq = (logps * mask).sum(-1), (old_logps * mask).sum(-1)  # (B,)
    per_seq, clipped = _clipped(torch.exp(seq - old_seq), advantages, clip_range)
    kl = torch.zeros((), dtype=logps.dtype, device=logps.device)
    if ref_logps is not None:
        kl = _masked_mean((old_logps - ref_logps).detach(), mask)
    return LossTerms(per_seq.mean(), kl, clipped.mean())


def gae(token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over (B, C) completion tokens; (advantages, returns)."""
    values = values * mask
    last = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.size(1))):
        next_value = values[:, t + 1] if t + 1 < values.size(1) else torch.zeros_like(last)
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        last = last * mask[:, t]
        advantages[:, t] = last
    return advantages, advantages + values


def whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked whitening (TRL's ``masked_whiten``, unbiased variance), padding left at 0."""
    mean = _masked_mean(values, mask)
    centered = values - mean
    count = mask.sum()
    var = _masked_mean(centered**2, mask) * (count / (count - 1).clamp(min=1.0))
    return (centered * torch.rsqrt(var + 1e-8)) * mask


def ppo_token_rewards(scores: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None,
                      mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards: −β·(log π_old − log π_ref) everywhere, plus the score on the last real token."""
    rewards = torch.zeros_like(old_logps)
    if ref_logps is not None and kl_coef != 0:
        rewards = -kl_coef * (old_logps - ref_logps) * mask
    last = (mask.sum(-1) - 1).clamp(min=0).long()  # (B,)
    rewards[torch.arange(rewards.size(0)), last] += scores
    return rewards


def ppo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None, advantages: torch.Tensor,
             values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *,
             clip_range: float, value_coef: float) -> LossTerms:
    """PPO's clipped policy loss + value_coef × clipped value loss; per-token (B, C) everything."""
    per_token, clipped = _clipped(torch.exp(logps - old_logps), advantages, clip_range)
    policy = _masked_mean(per_token, mask)
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    value_loss = 0.5 * _masked_mean(torch.max((values - returns) ** 2, (values_clipped - returns) ** 2), mask)
    kl = torch.zeros((), dtype=logps.dtype, device=logps.device)
    if ref_logps is not None:
        kl = _masked_mean((old_logps - ref_logps).detach(), mask)
    return LossTerms(policy + value_coef * value_loss, kl, _masked_mean(clipped, mask), value_loss.detach())
