"""``method: critique-revision``: preference pairs from the model's own critiques (Constitutional AI, SL stage).

For each prompt the model answers; then, in the same conversation, it is asked to critique its answer
against a principle (``critique.principles``, taken in turn) and to rewrite it. The pair is
``{prompt, chosen: revision, rejected: answer, principle, critique}``, written to
``<output>/pairs.jsonl`` — the dataset a DPO PreferenceRun reads with
``dataset: {fromRun: {kind: PreferenceRun, name: <this run>}}``.

Why a PreferenceRun method of its own rather than a data mode of the DPO run: generation is the
expensive part and has nothing to do with the optimiser; as its own run it is cached (``_SUCCESS``),
its pairs can be read and filtered before anyone trains on them, several DPO runs (other betas,
losses) reuse them, and it stays on the same resource, the same model input and the same placement
as the run that consumes it, with no new kind for the operator. Generation is batched with the KV
cache (:mod:`.generate`), seeded per rank, the prompts split over ranks and gathered on rank 0.
Fields: ``prompts``, ``critique``, ``model``; ``training.seqLen`` bounds each conversation,
``training.microBatchSize`` is the generation batch, ``training.seed`` the seed.
"""

from __future__ import annotations

import json
import shutil
from typing import Any

import torch

from crucible.trainer.config.stages import PreferenceConfig
from crucible.trainer.faults import SpecError
from crucible.trainer.rl.generate import generate
from crucible.trainer.rl.prompts import Prompt, render

STAGE = "preference"


def _conversation(prompt: Any) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def critique_pairs(model: Any, tokenizer: Any, prompts: list[Prompt], config: PreferenceConfig, rank: int,
                   ) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Answer → critique → revision for ``prompts``; the pairs and what was dropped."""
    from crucible.trainer.sft_data import pad_id_of

    assert config.critique is not None and config.prompts is not None
    cq, field = config.critique, config.prompts.prompt_field
    pad, eos = pad_id_of(tokenizer), tokenizer.eos_token_id
    generator = torch.Generator(device=next(model.parameters()).device)
    generator.manual_seed(config.training.seed * 1_000_003 + rank)
    limit = config.training.seq_len
    stats = {"droppedIdentical": 0, "droppedLong": 0}

    def complete(texts: list[str]) -> list[str]:
        out: list[str] = []
        mbs = config.training.micro_batch_size
        for start in range(0, len(texts), mbs):
            rows = [list(tokenizer(t, add_special_tokens=False)["input_ids"])[-limit:] for t in texts[start:start + mbs]]
            gen = generate(model, rows, max_new_tokens=cq.max_new_tokens, eos_id=eos, pad_id=pad,
                           temperature=cq.temperature, top_p=1.0, generator=generator)
            out += [tokenizer.decode(c, skip_special_tokens=True).strip() for c in gen.completions]
        return out

    answers = complete([p.text for p in prompts])
    principles = [cq.principles[i % len(cq.principles)] for i in range(len(prompts))]
    chats = [[*_conversation(p.record[field]), {"role": "assistant", "content": a}] for p, a in zip(prompts, answers, strict=True)]
    asks = [[*chat, {"role": "user", "content": cq.critique_prompt.format(principle=pr)}]
            for chat, pr in zip(chats, principles, strict=True)]
    critiques = complete([render(a, "critique", field, tokenizer) for a in asks])
    revise = [[*a, {"role": "assistant", "content": c}, {"role": "user", "content": cq.revision_prompt.format(principle=pr)}]
              for a, c, pr in zip(asks, critiques, principles, strict=True)]
    texts = [render(r, "revision", field, tokenizer) for r in revise]
    revisions = complete(texts)
    pairs = []
    for p, answer, critique, revision, principle, text in zip(prompts, answers, critiques, revisions, principles, texts,
                                                               strict=True):
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) > limit:
            stats["droppedLong"] += 1
            continue
        if revision == answer or not revision:
            stats["droppedIdentical"] += 1
            continue
        pairs.append({"prompt": p.record[field], "chosen": revision, "rejected": answer, "principle": principle,
                      "critique": critique})
    return pairs, stats


def run(config: PreferenceConfig) -> int:
    from crucible.trainer.distributed import barrier, init_distributed, shutdown
    from crucible.trainer.lora import load_base
    from crucible.trainer.posttrain import (
        input_receipts,
        load_tokenizer,
        log,
        open_workspace,
        publish_and_succeed,
    )
    from crucible.trainer.rl.prompts import read_prompts

    assert config.prompts is not None and config.critique is not None
    ws = open_workspace(config, STAGE)
    if ws is None:
        return 0
    env = init_distributed(timeout_s=float(config.failure_policy.hang_timeout_seconds))
    try:
        tokenizer = load_tokenizer(ws.base_dir)
        prompts = read_prompts(config.prompts.model_copy(update={"validation_fraction": 0.0}), tokenizer,
                               config.training.seq_len - config.critique.max_new_tokens, config.training.seed, ws.store)
        model = load_base(ws.base_dir, "lora").to(env.device)
        mine = prompts.train[env.rank :: env.world_size]
        pairs, stats = critique_pairs(model, tokenizer, mine, config, env.rank)
        gathered: list[Any] = [(pairs, stats)]
        if env.world_size > 1:
            gathered = [None] * env.world_size
            torch.distributed.all_gather_object(gathered, (pairs, stats))
        if env.is_main:
            every = [pair for rank_pairs, _ in gathered for pair in rank_pairs]
            dropped = {k: sum(s[k] for _, s in gathered) for k in stats}
            if not every:
                if dropped["droppedLong"]:
                    raise SpecError(f"training.seqLen: {dropped['droppedLong']} conversations (prompt, answer, "
                                    f"critique, revision) exceed {config.training.seq_len} tokens; raise it")
                raise RuntimeError(
                    f"critique-revision: every revision equalled its answer or was empty ({dropped}); raise "
                    "critique.temperature or critique.maxNewTokens, or start from a model that follows instructions"
                )
            ws.staging.mkdir(parents=True, exist_ok=True)
            (ws.staging / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in every))
            results = {"method": "critique-revision", "output": "pairs.jsonl", "pairs": len(every),
                       "prompts": len(prompts.train), "principles": len(config.critique.principles),
                       "droppedIdentical": dropped["droppedIdentical"], "droppedLong": dropped["droppedLong"]}
            publish_and_succeed(ws, STAGE, input_receipts(ws, model=ws.base_uri, prompts=config.prompts.uri), results)
            log(f"wrote {len(every)} critique-revision pairs to {ws.out_uri}/pairs.jsonl")
        barrier()
        return 0
    finally:
        shutil.rmtree(ws.cache, ignore_errors=True)
        shutdown()
