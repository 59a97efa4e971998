"""``python -m crucible.trainer pretrain --spec FILE``: next-token pretraining on packed token shards.

parse the spec → build (data, tokenizer, model) → :class:`~crucible.trainer.engine.Engine`
``.fit()`` → export the Hugging Face model → answer ``eval.prompts`` before/after →
``_SUCCESS`` with the data receipt's sha256. A stage whose ``_SUCCESS`` exists returns 0 at once.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from crucible.trainer import storage as st
from crucible.trainer.config.stages import PretrainConfig
from crucible.trainer.data.shards import INDEX_FILE, ShardFormatError, ShardSet
from crucible.trainer.engine import Batch, Engine, TrainContext
from crucible.trainer.faults import SpecError
from crucible.trainer.sampler import BatchIterator, GlobalSampler, PackedSequences

STAGE = "pretrain"


def log(msg: str) -> None:
    print(f"[crucible pretrain] {msg}", file=sys.stderr, flush=True)


class PretrainObjective:
    """Next-token cross-entropy over fixed-length windows of the packed token stream."""

    def __init__(self, train: ShardSet, validation: ShardSet | None) -> None:
        self.train = train
        self.validation = validation

    def train_batches(self, ctx: TrainContext) -> BatchIterator:
        data = PackedSequences(self.train, ctx.seq_len)
        sampler = GlobalSampler(len(data), ctx.micro_batch_size, ctx.env.rank, ctx.env.world_size, ctx.seed)
        return BatchIterator(sampler, data.fetch)

    def eval_batches(self, ctx: TrainContext) -> Iterable[Batch] | None:
        if self.validation is None or self.validation.num_tokens < ctx.seq_len * ctx.env.world_size:
            return None
        data = PackedSequences(self.validation, ctx.seq_len)
        mbs = min(ctx.micro_batch_size, max(len(data) // ctx.env.world_size, 1))
        sampler = GlobalSampler(len(data), mbs, ctx.env.rank, ctx.env.world_size, ctx.seed, shuffle=False)

        def batches() -> Iterator[Batch]:  # the same held-out windows at every evaluation
            while True:
                yield data.fetch(sampler.next_indices())

        return batches()

    def loss(self, model: Any, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        out = model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False)
        return out.loss, {}

    def tokens(self, batch: Batch) -> int:
        return int(batch["input_ids"].numel())


def open_split(data_uri: str, split: str, store: st.Storage, cache: Path, required: bool) -> ShardSet | None:
    split_uri = st.join(data_uri, split)
    if not store.exists(st.join(split_uri, INDEX_FILE)):
        if required:
            raise SpecError(
                f"data.uri {data_uri}: no {split}/{INDEX_FILE}; point data at a DataPipeline output "
                "(its train/ and validation/ token shards)"
            )
        return None
    local = store.node_local_path(split_uri, field="data.uri", log=log)  # once per node, not per rank
    try:
        return ShardSet(local)
    except ShardFormatError as exc:
        raise SpecError(f"data.uri {data_uri}: {exc}") from exc


def find_tokenizer(config: PretrainConfig, data_uri: str, store: st.Storage, cache: Path) -> Path | None:
    if config.tokenizer is not None:
        uri = config.tokenizer.uri
        if not uri:
            raise SpecError("tokenizer.fromRun was not resolved to tokenizer.uri")
        candidates = [st.join(uri, "tokenizer"), uri]
    else:
        candidates = [st.join(data_uri, "tokenizer")]
    for candidate in candidates:
        if store.exists(st.join(candidate, "tokenizer.json")):
            return store.node_local_path(candidate, field="tokenizer", log=log)
    if config.tokenizer is not None:
        raise SpecError(f"tokenizer.uri {config.tokenizer.uri}: no tokenizer.json there or in tokenizer/")
    log(f"warning: {data_uri} has no tokenizer/; the model is exported without tokenizer files")
    return None


def answer_prompts_before_after(config: PretrainConfig, base_model: Any, out_dir: Path, tokenizer_dir: Path | None,
                                before: list[str] | None) -> None:
    """Write the prompts answered by the starting and the trained model side by side."""
    from crucible.trainer import evaluate

    model, tokenizer = evaluate.load_model(out_dir)
    if tokenizer is None:
        log("eval.prompts set but the model has no tokenizer; prompts skipped")
        return
    after = evaluate.answer_prompts(model, tokenizer, config.eval.prompts, config.eval.max_new_tokens,
                                    getattr(tokenizer, "chat_template", None))
    if before is None:
        before = ["" for _ in config.eval.prompts]
    evaluate.write_side_by_side(out_dir, config.eval.prompts, before, after,
                                labels=("before", "after"), title="Prompts before and after pretraining",
                                references=config.eval.references)


def check_memorization(config: PretrainConfig, model_dir: Path, train: ShardSet,
                       validation: ShardSet | None) -> dict[str, Any] | None:
    """``eval.memorization`` on the exported model: verbatim continuations of train vs held-out documents."""
    cfg = config.eval.memorization
    if cfg is None:
        return None
    from crucible.trainer import evaluate
    from crucible.trainer.memorization import memorization_check

    model, _ = evaluate.load_model(model_dir)
    result = memorization_check(model, train, validation, cfg, config.training.seed)
    log(f"memorization: train {result['train']['exactMatchRate']:.1%} vs held-out "
        f"{result['heldOut']['exactMatchRate']:.1%} of {cfg.continuation_tokens}-token continuations verbatim")
    return result


def _report_source_reads(sliced: Any, engine: Engine) -> dict[str, Any]:
    """Bytes of the source's tensors each rank read (its slices), logged and put in the results."""
    from crucible.trainer.distributed import all_gather_object

    per_rank = [int(b) for b in all_gather_object(sliced.bytes_read)]
    total = int(sliced.bytes_total)
    engine.log("model.source: each rank read only its slices: " + ", ".join(
        f"rank {r} {b} bytes ({b / max(total, 1):.1%})" for r, b in enumerate(per_rank)) + f" of {total}")
    return {"sourceBytesRead": per_rank, "sourceBytes": total}


def input_receipts(config: PretrainConfig, store: st.Storage, source_dir: Path | None,
                   tokenizer_dir: Path | None) -> dict[str, Any]:
    """``{uri, sha256, ...}`` of every input the run read (:func:`~crucible.trainer.stage_io.input_receipt`):
    the token shards (by their manifest), the model it continued from, the tokenizer, harness task files."""
    from crucible.trainer import gguf_import
    from crucible.trainer.stage_io import input_receipt

    assert config.data.uri is not None
    inputs: dict[str, Any] = {"data": input_receipt(store, config.data.uri, "spec.data")}
    if config.model.source is not None and config.model.source.uri:
        uri = config.model.source.uri
        gguf = gguf_import.is_gguf(uri)
        # the copy the stage loaded (an S3 source downloaded once), never the bucket again
        inputs["modelSource"] = input_receipt(store, uri, "spec.model.source",
                                              local=source_dir if source_dir is not None and not gguf else None)
        record = gguf_import.source_record(source_dir) if source_dir is not None else None
        if record is not None:
            inputs["modelSourceGguf"] = record
    if tokenizer_dir is not None:
        tok_uri = config.tokenizer.uri if config.tokenizer is not None and config.tokenizer.uri else st.join(
            config.data.uri, "tokenizer")
        if config.tokenizer is not None and store.exists(st.join(tok_uri, "tokenizer", "tokenizer.json")):
            tok_uri = st.join(tok_uri, "tokenizer")
        inputs["tokenizer"] = input_receipt(store, tok_uri, "spec.tokenizer" if config.tokenizer else "spec.data",
                                            local=tokenizer_dir)
    if config.eval.harness_task_dir:
        inputs["evaluation"] = input_receipt(store, config.eval.harness_task_dir, "spec.eval.harnessTaskDir")
    return inputs


def run(config: PretrainConfig) -> int:
    from crucible.trainer.distributed import barrier, init_distributed, shutdown
    from crucible.trainer.model import adopt_source, build_meta_model, load_pretrained, source_meta_model
    from crucible.trainer.output import publish
    from crucible.trainer.stage_io import SUCCESS, finished, write_success

    store = st.Storage.from_config(config.storage)
    out_uri = config.output.uri
    if not out_uri:
        raise SpecError("output.uri is empty: set it (the backends fill it in from the storage root)")
    if config.data.uri is None:
        raise SpecError("data.fromRun was not resolved to data.uri; run through crucible run or the operator")
    if finished(store, out_uri, config):
        log(f"{out_uri}/{SUCCESS} exists: nothing to do")
        return 0
    from crucible.trainer import evaluate

    evaluate.check_harness(config.eval)  # a task that does not exist fails now, not after training
    # collectives time out after the hang watchdog, so a stuck peer is reported as a hang with its step
    env = init_distributed(timeout_s=float(config.failure_policy.hang_timeout_seconds) + 60.0)
    cache = Path(tempfile.mkdtemp(prefix="crucible-pretrain-"))
    try:
        train = open_split(config.data.uri, "train", store, cache, required=True)
        assert train is not None
        validation = open_split(config.data.uri, "validation", store, cache, required=False)
        tokenizer_dir = find_tokenizer(config, config.data.uri, store, cache)
        source_dir: Path | None = None
        sliced: Any = None  # the per-rank safetensors reader of a model.source, when it is one
        if config.model.source is not None:
            if not config.model.source.uri:
                raise SpecError("model.source.fromRun was not resolved to model.source.uri")
            model: Any
            source_uri = config.model.source.uri
            source_dir = store.node_local_path(source_uri, field="model.source.uri", log=log)
            model = None
            if config.model.architecture == "llama" and config.training.strategy != "deepspeed":
                model = source_meta_model(source_dir, source_uri)  # each rank reads only its slices
            if model is not None:
                from crucible.trainer.meta_init import pending_init

                sliced = pending_init(model)
            else:
                model, _ = load_pretrained(str(source_dir), store, label=source_uri)
                model = adopt_source(model, config.model, source_uri)
            if model.config.vocab_size < train.vocab_size:
                raise SpecError(
                    f"model.source {source_uri} has vocabulary {model.config.vocab_size}, "
                    f"the data {train.vocab_size}; tokenize the data with the model's tokenizer"
                )
        else:
            # on meta: the strategy shards it, then each rank fills only its own shards
            model = build_meta_model(config.model, train.vocab_size, config.training.seed, eos_id=train.eos_id)
        before: list[str] | None = None
        if config.eval.prompts and env.is_main and tokenizer_dir is not None and config.model.source is not None:
            tok = evaluate.load_tokenizer(source_dir) if source_dir is not None else None
            if tok is not None:
                # the starting model answers on rank 0 alone (a sliced source is read whole for this)
                base = model if sliced is None or source_dir is None else evaluate.load_model(source_dir)[0]
                # an instruct model is asked the way it was tuned to be asked: through its own chat template
                before = evaluate.answer_prompts(base, tok, config.eval.prompts, config.eval.max_new_tokens,
                                                 getattr(tok, "chat_template", None))
                del base
        engine = Engine(config, model, PretrainObjective(train, validation), str(tokenizer_dir) if tokenizer_dir else None,
                        env, store)
        source_read = _report_source_reads(sliced, engine) if sliced is not None else None
        try:
            # continued training (a revision, or any run from a source) reports the source's held-out
            # perplexity on this data before and after
            before_eval = engine.evaluate() if config.model.source is not None and validation is not None else {}
            result = engine.fit()
            staging = Path(out_uri) if not st.is_s3(out_uri) else cache / "export"
            engine.export(str(staging))
        finally:
            engine.close()
        if env.is_main:
            if config.eval.prompts:
                answer_prompts_before_after(config, model, staging, tokenizer_dir, before)
            memorized = check_memorization(config, staging, train, validation)
            harness = evaluate.harness_results(config.eval, staging)
            publish(staging, out_uri, store)
            results = {**result.results(), **harness, "parameters": engine.total_params, "dataTokens": train.num_tokens}
            if "perplexity" in before_eval:
                results["perplexityBefore"] = before_eval["perplexity"]
            if source_read is not None:
                results.update(source_read)
            if memorized is not None:
                results["memorization"] = memorized
                from crucible.trainer.memorization import enforce

                enforce(memorized)  # after publishing: the model stays, the run is not marked succeeded
            inputs = input_receipts(config, store, source_dir, tokenizer_dir)
            results["dataManifestSha256"] = inputs["data"]["sha256"]  # in status.results: the operator reads no storage
            write_success(store, out_uri, STAGE, inputs, results, config)
            log(f"wrote {out_uri} ({result.steps} steps, final loss {result.final_loss:.4f})")
        barrier()
        engine.close_metrics()
        return 0
    finally:
        import shutil

        shutil.rmtree(cache, ignore_errors=True)
        shutdown()


def main(argv: list[str] | None = None) -> int:
    from crucible.trainer.stage_io import stage_main

    return stage_main(STAGE, PretrainConfig, run, argv)
