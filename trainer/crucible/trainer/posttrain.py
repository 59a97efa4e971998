"""What the post-training stages (finetune, preference, quantize) share.

The workspace (output, base model fetched to a local folder, a cache), the tokenizer and
sequence-length checks, held-out batches that are the same at every evaluation, exporting the
trained weights (merged model or adapter), the before/after prompt answers, and publishing the
output with its ``_SUCCESS`` receipt through :mod:`crucible.trainer.stage_io`.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crucible.trainer import storage as st
from crucible.trainer.config.stages import LoraConfig
from crucible.trainer.stage_io import SUCCESS, SpecError, finished, input_receipt, require_uri, write_success

if TYPE_CHECKING:
    from crucible.trainer.engine import Batch, Engine, TrainContext

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def log(msg: str) -> None:
    print(f"[crucible post-train] {msg}", file=sys.stderr, flush=True)


# -- where the stage reads and writes ----------------------------------------------------------


@dataclass
class Workspace:
    store: st.Storage
    cache: Path
    out_uri: str
    base_dir: Path
    base_uri: str
    config: Any = None
    """The stage's parsed spec: its hash goes into ``_SUCCESS``."""

    @property
    def staging(self) -> Path:
        return Path(self.out_uri) if not st.is_s3(self.out_uri) else self.cache / "export"


def open_workspace(config: Any, stage: str) -> Workspace | None:
    """Resolve output and base model; None when ``_SUCCESS`` already exists."""
    store = st.Storage.from_config(config.storage)
    out_uri = require_uri(config.output.uri, "spec.output.uri", "where the model goes")
    base_uri = require_uri(config.model.uri, "spec.model.uri", "the base model (fromRun is resolved to it)")
    if finished(store, out_uri, config):
        log(f"{out_uri}/{SUCCESS} exists: nothing to do")
        return None
    cache = Path(tempfile.mkdtemp(prefix=f"crucible-{stage}-"))
    base_dir = local_model(store, base_uri, "spec.model.uri", cache)
    return Workspace(store, cache, out_uri, base_dir, base_uri, config)


def local_model(store: st.Storage, uri: str, field: str, cache: Path) -> Path:
    """A local Hugging Face model directory for ``uri`` (downloaded from S3 when needed)."""
    try:
        path = store.local_path(uri, cache / "model", field=field)
    except st.StorageNotFound as exc:
        raise SpecError(f"{field}: {exc}; point it at a Hugging Face model directory") from exc
    if not (path / "config.json").exists():
        raise SpecError(
            f"{field}: {uri} holds no config.json; it must be a Hugging Face model directory "
            "(a PretrainRun/FinetuneRun output or save_pretrained folder)"
        )
    return path


@contextmanager
def staged_output(store: st.Storage, output_uri: str) -> Iterator[Path]:
    """A local folder to write the output into; uploaded to ``output_uri`` on exit.

    A local output is written in place. Nothing is uploaded when the body raises. ``_SUCCESS``
    is not part of it: write it with :func:`~crucible.trainer.stage_io.write_success` after.
    """
    if not st.is_s3(output_uri):
        path = Path(output_uri)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    staging = Path(tempfile.mkdtemp(prefix="crucible-out-"))
    try:
        yield staging
        store.upload_dir(staging, output_uri)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def model_size_bytes(directory: str | Path) -> int:
    """Bytes of a model's weight files (safetensors/bin) at its top level: not tokenizer and config,
    and not a training run's checkpoints/ folder that may sit inside its output."""
    return sum(p.stat().st_size for p in Path(directory).iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


INPUT_FIELDS = {"model": "spec.model", "reference": "spec.reference", "dataset": "spec.dataset",
                "prompts": "spec.prompts", "rewardModel": "spec.reward.model", "evaluation": "spec.eval.harnessTaskDir"}
"""The spec field each named input of a post-training stage comes from (named in its receipt)."""


def input_receipts(ws: Workspace, **uris: str | None) -> dict[str, Any]:
    """``{name: {"uri", "sha256", ...}}`` of each input that is set, by content, for the ``_SUCCESS`` lineage.

    The base model is hashed from the copy the stage loaded (an S3 model is not read twice). The
    harness task folder the stage evaluated with (``spec.eval.harnessTaskDir``) is one too.
    """
    out: dict[str, Any] = {}
    harness = getattr(getattr(ws.config, "eval", None), "harness_task_dir", None)
    if harness:
        uris = {**uris, "evaluation": harness}
    for name, uri in uris.items():
        if uri:
            from crucible.trainer.gguf_import import is_gguf

            local = ws.base_dir if uri == ws.base_uri and not is_gguf(uri) else None
            out[name] = input_receipt(ws.store, uri, INPUT_FIELDS.get(name, f"spec.{name}"), local=local)
    return out


def publish_and_succeed(ws: Workspace, stage: str, inputs: dict[str, Any], results: dict[str, Any]) -> None:
    """Copy the staged output to ``out_uri``, then write ``_SUCCESS`` (last)."""
    from crucible.trainer.output import publish

    publish(ws.staging, ws.out_uri, ws.store)
    write_success(ws.store, ws.out_uri, stage, inputs, results, ws.config)


# -- model, tokenizer, data --------------------------------------------------------------------


def load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise SpecError(
            f"spec.model.uri: {model_dir} has no usable tokenizer ({exc}); fine-tuning needs the tokenizer "
            "files beside the model"
        ) from exc


def check_seq_len(model: Any, seq_len: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise SpecError(f"training.seqLen ({seq_len}) exceeds the model's maxPositionEmbeddings ({limit}); lower it")


def fixed_eval_batches(items: int, fetch: Callable[[list[int]], Batch], ctx: TrainContext) -> Iterable[Batch] | None:
    """The same held-out micro-batches at every evaluation, the same count on every rank."""
    from crucible.trainer.sampler import GlobalSampler

    mbs = min(ctx.micro_batch_size, items // ctx.env.world_size)
    if mbs < 1:
        log(f"held-out split has {items} items, fewer than {ctx.env.world_size} ranks: no held-out evaluation")
        return None
    sampler = GlobalSampler(items, mbs, ctx.env.rank, ctx.env.world_size, ctx.seed, shuffle=False)

    def batches() -> Iterator[Batch]:
        while True:
            yield fetch(sampler.next_indices())

    return batches()


# -- after training ----------------------------------------------------------------------------


def export_trained(
    engine: Engine,
    ws: Workspace,
    lora: LoraConfig | None,
    merge: bool,
    tokenizer: Any,
    model_class: Any = None,
    task_type: str = "CAUSAL_LM",
    config_overrides: dict[str, Any] | None = None,
) -> str | None:
    """Gather the trained weights (collective) and write them on rank 0; what was written."""
    from crucible.trainer import lora as lora_mod

    state = engine.strategy.export_state()
    if not engine.env.is_main:
        return None
    assert state is not None
    return lora_mod.export(
        state, ws.staging, ws.base_dir, ws.base_uri, lora, merge, tokenizer,
        model_class=model_class, task_type=task_type, config_overrides=config_overrides,
    )


def load_exported_lm(out_dir: Path, written: str, base_dir: Path) -> Any:
    """The exported causal LM for after-training prompts (the local base + the adapter when only the
    adapter was written: its recorded base may be an s3:// URI)."""
    import torch
    from transformers import AutoModelForCausalLM

    if written != "adapter":
        return AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32)
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(out_dir))


def write_prompts(config: Any, out_dir: Path, tokenizer: Any, before: list[str], after_model: Any,
                  template: str | None, stage_title: str) -> None:
    from crucible.trainer import evaluate

    after = evaluate.answer_prompts(after_model, tokenizer, config.eval.prompts, config.eval.max_new_tokens, template)
    evaluate.write_side_by_side(out_dir, config.eval.prompts, before, after, ("base", "tuned"),
                                title=f"Prompts before and after {stage_title}", references=config.eval.references)
