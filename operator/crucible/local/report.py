"""The report of an embedded pipeline: ``report.md`` and a self-contained ``report.html``.

It reads only what the runs left in the work directory — no stage-specific hooks:

* the data funnel from each DataPipeline's ``output/manifest.json`` (documents in, dropped
  per step and reason, out) and its ``_SUCCESS`` results;
* loss curves from each training run's ``checkpoints/metrics.jsonl`` (matplotlib, Agg);
* held-out perplexity after each stage, measured here with the same evaluation code the
  stages use (``crucible.trainer.evaluate``) on the DataPipeline's validation split, for the
  untrained model (rebuilt from the PretrainRun's spec and seed), then every model the
  pipeline produced; the QuantizeJob's own before/after numbers are shown beside them;
* the evaluation prompts answered before training and after every stage, side by side
  (``output/eval/prompts.json`` of each stage);
* preference accuracy and the quantization's size and perplexity change, from the ``_SUCCESS``
  results that the runner copied into each run's status.

Missing pieces (a stage that failed, torch not installed) leave a note in their section
instead of failing the report.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crucible.core.status import parse_time
from crucible.local.metrics import read_jsonl, read_success
from crucible.local.summary import duration, human_bytes, key_results
from crucible.local.workdir import SPEC_FILE, RunState, WorkDir

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
LOSS_PNG = "report-loss.png"
FUNNEL_PNG = "report-funnel.png"
FORMAT_PREFIX = "In short"
"""The quickstart's instruction data answers in this format; the report counts answers that follow it."""
TRAINING_KINDS = ("PretrainRun", "FinetuneRun", "PreferenceRun")
EVAL_BATCHES = 4
"""Held-out perplexity: 4 batches of 4 windows of 256 tokens per model, the same windows for every model."""
UNTRAINED_ANSWER_TOKENS = 16
"""Random weights answer gibberish; a few tokens show it."""
MODEL_KINDS = ("PretrainRun", "FinetuneRun", "PreferenceRun", "QuantizeJob")


@dataclass
class Section:
    title: str
    markdown: list[str] = field(default_factory=list)
    images: list[tuple[str, bytes]] = field(default_factory=list)  # (file name, png)


@dataclass
class Check:
    what: str
    ok: bool | None  # None: could not be measured
    detail: str


@dataclass
class Report:
    title: str
    sections: list[Section] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)


# --------------------------------------------------------------------------- helpers
def _output_dir(state: RunState) -> Path | None:
    return Path(state.status.output_uri) if state.status.output_uri else None


def _spec(workdir: WorkDir, state: RunState) -> dict[str, Any]:
    try:
        return json.loads((workdir.run_dir(state.namespace, state.kind, state.name) / SPEC_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:,.{digits}f}" if abs(value) < 1e6 else f"{value:,.0f}"
    return str(value)


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


def _md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return lines


def _flatten_counts(node: Any, prefix: str = "") -> list[tuple[str, int]]:
    """(dotted reason, count) of every integer leaf of a nested drop-count mapping."""
    out: list[tuple[str, int]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            out += _flatten_counts(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(node, int) and not isinstance(node, bool):
        out.append((prefix, node))
    return out


# ------------------------------------------------------------------------- sections
def overview_section(workdir: WorkDir, states: list[RunState]) -> Section:
    sec = Section("Runs")
    rows = []
    starts, ends = [], []
    for s in states:
        st = s.status
        start, end = parse_time(st.start_time), parse_time(st.completion_time)
        if start:
            starts.append(start)
        if end:
            ends.append(end)
        took = duration(end - start) if start and end else "-"
        good = f"{st.goodput:.0%}" if st.goodput is not None else ""
        rows.append([f"{s.kind}/{s.name}", st.phase, took, st.restarts, good,
                     key_results(st.results, 3, kind=s.kind) or (st.message or "")])
    sec.markdown += _md_table(["run", "phase", "time", "restarts", "goodput", "results"], rows)
    if starts and ends:
        sec.markdown += ["", f"Wall time from the first start to the last finish: {duration(max(ends) - min(starts))}."]
    return sec


def funnel_section(workdir: WorkDir, states: list[RunState]) -> Section:
    sec = Section("Data pipeline: what each step removed")
    for s in (s for s in states if s.kind == "DataPipeline"):
        out = _output_dir(s)
        manifest: dict[str, Any] = {}
        if out is not None:
            try:
                manifest = json.loads((out / "manifest.json").read_text())
            except (OSError, ValueError):
                manifest = {}
        results = s.status.results or ((read_success(out) or {}).get("results", {}) if out else {})
        if not manifest and not results:
            sec.markdown += [f"*{s.name}: no manifest yet ({s.status.phase}).*"]
            continue
        docs_in = manifest.get("documentsIn", results.get("documentsIn"))
        docs_out = manifest.get("documentsOut", results.get("documentsOut"))
        sec.markdown += [f"**{s.name}**: {_fmt(docs_in)} raw documents in, {_fmt(docs_out)} kept.", ""]
        funnel = manifest.get("funnel")
        steps: list[tuple[str, int, dict[str, int]]] = []
        if isinstance(funnel, list) and funnel:
            rows = []
            for f in funnel:
                dropped = {k: v for k, v in (f.get("dropped") or {}).items() if isinstance(v, int) and v}
                changes = {k: v for k, v in (f.get("changes") or {}).items() if isinstance(v, int) and v}
                label = str(f.get("step"))
                if steps and f.get("documentsIn") is not None and f.get("documentsIn") != steps[-1][1]:
                    label += " (train split)"
                steps.append((label, int(f.get("documentsOut") or 0), dropped))
                rows.append([f.get("step"), _fmt(f.get("documentsIn")), _fmt(f.get("documentsOut")),
                             ", ".join(f"{k} {v}" for k, v in sorted(dropped.items(), key=lambda kv: -kv[1])) or "-",
                             ", ".join(f"{k} {v}" for k, v in changes.items()) or ""])
            sec.markdown += _md_table(["step", "in", "out", "dropped (reason: documents)", "changed"], rows)
        else:
            counts = [(r, n) for r, n in _flatten_counts(manifest.get("dropped", results.get("dropped", {}))) if n]
            sec.markdown += _md_table(["step / reason", "documents dropped"], [[r, n] for r, n in counts])
        tokens = manifest.get("tokens") or {k: v for k, v in results.items() if k.startswith("tokens")}
        if isinstance(tokens, dict) and tokens:
            sec.markdown += ["", "Tokens: " + ", ".join(f"{k} {v:,}" for k, v in tokens.items() if isinstance(v, int))]
        pii = manifest.get("pii")
        if isinstance(pii, dict) and any(isinstance(v, int) and v for v in pii.values()):
            sec.markdown += ["", "PII redacted in kept documents (replaced by typed placeholders): "
                             + ", ".join(f"{k} {v}" for k, v in pii.items() if isinstance(v, int) and v)]
        tok = manifest.get("tokenizer")
        if isinstance(tok, dict) and tok.get("vocabSize"):
            sec.markdown += ["", f"Tokenizer: {tok.get('origin', '')} byte-level BPE, {tok['vocabSize']:,} tokens."]
        if docs_in and steps:
            png = _funnel_png(s.name, int(docs_in), steps)
            if png:
                sec.images.append((FUNNEL_PNG if not sec.images else f"report-funnel-{s.name}.png", png))
    if not sec.markdown:
        sec.markdown.append("*No DataPipeline in this pipeline.*")
    return sec


def _funnel_png(name: str, docs_in: int, steps: list[tuple[str, int, dict[str, int]]]) -> bytes | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    labels, remaining = ["raw"], [docs_in]
    for step, docs_out, _ in steps:
        if step == "read" and docs_out == docs_in:
            continue
        labels.append(f"after {step}")
        remaining.append(docs_out)
    fig, ax = plt.subplots(figsize=(7, 0.38 * len(labels) + 1.2), dpi=110)
    ax.barh(range(len(labels)), remaining, color="#4c78a8")
    for i, value in enumerate(remaining):
        ax.text(value, i, f" {value}", va="center", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("documents")
    ax.set_title(f"{name}: documents remaining after each step", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def loss_section(workdir: WorkDir, states: list[RunState]) -> Section:
    sec = Section("Training loss")
    curves: list[tuple[str, list[tuple[int, float]], list[tuple[int, float]]]] = []
    for s in (s for s in states if s.kind in TRAINING_KINDS):
        records = read_jsonl(workdir.run_dir(s.namespace, s.kind, s.name) / "checkpoints" / "metrics.jsonl")
        train: dict[int, float] = {}
        evals: dict[int, float] = {}
        spikes = 0
        for r in records:
            if r.get("event") == "eval" and isinstance(r.get("step"), int):
                loss = r.get("loss", r.get("evalLoss"))
                if isinstance(loss, int | float):
                    evals[r["step"]] = float(loss)
            elif r.get("event") == "loss_spike":
                spikes += 1
            elif "event" not in r and isinstance(r.get("step"), int) and isinstance(r.get("loss"), int | float):
                train[r["step"]] = float(r["loss"])  # a resumed run rewrites steps: keep the last
        if train:
            curves.append((f"{s.kind} {s.name}", sorted(train.items()), sorted(evals.items())))
            first, last = curves[-1][1][0], curves[-1][1][-1]
            line = f"- **{s.kind} {s.name}**: loss {first[1]:.3f} at step {first[0]} → {last[1]:.3f} at step {last[0]}"
            if evals:
                line += f"; held-out loss {sorted(evals.items())[-1][1]:.3f}"
            if spikes:
                line += f"; {spikes} loss spike(s)"
            if s.status.restarts:
                line += f"; {s.status.restarts} restart(s), resumed from checkpoints"
            sec.markdown.append(line)
    if not curves:
        sec.markdown.append("*No training metrics yet.*")
        return sec
    png = _loss_png(curves)
    if png:
        sec.images.append((LOSS_PNG, png))
    return sec


def _loss_png(curves: list[tuple[str, list[tuple[int, float]], list[tuple[int, float]]]]) -> bytes | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.2), dpi=110, squeeze=False)
    for ax, (label, train, evals) in zip(axes[0], curves, strict=True):
        ax.plot([s for s, _ in train], [v for _, v in train], label="train", color="#4c78a8", linewidth=1.2)
        if evals:
            ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", label="held-out", color="#f58518", markersize=4)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _eval_tokens_uri(states: list[RunState]) -> str | None:
    for s in states:
        if s.kind == "DataPipeline" and s.status.phase == "Succeeded" and s.status.output_uri:
            return s.status.output_uri
    return None


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null: torch and torchao print optional-kernel and deprecation
    notices straight to stderr while they import and load models; the report has nothing to say
    about them (failures still surface as exceptions)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)


def _quiet_imports() -> None:
    """Keep library chatter (progress bars, optional-kernel warnings) out of the terminal summary."""
    import logging

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("torchao", "torch", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with quiet_stderr():
        from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _untrained_model(workdir: WorkDir, states: list[RunState]) -> tuple[Any, Any] | None:
    """The PretrainRun's model at step 0 (same shape and seed), with its tokenizer, or None."""
    pre = next((s for s in states if s.kind == "PretrainRun" and s.status.phase == "Succeeded"), None)
    if pre is None:
        return None
    spec = _spec(workdir, pre)
    out = _output_dir(pre)
    if not spec or out is None:
        return None
    from crucible.trainer import evaluate
    from crucible.trainer.config.stages import PretrainConfig, parse_stage_spec
    from crucible.trainer.model import build_model

    config = parse_stage_spec("pretrain", spec)
    assert isinstance(config, PretrainConfig)
    if config.model.source is not None:
        return evaluate.load_model(config.model.source.uri or "")
    trained, tokenizer = evaluate.load_model(out)
    eos = getattr(trained.config, "eos_token_id", None)
    model = build_model(config.model, int(trained.config.vocab_size), config.training.seed, eos_id=eos)
    return model, tokenizer


def perplexity_section(workdir: WorkDir, states: list[RunState], report: Report) -> tuple[Section, dict[str, float]]:
    sec = Section("Held-out perplexity after each stage")
    measured: dict[str, float] = {}
    uri = _eval_tokens_uri(states)
    if uri is None:
        sec.markdown.append("*No DataPipeline output to evaluate on.*")
        return sec, measured
    try:
        _quiet_imports()
        import torch

        from crucible.trainer import evaluate
    except ImportError as exc:
        sec.markdown.append(f"*Not measured: {exc}.*")
        return sec, measured
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 1))  # small models; robust on a busy machine
    seq_len, batches = 256, EVAL_BATCHES
    try:
        tokens = evaluate.load_eval_tokens(uri)
    except Exception as exc:
        sec.markdown.append(f"*Not measured: {exc}.*")
        return sec, measured
    seq_len = min(seq_len, max(8, len(tokens) // 4 - 1))
    rows: list[list[Any]] = []
    with torch.no_grad():
        untrained = _untrained_model(workdir, states)
        if untrained is not None:
            result = evaluate.perplexity(untrained[0], tokens, seq_len, batches)
            measured["untrained"] = result.perplexity
            rows.append(["before training (step 0)", _fmt(result.perplexity, 2), _fmt(result.loss), ""])
        for s in states:
            if s.kind not in TRAINING_KINDS or s.status.phase != "Succeeded" or _output_dir(s) is None:
                continue
            model, _ = evaluate.load_model(_output_dir(s))  # type: ignore[arg-type]
            result = evaluate.perplexity(model, tokens, seq_len, batches)
            measured[s.name] = result.perplexity
            rows.append([f"after {s.kind} {s.name}", _fmt(result.perplexity, 2), _fmt(result.loss), ""])
        for s in states:
            if s.kind == "QuantizeJob" and s.status.phase == "Succeeded":
                r = s.status.results
                after = r.get("perplexityAfter")
                if isinstance(after, int | float):
                    rows.append([f"after {s.kind} {s.name}", _fmt(float(after), 2), "",
                                 f"measured by the job on its own windows (before: {_fmt(r.get('perplexityBefore'), 2)})"])
    sec.markdown.append(f"Measured on the validation split of the DataPipeline ({len(tokens):,} tokens; "
                        f"{batches * 4} windows of {seq_len} tokens, the same windows for every model).")
    sec.markdown.append("")
    sec.markdown += _md_table(["model", "perplexity", "loss (nats/token)", "note"], rows)
    pre = next((s for s in states if s.kind == "PretrainRun" and s.name in measured), None)
    if "untrained" in measured and pre is not None:
        before, after = measured["untrained"], measured[pre.name]
        report.checks.append(Check("Domain perplexity falls after pretraining", after < before,
                                   f"{before:,.1f} → {after:,.2f}"))
    return sec, measured


def answers_section(workdir: WorkDir, states: list[RunState], report: Report) -> Section:
    sec = Section("The same questions before training and after each stage")
    columns: list[tuple[str, dict[str, str]]] = []
    prompts: list[str] = []
    first = True
    for s in states:
        if s.kind not in MODEL_KINDS or _output_dir(s) is None:
            continue
        try:
            data = json.loads((_output_dir(s) / "eval" / "prompts.json").read_text())  # type: ignore[operator]
        except (OSError, ValueError):
            continue
        labels = data.get("labels") or ["before", "after"]
        records = data.get("prompts") or []
        if first:
            before = {r["prompt"]: r.get(labels[0], "") for r in records}
            if not any(before.values()):
                before = _untrained_answers(workdir, states, [r["prompt"] for r in records]) or before
            columns.append(("before training", before))
            first = False
        columns.append((f"after {s.kind.removesuffix('Run').removesuffix('Job').lower()} ({s.name})",
                        {r["prompt"]: r.get(labels[-1], "") for r in records}))
        for r in records:
            if r["prompt"] not in prompts:
                prompts.append(r["prompt"])
    if not columns:
        sec.markdown.append("*No stage has answered the evaluation prompts yet (spec.eval.prompts).*")
        return sec
    for prompt in prompts:
        sec.markdown.append(f"**{prompt}**")
        sec.markdown.append("")
        sec.markdown += _md_table(["model", "answer"], [[label, answers.get(prompt, "").strip() or "*(empty answer)*"]
                                                        for label, answers in columns])
        sec.markdown.append("")
    for label, answers in columns:
        if "finetune" in label:
            following = sum(1 for a in answers.values() if a.strip().startswith(FORMAT_PREFIX))
            report.checks.append(Check("Answers after SFT follow the instruction format",
                                       following >= max(1, (len(answers) + 1) // 2),
                                       f"{following}/{len(answers)} answers start with “{FORMAT_PREFIX}”"))
    return sec


def _untrained_answers(workdir: WorkDir, states: list[RunState], prompts: list[str]) -> dict[str, str] | None:
    try:
        import torch

        from crucible.trainer import evaluate

        model = _untrained_model(workdir, states)
        if model is None or model[1] is None:
            return None
        with torch.no_grad():
            answers = evaluate.answer_prompts(model[0], model[1], prompts, UNTRAINED_ANSWER_TOKENS)
        return dict(zip(prompts, answers, strict=True))
    except Exception:
        return None


def preference_section(states: list[RunState], report: Report) -> Section:
    sec = Section("Preference tuning")
    for s in (s for s in states if s.kind == "PreferenceRun"):
        r = s.status.results
        shown = {k: v for k, v in r.items()
                 if isinstance(v, int | float) and not isinstance(v, bool)
                 and any(w in k.lower() for w in ("accuracy", "margin", "reward", "heldoutloss"))}
        if not shown:
            sec.markdown.append(f"*{s.name}: no preference metrics recorded ({s.status.phase}).*")
            continue
        sec.markdown.append(f"**{s.name}** ({r.get('method', 'dpo')}, beta {r.get('beta', '-')}), on held-out pairs:")
        sec.markdown.append("")
        sec.markdown += _md_table(["metric", "value"], [[k, _fmt(float(v), 3)] for k, v in sorted(shown.items())])
        acc = r.get("preferenceAccuracy")
        if isinstance(acc, int | float):
            report.checks.append(Check("DPO preference accuracy on held-out pairs is above 0.5", acc > 0.5,
                                       f"{acc:.2f}"))
    if not sec.markdown:
        sec.markdown.append("*No PreferenceRun in this pipeline.*")
    return sec


def quantize_section(states: list[RunState], report: Report) -> Section:
    sec = Section("Quantization")
    rows = []
    for s in (s for s in states if s.kind == "QuantizeJob"):
        r = s.status.results
        sb, sa = r.get("sizeBytesBefore"), r.get("sizeBytesAfter")
        pb, pa = r.get("perplexityBefore"), r.get("perplexityAfter")
        if not all(isinstance(v, int | float) for v in (sb, sa, pb, pa)):
            sec.markdown.append(f"*{s.name}: no measurements ({s.status.phase}: {s.status.message or ''}).*")
            continue
        sb, sa, pb, pa = float(sb), float(sa), float(pb), float(pa)  # type: ignore[arg-type]
        increase = (pa - pb) / pb if pb else float("nan")
        threshold = r.get("maxPerplexityIncrease")
        rows.append([s.name, r.get("method", ""), human_bytes(sb), human_bytes(sa), f"{sa / sb:.2f}×",
                     _fmt(pb, 3), _fmt(pa, 3), f"{increase * 100:+.2f} %"])
        if isinstance(threshold, int | float):
            report.checks.append(Check(f"{str(r.get('method', 'quantized')).upper()} stays within its perplexity threshold",
                                       increase <= threshold, f"{increase * 100:+.2f} % (limit {threshold * 100:.0f} %)"))
        else:
            report.checks.append(Check("Quantized model stays within its perplexity threshold", True,
                                       f"{increase * 100:+.2f} % (the job enforces spec.maxPerplexityIncrease)"))
    if rows:
        sec.markdown += _md_table(["job", "method", "size before", "size after", "ratio", "perplexity before",
                                   "perplexity after", "change"], rows)
    elif not sec.markdown:
        sec.markdown.append("*No QuantizeJob in this pipeline.*")
    return sec


# ---------------------------------------------------------------------------- render
def build_report(workdir: WorkDir) -> Report:
    states = workdir.all_states()
    report = Report(title=f"Crucible pipeline report — {workdir.root.name}")
    report.sections.append(overview_section(workdir, states))
    report.sections.append(funnel_section(workdir, states))
    report.sections.append(loss_section(workdir, states))
    with quiet_stderr():
        ppl, _ = perplexity_section(workdir, states, report)
        report.sections.append(ppl)
        report.sections.append(answers_section(workdir, states, report))
    report.sections.append(preference_section(states, report))
    report.sections.append(quantize_section(states, report))
    return report


def _checks_md(report: Report) -> list[str]:
    if not report.checks:
        return []
    mark = {True: "✅", False: "❌", None: "–"}
    return ["## What changed", ""] + [f"- {mark[c.ok]} {c.what}: {c.detail}" for c in report.checks] + [""]


def render_markdown(report: Report, generated: str) -> str:
    lines = [f"# {report.title}", "", f"Generated {generated}.", ""]
    lines += _checks_md(report)
    for sec in report.sections:
        lines += [f"## {sec.title}", "", *sec.markdown, ""]
        lines += [f"![{sec.title}]({name})" for name, _ in sec.images]
        if sec.images:
            lines.append("")
    return "\n".join(lines)


def render_html(report: Report, generated: str) -> str:
    """One self-contained page: the Markdown rendered by a tiny converter, images inlined as base64."""
    body: list[str] = [f"<h1>{html.escape(report.title)}</h1>", f"<p class=meta>Generated {html.escape(generated)}.</p>"]
    if report.checks:
        body.append("<h2>What changed</h2><ul class=checks>")
        for c in report.checks:
            cls = {True: "ok", False: "bad", None: "na"}[c.ok]
            sign = {True: "✔", False: "✘", None: "–"}[c.ok]
            body.append(f"<li class={cls}><b>{sign}</b> {html.escape(c.what)}: {html.escape(c.detail)}</li>")
        body.append("</ul>")
    for sec in report.sections:
        body.append(f"<h2>{html.escape(sec.title)}</h2>")
        body.append(_markdown_to_html(sec.markdown))
        for name, png in sec.images:
            data = base64.b64encode(png).decode()
            body.append(f'<img alt="{html.escape(name)}" src="data:image/png;base64,{data}">')
    style = (
        "body{font:15px/1.5 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.3em .6em;"
        "vertical-align:top;text-align:left}th{background:#f3f3f3}img{max-width:100%;margin:.5em 0}"
        "code{background:#f3f3f3;padding:0 .2em}.meta{color:#777}.checks{list-style:none;padding:0}"
        ".ok b{color:#1a7f37}.bad b{color:#cf222e}"
    )
    return (f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(report.title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def _inline(text: str) -> str:
    out = html.escape(text)
    parts = out.split("**")
    out = "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))
    parts = out.split("*")
    if len(parts) % 2 == 1:
        out = "".join(f"<i>{p}</i>" if i % 2 else p for i, p in enumerate(parts))
    return out


def _markdown_to_html(lines: list[str]) -> str:
    """The subset of Markdown the sections use: paragraphs, bullet lists, pipe tables."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("| "):
            rows = []
            while i < len(lines) and lines[i].startswith("| "):
                rows.append(lines[i])
                i += 1
            cells = [[c.strip().replace("\\|", "|") for c in _split_row(r)] for r in rows]
            head, body = cells[0], cells[2:]
            out.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in body]
            out.append("</table>")
            continue
        if line.startswith("- "):
            out.append("<ul>")
            while i < len(lines) and lines[i].startswith("- "):
                out.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            out.append("</ul>")
            continue
        if line.strip():
            out.append(f"<p>{_inline(line)}</p>")
        i += 1
    return "\n".join(out)


def _split_row(row: str) -> list[str]:
    cells, current, escaped = [], "", False
    for ch in row.strip()[1:-1]:
        if ch == "|" and not escaped:
            cells.append(current)
            current = ""
        else:
            current += ch
        escaped = ch == "\\"
    cells.append(current)
    return cells


def write_report(root: Path | str) -> dict[str, str]:
    """Write report.md (+ its PNGs) and a self-contained report.html into the work directory."""
    workdir = WorkDir(root)
    report = build_report(workdir)
    generated = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    for sec in report.sections:
        for name, png in sec.images:
            (workdir.root / name).write_bytes(png)
    md = workdir.root / REPORT_MD
    md.write_text(render_markdown(report, generated), encoding="utf-8")
    page = workdir.root / REPORT_HTML
    page.write_text(render_html(report, generated), encoding="utf-8")
    return {"markdown": str(md), "html": str(page), "checks": json.dumps([c.__dict__ for c in report.checks])}


def print_checks(root: Path | str) -> None:
    """Print the report's checks (used at the end of `crucible run`)."""
    md = (WorkDir(root).root / REPORT_MD)
    if md.exists():
        for line in md.read_text(encoding="utf-8").splitlines():
            if line.startswith("- ✅") or line.startswith("- ❌"):
                print(line[2:])
