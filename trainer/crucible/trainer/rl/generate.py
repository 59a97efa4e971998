"""Batched sampling with the KV cache, from a seeded generator (the same samples after a resume).

All prompts of a call form one batch, left-padded, with explicit ``position_ids`` (each row counts
from its first real token). The prompt is prefilled once; then one token per row per forward pass
through the cache. Randomness comes only from a ``torch.Generator`` seeded by the caller (per
step and rank), never from the global RNG, so dropout streams and resume are unaffected.
``lockstep`` keeps every rank decoding until all ranks are done (a sharded model's forward is a
collective; each rank must run the same number of them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Generated:
    completions: list[list[int]]  # per row, up to and including the first EOS
    finished: list[bool]  # ended with EOS (False: cut at maxNewTokens)


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits → (B,) tokens; temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        cumulative = sorted_probs.cumsum(-1)
        sorted_probs = sorted_probs.masked_fill(cumulative - sorted_probs > top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: Any, prompts: list[list[int]], *, max_new_tokens: int, eos_id: int | None, pad_id: int,
             temperature: float, top_p: float, generator: torch.Generator | None, lockstep: bool = False) -> Generated:
    from transformers import DynamicCache

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        ids, mask = left_pad(prompts, pad_id)
        ids, mask = ids.to(device), mask.to(device)
        pos = positions(mask)
        cache = DynamicCache()
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                    logits_to_keep=1)
        done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        tokens: list[torch.Tensor] = []
        next_pos = pos[:, -1:] + 1
        for _ in range(max_new_tokens):
            token = sample_next(out.logits[:, -1], temperature, top_p, generator)
            token = torch.where(done, torch.full_like(token, pad_id), token)
            tokens.append(token)
            if eos_id is not None:
                done = done | (token == eos_id)
            if _all_done(done, lockstep) or len(tokens) == max_new_tokens:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_pos,
                        cache=cache, use_cache=True)
            next_pos = next_pos + 1
    finally:
        model.train(was_training)
    matrix = torch.stack(tokens, dim=1).cpu().tolist() if tokens else [[] for _ in prompts]
    completions, finished = [], []
    for row in matrix:
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id) + 1]
            finished.append(True)
        else:
            finished.append(False)
        completions.append(row)
    return Generated(completions, finished)


def _all_done(done: torch.Tensor, lockstep: bool) -> bool:
    if not lockstep:
        return bool(done.all())
    flag = torch.tensor([float(not bool(done.all()))], device=done.device)
    torch.distributed.all_reduce(flag)
    return bool(flag.item() == 0)
