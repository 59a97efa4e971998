"""Evaluation shared by every stage: held-out perplexity, prompts answered before/after, harness tasks.

* :func:`load_eval_tokens` turns an evaluation source into one token stream: a DataPipeline
  output (its ``validation/`` split), a split directory of token shards, a ``.jsonl`` file of
  ``{"text"}`` (or ``{prompt, response}``) records, or a plain ``.txt`` file.
* :func:`perplexity` scores any causal LM on that stream in fixed-length, non-overlapping
  windows spread evenly over it (deterministic, so "before" and "after" see the same tokens).
* :func:`answer_prompts` answers a fixed list of prompts greedily; :func:`write_side_by_side`
  writes the answers of two models next to each other as Markdown and JSON, so a reader sees
  exactly what a stage changed.
* :func:`run_harness_tasks` runs lm-evaluation-harness tasks when the user names them; it
  never downloads (``HF_DATASETS_OFFLINE``), so a task whose data is not local fails clearly.

``python -m crucible.trainer.evaluate --model DIR --data URI`` prints the perplexity of a model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crucible.trainer.data.shards import INDEX_FILE, ShardSet
from crucible.trainer.faults import SpecError
from crucible.trainer.storage import Storage, is_s3

EVAL_DIR = "eval"
PROMPTS_JSON = "prompts.json"
PROMPTS_MD = "prompts.md"


class EvalDataError(SpecError):
    """The evaluation source is missing, empty or of an unknown shape."""


@dataclass(frozen=True)
class PerplexityResult:
    loss: float  # mean next-token cross-entropy in nats
    perplexity: float
    tokens: int  # predicted tokens the mean is over
    windows: int

    def to_json(self) -> dict[str, float | int]:
        return asdict(self)


def materialize(uri: str, store: Storage | None = None, workdir: str | os.PathLike[str] | None = None) -> Path:
    """A local path holding ``uri``: the path itself, or an s3:// object or prefix downloaded once."""
    if not is_s3(uri):
        return Path(uri)
    store = store or Storage()
    target = Path(workdir or tempfile.mkdtemp(prefix="crucible-eval-")) / uri.rstrip("/").rsplit("/", 1)[-1]
    if not uri.endswith("/") and Path(uri).suffix:
        store.download_file(uri, target)
        return target
    return store.download_prefix(uri, target)


def _texts_from_jsonl(path: Path) -> list[str]:
    texts: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EvalDataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
            if isinstance(record, dict) and isinstance(record.get("text"), str):
                texts.append(record["text"])
            elif isinstance(record, dict) and isinstance(record.get("prompt"), str) and isinstance(
                record.get("response"), str
            ):
                texts.append(record["prompt"] + record["response"])
            else:
                raise EvalDataError(
                    f"{path}:{lineno}: expected an object with a string 'text' (or 'prompt' and "
                    "'response') field"
                )
    return texts


def load_eval_tokens(uri: str, tokenizer: Any | None = None, store: Storage | None = None) -> np.ndarray:
    """The token stream of an evaluation source (see the module docstring), as int64.

    Token shards need no tokenizer; text sources are tokenized with ``tokenizer`` and an EOS
    token is appended after every document, as the data pipeline does.
    """
    path = materialize(uri, store)
    if path.is_dir():
        for candidate in (path / "validation", path):
            if (candidate / INDEX_FILE).exists():
                shards = ShardSet(candidate)
                if shards.num_tokens == 0:
                    raise EvalDataError(f"{candidate}: the split holds no tokens")
                return shards.read(0, shards.num_tokens)
        raise EvalDataError(
            f"{path}: neither a DataPipeline output (validation/{INDEX_FILE}) nor a split of token "
            f"shards ({INDEX_FILE}); point the evaluation data at one, or at a .jsonl/.txt file"
        )
    if not path.exists():
        raise EvalDataError(f"{uri}: no such file or directory")
    if path.suffix == ".jsonl":
        texts = _texts_from_jsonl(path)
    elif path.suffix in (".txt", ".md", ""):
        texts = [t.strip() for t in path.read_text(encoding="utf-8").split("\n\n") if t.strip()]
    else:
        raise EvalDataError(f"{path}: unknown evaluation file type {path.suffix!r}; use .jsonl or .txt")
    if not texts:
        raise EvalDataError(f"{path}: holds no text")
    if tokenizer is None:
        raise EvalDataError(f"{path}: text needs a tokenizer; the model directory has none")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(int(eos))
    return np.asarray(ids, dtype=np.int64)


def _window_starts(total: int, seq_len: int, max_windows: int) -> list[int]:
    """Starts of up to ``max_windows`` non-overlapping windows of seq_len + 1 tokens, evenly spread."""
    span = seq_len + 1
    available = total // span
    if available == 0:
        raise EvalDataError(
            f"the evaluation data holds {total} tokens, fewer than one window of seqLen + 1 = {span}; "
            "use more evaluation data or a smaller seqLen"
        )
    count = min(available, max_windows)
    slots = np.linspace(0, available - 1, count).round().astype(int)
    return [int(s) * span for s in sorted(set(slots.tolist()))]


def model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    tokens: np.ndarray,
    seq_len: int,
    max_batches: int,
    batch_size: int = 4,
) -> PerplexityResult:
    """Mean next-token loss and perplexity of ``model`` over evenly spread windows of ``tokens``."""
    starts = _window_starts(len(tokens), seq_len, max_batches * batch_size)
    device = model_device(model)
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        for i in range(0, len(starts), batch_size):
            batch = np.stack([tokens[s : s + seq_len + 1] for s in starts[i : i + batch_size]])
            ids = torch.as_tensor(batch, dtype=torch.long, device=device)  # (B, T+1)
            logits = model(input_ids=ids[:, :-1]).logits.float()  # (B, T, V)
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="sum"
            )
            total_nll += float(nll)
            total_tokens += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    loss = total_nll / total_tokens
    return PerplexityResult(loss=loss, perplexity=math.exp(min(loss, 80.0)), tokens=total_tokens, windows=len(starts))


def format_prompt(tokenizer: Any, prompt: str, chat_template: str | None) -> str:
    """The text a model sees for ``prompt``: chat-formatted when a template applies, else as is."""
    if chat_template is None:
        return prompt
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        chat_template=chat_template,
        tokenize=False,
        add_generation_prompt=True,
    )


@torch.no_grad()
def answer_prompts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    chat_template: str | None = None,
) -> list[str]:
    """Greedy answers (deterministic) of ``model`` to each prompt, without the prompt itself.

    All prompts go through one batched ``generate`` (left-padded, with the KV cache): a decode
    step reads every weight once whatever the batch, so five prompts cost about what one does.
    """
    device = model_device(model)
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if not prompts:
        return []
    # a line in the stage's log, so progress displays show what the stage is doing (minutes on CPU)
    print(f"[crucible eval] answering {len(prompts)} prompt{'s' if len(prompts) > 1 else ''} "
          f"(greedy, up to {max_new_tokens} new tokens each)", file=sys.stderr, flush=True)
    encoded = [tokenizer(format_prompt(tokenizer, p, chat_template), add_special_tokens=False)["input_ids"]
               for p in prompts]
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)  # (B, T), left-padded
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention[row, width - len(ids):] = 1
    use_cache = getattr(model.config, "use_cache", None)
    try:
        model.config.use_cache = True  # training configs turn the cache off; generation wants it
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
    finally:
        model.config.use_cache = use_cache
        model.train(was_training)
    return [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9_]+", text.lower())


def answer_overlap(answer: str, reference: str) -> float:
    """ROUGE-L F1 of ``answer`` against ``reference`` over lower-cased word tokens (0..1).

    The longest common subsequence rewards an answer that says what the reference says in the
    same order, whatever else it adds; 1.0 is the reference itself, 0.0 shares no word with it.
    """
    a, r = _words(answer), _words(reference)
    if not a or not r:
        return 0.0
    prev = [0] * (len(r) + 1)
    for wa in a:
        cur = [0] * (len(r) + 1)
        for j, wr in enumerate(r, start=1):
            cur[j] = prev[j - 1] + 1 if wa == wr else max(prev[j], cur[j - 1])
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>") or " "


def write_side_by_side(
    out_dir: str | os.PathLike[str],
    prompts: Sequence[str],
    before: Sequence[str],
    after: Sequence[str],
    labels: tuple[str, str] = ("before", "after"),
    title: str = "Prompts before and after",
    references: Sequence[str] = (),
) -> dict[str, Any]:
    """Write ``<out_dir>/eval/prompts.{json,md}`` with each prompt's two answers side by side.

    With ``references`` (one reference answer per prompt, ``eval.references``) each answer is
    scored by :func:`answer_overlap` and the mean of each side is returned as ``answerOverlap``
    (the stages copy it into their results).
    """
    if not (len(prompts) == len(before) == len(after)):
        raise ValueError(f"{len(prompts)} prompts but {len(before)} and {len(after)} answers")
    if references and len(references) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(references)} references")
    directory = Path(out_dir) / EVAL_DIR
    directory.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = [
        {"prompt": p, labels[0]: b, labels[1]: a, "changed": b != a}
        for p, b, a in zip(prompts, before, after, strict=True)
    ]
    summary: dict[str, Any] = {}
    if references:
        for record, ref in zip(records, references, strict=True):
            record["reference"] = ref
            record["overlap"] = {label: round(answer_overlap(record[label], ref), 4) for label in labels}
        summary = {label: round(sum(r["overlap"][label] for r in records) / len(records), 4) for label in labels}
    payload: dict[str, Any] = {"labels": list(labels), "prompts": records}
    if summary:
        payload["answerOverlap"] = {"metric": "rouge-l-f1", **summary}
    json_path = directory / PROMPTS_JSON
    json_path.write_text(json.dumps(payload, indent=2, ensure_ascii=False))
    lines = [f"# {title}", "", f"| prompt | {labels[0]} | {labels[1]} |", "| --- | --- | --- |"]
    lines += [f"| {_md_cell(r['prompt'])} | {_md_cell(r[labels[0]])} | {_md_cell(r[labels[1]])} |" for r in records]
    if summary:
        lines += ["", "Overlap with the reference answers (ROUGE-L F1): "
                  + ", ".join(f"{label} {value:.3f}" for label, value in summary.items())]
    md_path = directory / PROMPTS_MD
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out: dict[str, Any] = {"json": str(json_path), "markdown": str(md_path)}
    if summary:
        out["answerOverlap"] = payload["answerOverlap"]
    return out


_TASK_MANAGERS: dict[str | None, Any] = {}


def _harness_manager(tasks: Sequence[str], task_dir: str | None) -> Any:
    try:
        from lm_eval.tasks import TaskManager  # type: ignore[import-not-found]
    except ImportError as exc:
        raise SpecError(
            "eval.harnessTasks needs lm-evaluation-harness, which this image lacks: pip install "
            "'crucible[eval]' (lm-eval), and make the task data available locally"
        ) from exc
    if task_dir is not None and not Path(task_dir).is_dir():
        raise SpecError(f"eval.harnessTaskDir: {task_dir} is not a folder")
    if task_dir not in _TASK_MANAGERS:  # indexing every task YAML takes seconds: once per process
        _TASK_MANAGERS[task_dir] = TaskManager(include_path=task_dir) if task_dir else TaskManager()
    manager = _TASK_MANAGERS[task_dir]
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise SpecError(
            f"eval.harnessTasks: {unknown} are not lm-evaluation-harness tasks"
            + (f" nor defined in {task_dir}" if task_dir else "; define your own in eval.harnessTaskDir")
        )
    return manager


def check_harness(prompts: Any) -> None:
    """Before a stage starts: the harness is installed and every named task exists (``eval.*``)."""
    if prompts.harness_tasks:
        _harness_manager(prompts.harness_tasks, prompts.harness_task_dir)


def harness_results(prompts: Any, model_dir: str | os.PathLike[str], peft_base: str | None = None,
                    lineage: Sequence[str] = (), store: Any = None) -> dict[str, Any]:
    """``{"harness": {...}}`` for a stage's results when ``eval.harnessTasks`` names tasks, else {}.

    With ``lineage`` (the stage's data and base-model URIs) it also records, per task, whether the
    training data behind them was decontaminated against the task (``harnessDecontamination``).
    """
    if not prompts.harness_tasks:
        return {}
    out: dict[str, Any] = {"harness": run_harness_tasks(model_dir, prompts.harness_tasks, prompts.harness_limit,
                                                         prompts.harness_task_dir, peft_base=peft_base)}
    if lineage:
        from crucible.trainer.data.decontaminate import harness_decontamination
        from crucible.trainer.storage import Storage

        out["harnessDecontamination"] = harness_decontamination(prompts.harness_tasks, lineage, store or Storage())
    return out


def run_harness_tasks(
    model_dir: str | os.PathLike[str],
    tasks: Sequence[str],
    limit: int | None = None,
    task_dir: str | None = None,
    batch_size: int = 4,
    peft_base: str | None = None,
) -> dict[str, dict[str, float]]:
    """lm-evaluation-harness results of a saved model on ``tasks``, with downloads forbidden.

    Returns ``{task: {metric: value}}`` (the harness's ``acc,none`` keys become ``acc``).
    ``task_dir`` is a folder of extra task YAML files (the harness's include_path), e.g. a task
    over a local jsonl. Raises SpecError naming ``eval.harnessTasks`` when the harness is not
    installed or a task or its data is not available locally.
    """
    manager = _harness_manager(tasks, task_dir)
    import lm_eval  # type: ignore[import-not-found]

    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    # An adapter-only output: the harness loads the base and applies the adapter (peft=).
    model_args = f"pretrained={peft_base},peft={model_dir}" if peft_base else f"pretrained={model_dir}"
    try:
        out = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"{model_args},dtype=float32",
            tasks=list(tasks),
            task_manager=manager,
            limit=limit,
            batch_size=batch_size,
            device="cuda" if torch.cuda.is_available() else "cpu",
        )
    except (ConnectionError, FileNotFoundError, OSError, ValueError) as exc:
        raise SpecError(
            f"eval.harnessTasks {list(tasks)}: the harness could not load a task's data ({exc}); the data "
            "must be local (Hugging Face datasets cache or a task in eval.harnessTaskDir), nothing is downloaded"
        ) from exc
    results = (out or {}).get("results", {})
    return {
        task: {
            key.split(",")[0]: float(value)
            for key, value in metrics.items()
            if isinstance(value, int | float) and not isinstance(value, bool) and key != "sample_len"
        }
        for task, metrics in results.items()
    }


def load_tokenizer(model_dir: str | os.PathLike[str]) -> Any:
    """The tokenizer of a Hugging Face model directory (None when it has none)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError):
        return None


def load_model(model_dir: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """A Hugging Face causal LM and its tokenizer (None when the directory has none)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m crucible.trainer.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="Hugging Face model directory")
    parser.add_argument("--data", required=True, help="evaluation data: DataPipeline output, shards, .jsonl or .txt")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--max-batches", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    model, tokenizer = load_model(args.model)
    try:
        tokens = load_eval_tokens(args.data, tokenizer)
    except EvalDataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = perplexity(model, tokens, args.seq_len, args.max_batches)
    print(json.dumps(result.to_json()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
