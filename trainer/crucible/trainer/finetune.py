"""``python -m crucible.trainer finetune --spec FILE``: supervised fine-tuning (FinetuneRun).

parse → check the method can run here (QLoRA: CUDA + bitsandbytes) → base model + tokenizer →
instruction data (:mod:`crucible.trainer.sft_data`: chat template, prompt tokens masked, packing)
→ held-out loss and prompt answers of the base → :class:`~crucible.trainer.engine.Engine` with
:class:`SftObjective` (checkpoints, exact resume, loss spikes, metrics come from the engine) →
export merged model or adapter (:mod:`crucible.trainer.lora`) → held-out loss and answers after
→ ``_SUCCESS``. Methods: ``full`` (every weight), ``lora``, ``qlora`` (adapters over a 4-bit base).

What it shares with the other post-training stages lives in :mod:`crucible.trainer.posttrain`.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterable
from typing import Any

import torch

from crucible.trainer.config.stages import FinetuneConfig
from crucible.trainer.engine import Batch, Engine, TrainContext
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
from crucible.trainer.sampler import BatchIterator, GlobalSampler
from crucible.trainer.sft_data import IGNORE_INDEX, SftBatches, SftData, build_sft_data, save_seen
from crucible.trainer.stage_io import input_receipt

STAGE = "finetune"


# -- the objective ---------------------------------------------------------------------------


class SftObjective:
    """Next-token loss on assistant tokens only (labels are -100 elsewhere)."""

    def __init__(self, data: SftData) -> None:
        self.data = data

    def train_batches(self, ctx: TrainContext) -> BatchIterator:
        train = self.data.train
        sampler = GlobalSampler(train.num_items, ctx.micro_batch_size, ctx.env.rank, ctx.env.world_size, ctx.seed)
        return BatchIterator(sampler, train.fetch)

    def eval_batches(self, ctx: TrainContext) -> Iterable[Batch] | None:
        val = self.data.validation
        return None if val is None else fixed_eval_batches(val.num_items, val.fetch, ctx)

    def loss(self, model: Any, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        return sft_loss(model, batch), {}

    def tokens(self, batch: Batch) -> int:
        # Tokens processed (not padding), so tokens/s and MFU mean what they mean for pretraining;
        # the exact learned-token-weighted held-out loss is evalLossBefore/After.
        return int(batch["token_count"].sum())


def sft_loss(model: Any, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy over the learned tokens of a (packed or padded) micro-batch."""
    # No attention_mask for packed rows: transformers then builds the per-example causal mask
    # from the position_ids resets; use_cache=False or that detection is skipped.
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        labels=batch["labels"],
        use_cache=False,
    )
    return out.loss


@torch.no_grad()
def held_out_loss(model: Any, batches: SftBatches | None, micro_batch_size: int) -> float | None:
    """Token-weighted SFT loss over every held-out row (all ranks compute the same, no collective)."""
    if batches is None:
        return None
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, batches.num_items, micro_batch_size):
            batch = batches.fetch(list(range(start, min(start + micro_batch_size, batches.num_items))))
            batch = {k: v.to(device) for k, v in batch.items()}
            n = int((batch["labels"] != IGNORE_INDEX).sum())
            total += float(sft_loss(model, batch)) * n
            count += n
    finally:
        model.train(was_training)
    return total / count if count else None


# -- the stage -------------------------------------------------------------------------------


def build_model(config: FinetuneConfig, ws: Workspace) -> Any:
    from crucible.trainer import lora as lora_mod

    base = lora_mod.load_base(ws.base_dir, config.method)
    check_seq_len(base, config.training.seq_len)
    if config.method == "full":
        return base
    return lora_mod.wrap(base, config.lora, seed=config.training.seed)


def run(config: FinetuneConfig) -> int:
    from crucible.trainer import evaluate, lora
    from crucible.trainer.distributed import barrier, init_distributed, shutdown

    lora.check_method(config.method)
    evaluate.check_harness(config.eval)
    ws = open_workspace(config, STAGE)
    if ws is None:
        return 0
    env = init_distributed(timeout_s=float(config.failure_policy.hang_timeout_seconds))
    try:
        tokenizer = load_tokenizer(ws.base_dir)
        data = build_sft_data(
            config.dataset, tokenizer, config.training.seq_len, config.packing, config.training.seed,
            config.chat_template, ws.store,
        )
        log(f"data: {data.stats.to_json()}")
        model = build_model(config, ws)
        trainable, total = lora.trainable_parameters(model)
        log(f"method {config.method}: {trainable:,} of {total:,} parameters train")
        mbs = config.training.micro_batch_size
        loss_before = held_out_loss(model, data.validation, mbs)
        before: list[str] = []
        if config.eval.prompts and env.is_main:
            before = evaluate.answer_prompts(model, tokenizer, config.eval.prompts, config.eval.max_new_tokens,
                                             data.template)
        tokenizer.chat_template = data.template  # inference formats prompts exactly as training did
        engine = Engine(config, model, SftObjective(data), tokenizer, env, ws.store)
        try:
            result = engine.fit()
            loss_after = held_out_loss(engine.strategy.model, data.validation, mbs)
            written = export_trained(engine, ws, config.lora if config.method != "full" else None,
                                     config.merge_adapter, tokenizer)
        finally:
            engine.close()
        if env.is_main:
            assert written is not None
            if config.eval.prompts:
                tuned = load_exported_lm(ws.staging, written, ws.base_dir)
                write_prompts(config, ws.staging, tokenizer, before, tuned,
                              data.template, "fine-tuning")
            peft_base = str(ws.base_dir) if written == "adapter" else None
            results = {
                **result.results(),
                **evaluate.harness_results(config.eval, ws.staging, peft_base,
                                           lineage=[ws.base_uri, config.dataset.uri or ""], store=ws.store),
                "method": config.method,
                "output": written,
                "trainableParameters": trainable,
                "parameters": total,
                **({"evalLossBefore": loss_before, "evalLossAfter": loss_after} if loss_before is not None else {}),
                **{f"data{k[0].upper()}{k[1:]}": v for k, v in data.stats.to_json().items()},
            }
            save_seen(data, ws.staging)  # the records a later revision (spec.revisions) does not train on again
            inputs = input_receipts(ws, model=ws.base_uri, dataset=config.dataset.uri)
            if config.dataset.earlier_revisions:  # their seen.npy decided what this run left out
                inputs["earlierRevisions"] = [
                    input_receipt(ws.store, uri, f"spec.dataset.earlierRevisions[{i}]")
                    for i, uri in enumerate(config.dataset.earlier_revisions)]
            # in status.results, for status.revisions: the operator reads no storage
            results.update({"modelURI": ws.base_uri, "datasetSha256": inputs["dataset"]["sha256"]})
            publish_and_succeed(ws, STAGE, inputs, results)
            log(f"wrote {written} to {ws.out_uri} ({result.steps} steps, held-out loss {loss_before} -> {loss_after})")
        barrier()
        engine.close_metrics()
        return 0
    finally:
        shutil.rmtree(ws.cache, ignore_errors=True)
        shutdown()


def main(argv: list[str] | None = None) -> int:
    from crucible.trainer.stage_io import stage_main

    return stage_main(STAGE, FinetuneConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
