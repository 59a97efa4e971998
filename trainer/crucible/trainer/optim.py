"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedules.

The schedule is a pure function of the step (:func:`lr_at`), so a resumed run needs no
scheduler state: the step in the checkpoint is enough, and every rank agrees by construction.

* ``cosine``: linear warmup, then cosine from ``lr`` down to ``lr × minLrRatio``.
* ``wsd`` (warmup-stable-decay, Hu et al. 2024 "MiniCPM"): warmup, constant ``lr``, and a
  linear decay to the floor over the last ``decayFraction`` of the steps.
* ``linear``: warmup, then linear decay to the floor. ``constant``: warmup, then ``lr``.
"""

from __future__ import annotations

import math

import torch

from crucible.trainer.config.training import OptimizerConfig


def lr_at(step: int, total_steps: int, cfg: OptimizerConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based) of ``total_steps``."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    if cfg.schedule == "constant":
        return peak
    span = max(total_steps - warmup, 1)
    progress = min(max((step - warmup) / span, 0.0), 1.0)
    if cfg.schedule == "cosine":
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "linear":
        return peak + (floor - peak) * progress
    decay_steps = max(round(total_steps * cfg.decay_fraction), 1)
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return peak
    return peak + (floor - peak) * min((step - decay_start + 1) / decay_steps, 1.0)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """Trainable parameters only (LoRA: the adapters), decay on matrices, none on norms/biases."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups: list[dict[str, object]] = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if not groups:
        raise ValueError("the model has no trainable parameters (every requires_grad is False)")
    return groups


def build_adamw(model: torch.nn.Module, cfg: OptimizerConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with the fused kernel (CUDA and CPU); the multi-tensor (foreach) path elsewhere."""
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=fused,
        foreach=None if fused else True,
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
