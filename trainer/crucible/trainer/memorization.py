"""Memorisation check: does the model reproduce its training documents verbatim?

Following the extraction test of Carlini et al. ("Quantifying Memorization Across Neural
Language Models", 2022): take documents the model was trained on and documents it never saw
(the validation split), prompt with each one's first ``prefixTokens`` tokens, decode
``continuationTokens`` greedily, and count exact matches with the true continuation. A model
that generalises continues both about equally well; one that memorised continues its training
documents far more often. The report gives both rates and their ratio; ``maxTrainMatchRate``
fails the stage (after its output is written, so nothing is lost) when the training rate is too high.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from crucible.trainer.data.shards import ShardSet


class MemorizationError(RuntimeError):
    """The model reproduces more training continuations than ``eval.memorization.maxTrainMatchRate``."""


@dataclass
class SplitRate:
    documents: int
    exact_matches: int
    token_match_rate: float

    @property
    def exact_rate(self) -> float:
        return self.exact_matches / self.documents if self.documents else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"documents": self.documents, "exactMatches": self.exact_matches,
                "exactMatchRate": round(self.exact_rate, 4), "tokenMatchRate": round(self.token_match_rate, 4)}


def sample_windows(shards: ShardSet, count: int, length: int, seed: int) -> np.ndarray:
    """``count`` windows of ``length`` tokens, each from the start of a different long-enough document."""
    docs = [d for d in shards.documents() if len(d) >= length]
    if not docs:
        return np.zeros((0, length), dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(docs))[:count]
    return np.stack([docs[i][:length].astype(np.int64) for i in sorted(order)])


@torch.no_grad()
def continuation_rate(model: Any, windows: np.ndarray, prefix: int, continuation: int, batch: int = 8) -> SplitRate:
    """Greedy continuation of each window's prefix compared with its true continuation."""
    if len(windows) == 0:
        return SplitRate(0, 0, 0.0)
    device = next(model.parameters()).device
    was_training = model.training
    use_cache = getattr(model.config, "use_cache", None)
    model.eval()
    model.config.use_cache = True
    exact, token_hits = 0, 0
    try:
        for start in range(0, len(windows), batch):
            chunk = torch.from_numpy(windows[start:start + batch]).to(device)  # (B, prefix + continuation)
            prompt = chunk[:, :prefix]
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                 max_new_tokens=continuation, min_new_tokens=continuation, do_sample=False,
                                 pad_token_id=0, eos_token_id=None)
            produced = out[:, prefix:prefix + continuation]  # (B, continuation)
            truth = chunk[:, prefix:prefix + continuation]
            same = produced == truth
            exact += int(same.all(dim=1).sum())
            token_hits += int(same.sum())
    finally:
        model.config.use_cache = use_cache
        model.train(was_training)
    return SplitRate(len(windows), exact, token_hits / (len(windows) * continuation))


def memorization_check(model: Any, train: ShardSet, validation: ShardSet | None, cfg: Any,
                       seed: int) -> dict[str, Any]:
    """The ``memorization`` block of a stage's results (raises MemorizationError past the limit)."""
    length = cfg.prefix_tokens + cfg.continuation_tokens
    trained = continuation_rate(model, sample_windows(train, cfg.documents, length, seed),
                                cfg.prefix_tokens, cfg.continuation_tokens)
    held_out = (continuation_rate(model, sample_windows(validation, cfg.documents, length, seed + 1),
                                  cfg.prefix_tokens, cfg.continuation_tokens)
                if validation is not None else SplitRate(0, 0, 0.0))
    floor = 1.0 / max(1, held_out.documents)  # one match: the ratio stays finite when held-out has none
    result = {
        "prefixTokens": cfg.prefix_tokens,
        "continuationTokens": cfg.continuation_tokens,
        "train": trained.to_json(),
        "heldOut": held_out.to_json(),
        "ratio": round(trained.exact_rate / max(held_out.exact_rate, floor), 4) if held_out.documents else None,
        "maxTrainMatchRate": cfg.max_train_match_rate,
    }
    if trained.documents == 0:
        result["note"] = f"no training document has {length} tokens; lower prefixTokens/continuationTokens"
    return result


def enforce(result: dict[str, Any]) -> None:
    limit = result.get("maxTrainMatchRate")
    rate = result["train"]["exactMatchRate"]
    if limit is not None and rate > limit:
        raise MemorizationError(
            f"eval.memorization.maxTrainMatchRate: the model continues {rate:.1%} of sampled training documents "
            f"verbatim ({result['train']['exactMatches']}/{result['train']['documents']}; held-out "
            f"{result['heldOut']['exactMatchRate']:.1%}), above the limit {limit:.1%}; train for fewer epochs, "
            "deduplicate the data, or raise the limit. The model is written, the run is not marked succeeded."
        )
