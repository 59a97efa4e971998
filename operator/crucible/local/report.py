"""The report of an embedded pipeline: ``report.md`` and a self-contained ``report.html``.

    write_report(workdir) -> {"markdown", "html", "checks"}
    build_report(workdir) -> Report        # sections + checks, no rendering

What goes in, all read from what the runs left in the work directory:

* generic sections: the runs (phase, time, goodput, each kind's declared results), the loss
  curves of every kind that keeps checkpoints (``metrics.jsonl``), held-out perplexity after
  each stage and the evaluation prompts answered before training and after every stage;
* each kind's own section, named by its ``Kind.report_section`` (``module:function``, called
  with the run states, returning a :class:`Section` or a mapping ``{"title", "markdown",
  "table": {"header", "rows"}}``) — the data funnel, preference metrics, quantization here;
* the "What changed" checks the pipeline itself declares: ``report-checks.toml`` in the folder
  of its YAML files (see :func:`load_checks`). No check is built in: a user's pipeline gets
  only the checks it asks for.

The perplexities and the untrained model's answers are measured by a trainer subprocess
(``python -m crucible.trainer.report_eval``) with the stages' own evaluation code: the control
plane never imports torch. The pages come from Jinja2 templates (``templates/``); the HTML
renders each section's Markdown with markdown-it-py. Missing pieces (a stage that failed, no
torch) leave a note in their section instead of failing the report.
"""

from __future__ import annotations

import base64
import importlib
import io
import json
import math
import os
import subprocess
import sys
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import SandboxedEnvironment
from markdown_it import MarkdownIt

from crucible.api.registry import kind_of, kinds, model_kinds, training_kinds
from crucible.core.status import parse_time
from crucible.local.metrics import read_jsonl, read_success
from crucible.local.summary import duration, human_bytes, key_results
from crucible.local.workdir import PIPELINE_FILE, SPEC_FILE, RunState, WorkDir

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
LOSS_PNG = "report-loss.png"
FUNNEL_PNG = "report-funnel.png"
CHECKS_FILE = "report-checks.toml"
"""The pipeline's own checks, next to its YAML files."""
EVAL_BATCHES = 4
"""Held-out perplexity: 4 batches of 4 windows of 256 tokens per model, the same windows for every model."""
EVAL_SEQ_LEN = 256
UNTRAINED_ANSWER_TOKENS = 16
"""Random weights answer gibberish; a few tokens show it."""
MEASURE_TIMEOUT_SECONDS = 900
TEMPLATES = Path(__file__).with_name("templates")


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
    problems: list[str] = field(default_factory=list)
    """What was wrong with the pipeline's check declarations (printed; the report is still written)."""


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


def funnel_section(states: list[RunState]) -> Section:
    sec = Section("Data pipeline: what each step removed")
    for s in states:  # the runs of this section's kind
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
        sec.markdown.append("*No data pipeline in this pipeline.*")
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
    for s in (s for s in states if s.kind in training_kinds()):
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


RL_METHODS = ("grpo", "rloo", "ppo")
REWARD_PNG = "report-reward.png"


def preference_section(states: list[RunState]) -> Section:
    sec = Section("Preference tuning")
    curves: list[tuple[str, list[tuple[int, float]]]] = []
    for s in states:  # the runs of this section's kind
        r = s.status.results
        method = str(r.get("method", "dpo"))
        if method in RL_METHODS:
            curve = _reward_curve(s)
            if curve:
                curves.append((f"{s.name} ({method.upper()})", curve))
            sec.markdown += _rl_lines(s)
            continue
        if method == "critique-revision":
            if isinstance(r.get("pairs"), int):
                sec.markdown.append(f"**{s.name}** (critique-revision): {r['pairs']} pairs (chosen = the model's "
                                    f"revision, rejected = its first answer) from {r.get('prompts')} prompts and "
                                    f"{r.get('principles')} principles, in `pairs.jsonl`.")
                sec.markdown.append("")
            continue
        shown = {k: v for k, v in r.items()
                 if isinstance(v, int | float) and not isinstance(v, bool)
                 and any(w in k.lower() for w in ("accuracy", "margin", "reward", "heldoutloss"))}
        if not shown:
            sec.markdown.append(f"*{s.name}: no preference metrics recorded ({s.status.phase}).*")
            continue
        sec.markdown.append(f"**{s.name}** ({method}, beta {r.get('beta', '-')}), on held-out pairs:")
        sec.markdown.append("")
        sec.markdown += _md_table(["metric", "value"], [[k, _fmt(float(v), 3)] for k, v in sorted(shown.items())])
        sec.markdown.append("")
    if not sec.markdown:
        sec.markdown.append("*No preference tuning in this pipeline.*")
    png = _reward_png(curves)
    if png:
        sec.images.append((REWARD_PNG, png))
    return sec


def _reward_curve(state: RunState) -> list[tuple[int, float]]:
    """Mean reward of each step's samples, from the run's metrics.jsonl (beside its output folder)."""
    output = _output_dir(state)
    if output is None:
        return []
    reward = {int(r["step"]): float(r["rewardMean"]) for r in read_jsonl(output.parent / "checkpoints" / "metrics.jsonl")
              if "event" not in r and isinstance(r.get("step"), int) and isinstance(r.get("rewardMean"), int | float)}
    return sorted(reward.items())


def _rl_lines(state: RunState) -> list[str]:
    """An online-RL run: held-out reward before/after, win rate, and a few held-out answers before/after."""
    r = state.status.results
    before, after, win = r.get("rewardBefore"), r.get("rewardAfter"), r.get("winRate")
    if not all(isinstance(v, int | float) for v in (before, after, win)):
        return [f"*{state.name}: no held-out reward recorded ({state.status.phase}).*", ""]
    method = str(r.get("method")).upper()
    lines = [f"**{state.name}** ({method} against its reward, {r.get('groupSize')} samples per prompt, KL weight "
             f"{r.get('klCoef')}), on {r.get('heldOutPrompts')} held-out prompts:", ""]
    lines += _md_table(["metric", "value"], [
        ["reward before", _fmt(before, 3)], ["reward after", _fmt(after, 3)],
        [f"win rate after vs before (under the {r.get('winRateUnder', 'reward')})", _fmt(win, 3)],
    ])
    output = _output_dir(state)
    try:
        rows = json.loads((output / "eval" / "rl.json").read_text())[:5] if output else []
    except (OSError, ValueError):
        rows = []
    if rows:
        lines += ["", f"Held-out prompts, a sample before and after {method}:", ""]
        lines += _md_table(["prompt", "before", "after"],
                           [[row["prompt"].strip(), row["before"].strip() or "*(empty)*",
                             row["after"].strip() or "*(empty)*"] for row in rows])
    return [*lines, ""]


def _reward_png(curves: list[tuple[str, list[tuple[int, float]]]]) -> bytes | None:
    if not curves:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(5.0, 3.2), dpi=110)
    for label, points in curves:
        ax.plot([p for p, _ in points], [v for _, v in points], label=label, linewidth=1.2)
    ax.set_title("reward during RL", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward of the samples")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def quantize_section(states: list[RunState]) -> Section:
    sec = Section("Quantization")
    rows = []
    for s in states:  # the runs of this section's kind
        r = s.status.results
        sb, sa = r.get("sizeBytesBefore"), r.get("sizeBytesAfter")
        pb, pa = r.get("perplexityBefore"), r.get("perplexityAfter")
        if not all(isinstance(v, int | float) for v in (sb, sa, pb, pa)):
            sec.markdown.append(f"*{s.name}: no measurements ({s.status.phase}: {s.status.message or ''}).*")
            continue
        sb, sa, pb, pa = float(sb), float(sa), float(pb), float(pa)  # type: ignore[arg-type]
        increase = (pa - pb) / pb if pb else float("nan")
        rows.append([s.name, r.get("method", ""), human_bytes(sb), human_bytes(sa), f"{sa / sb:.2f}×",
                     _fmt(pb, 3), _fmt(pa, 3), f"{increase * 100:+.2f} %"])
    if rows:
        sec.markdown += _md_table(["job", "method", "size before", "size after", "ratio", "perplexity before",
                                   "perplexity after", "change"], rows)
    elif not sec.markdown:
        sec.markdown.append("*Nothing quantized in this pipeline.*")
    return sec



# ------------------------------------------------------------------------ measurements
@dataclass
class Measurements:
    perplexity: dict[str, float] = field(default_factory=dict)
    """label ("untrained" or a run name) -> held-out perplexity."""
    rows: list[list[Any]] = field(default_factory=list)
    untrained_answers: dict[str, str] = field(default_factory=dict)
    note: str = ""


def _eval_tokens_uri(states: list[RunState]) -> str | None:
    for s in states:
        if s.kind == _data_kind() and s.status.phase == "Succeeded" and s.status.output_uri:
            return s.status.output_uri
    return None


def _data_kind() -> str:
    """The kind whose output holds token shards (the one with a ``tokenizer.source`` base model)."""
    return next((k.name for k in kinds() if k.base_model_field == "tokenizer.source"), "")


def _pretrain_kind() -> str:
    return next((k.name for k in kinds() if k.base_model_field == "model.source"), "")


def _prompts(states: list[RunState]) -> list[str]:
    out: list[str] = []
    for s in states:
        data = _prompts_json(s)
        for r in data.get("prompts") or []:
            if r.get("prompt") not in out:
                out.append(r["prompt"])
    return out


def _prompts_json(state: RunState) -> dict[str, Any]:
    out = _output_dir(state)
    if out is None or state.kind not in model_kinds():
        return {}
    try:
        data = json.loads((out / "eval" / "prompts.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def measure_threads(workdir: WorkDir, states: list[RunState]) -> int:
    """CPU threads for the report's measurements: what the pipeline's own runs were given.

    The largest ``OMP_NUM_THREADS`` among the measured runs' ``resources.env`` (the models the
    report evaluates ran with it), else 1 (small models; robust on a busy machine). An
    ``OMP_NUM_THREADS`` in the environment of ``crucible run`` wins over both.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return max(1, _int(os.environ["OMP_NUM_THREADS"], 1))
    asked = [_int(((_spec(workdir, s).get("resources") or {}).get("env") or {}).get("OMP_NUM_THREADS"), 0)
             for s in states if s.kind in training_kinds()]
    return max([1, *asked])


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def measure(workdir: WorkDir, states: list[RunState]) -> Measurements:
    """Perplexity of every trained model and the untrained one's answers, from a trainer subprocess."""
    m = Measurements()
    uri = _eval_tokens_uri(states)
    if uri is None:
        m.note = f"No {_data_kind()} output to evaluate on."
        return m
    pre = next((s for s in states if s.kind == _pretrain_kind() and s.status.phase == "Succeeded"), None)
    models = [{"label": s.name, "uri": s.status.output_uri} for s in states
              if s.kind in training_kinds() and s.status.phase == "Succeeded" and s.status.output_uri]
    spec = workdir.run_dir(pre.namespace, pre.kind, pre.name) / SPEC_FILE if pre is not None else None
    request = {
        "tokens": uri, "seqLen": EVAL_SEQ_LEN, "batches": EVAL_BATCHES, "models": models,
        "untrained": {"spec": str(spec), "output": pre.status.output_uri} if pre and spec and spec.exists() else None,
        "prompts": _prompts(states), "answerTokens": UNTRAINED_ANSWER_TOKENS,
    }
    try:
        proc = subprocess.run([sys.executable, "-m", "crucible.trainer.report_eval"], input=json.dumps(request),
                              capture_output=True, text=True, timeout=MEASURE_TIMEOUT_SECONDS, check=False,
                              env={**os.environ, "OMP_NUM_THREADS": str(measure_threads(workdir, states))})
        answer = json.loads(proc.stdout or "{}")
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        m.note = f"Not measured: {exc}."
        return m
    if answer.get("error") or not answer:
        m.note = f"Not measured: {answer.get('error') or proc.stderr.strip()[-300:]}."
        return m
    for row in answer.get("perplexity") or []:
        m.perplexity[row["label"]] = float(row["perplexity"])
        label = "before training (step 0)" if row["label"] == "untrained" else \
            f"after {next((s.kind for s in states if s.name == row['label']), '')} {row['label']}"
        m.rows.append([label, _fmt(float(row["perplexity"]), 2), _fmt(float(row["loss"])), ""])
    m.untrained_answers = dict(answer.get("untrainedAnswers") or {})
    m.note = (f"Measured on the validation split of the {_data_kind()} ({answer.get('tokens', 0):,} tokens; "
              f"{int(answer.get('batches', EVAL_BATCHES)) * 4} windows of {answer.get('seqLen')} tokens, "
              "the same windows for every model).")
    return m


def perplexity_section(m: Measurements) -> Section:
    sec = Section("Held-out perplexity after each stage")
    sec.markdown.append(f"*{m.note}*" if not m.rows else m.note)
    if m.rows:
        sec.markdown.append("")
        sec.markdown += _md_table(["model", "perplexity", "loss (nats/token)", "note"], m.rows)
    return sec


def stage_answers(states: list[RunState], m: Measurements) -> list[tuple[str, str, dict[str, str]]]:
    """(column label, run name or "untrained", prompt -> answer): before training, then after each stage."""
    columns: list[tuple[str, str, dict[str, str]]] = []
    for s in states:
        data = _prompts_json(s)
        if not data:
            continue
        labels = data.get("labels") or ["before", "after"]
        records = data.get("prompts") or []
        if not columns:
            before = {r["prompt"]: r.get(labels[0], "") for r in records}
            if not any(before.values()):
                before = {p: m.untrained_answers.get(p, "") for p in before} if m.untrained_answers else before
            columns.append(("before training", "untrained", before))
        label = s.kind.removesuffix("Run").removesuffix("Job").lower()
        columns.append((f"after {label} ({s.name})", s.name, {r["prompt"]: r.get(labels[-1], "") for r in records}))
    return columns


def stage_overlaps(states: list[RunState]) -> dict[str, dict[str, float]]:
    """``eval.references`` scores (ROUGE-L F1) per column key ("untrained" or a run name): prompt -> score."""
    out: dict[str, dict[str, float]] = {}
    for s in states:
        data = _prompts_json(s)
        labels = data.get("labels") or ["before", "after"]
        records = [r for r in data.get("prompts") or [] if isinstance(r.get("overlap"), dict)]
        if not records:
            continue
        if "untrained" not in out:
            out["untrained"] = {r["prompt"]: float(r["overlap"].get(labels[0], 0.0)) for r in records}
        out[s.name] = {r["prompt"]: float(r["overlap"].get(labels[-1], 0.0)) for r in records}
    return out


def _mean(values: Mapping[str, float]) -> float:
    return sum(values.values()) / len(values) if values else 0.0


def answers_section(columns: list[tuple[str, str, dict[str, str]]],
                    overlaps: Mapping[str, Mapping[str, float]] | None = None) -> Section:
    sec = Section("The same questions before training and after each stage")
    if not columns:
        sec.markdown.append("*No stage has answered the evaluation prompts yet (spec.eval.prompts).*")
        return sec
    overlaps = overlaps or {}
    if overlaps:
        sec.markdown += ["How close the answers are to the reference answers (`eval.references`; ROUGE-L F1 over "
                         "words, 1.0 = the reference itself), mean over the questions:", ""]
        sec.markdown += _md_table(["model", "overlap with the references"],
                                  [[label, f"{_mean(overlaps[key]):.3f}"] for label, key, _ in columns if key in overlaps])
        sec.markdown.append("")
    prompts: list[str] = []
    for _, _, answers in columns:
        prompts += [p for p in answers if p not in prompts]
    for prompt in prompts:
        sec.markdown += [f"**{prompt}**", ""]
        if overlaps:
            sec.markdown += _md_table(
                ["model", "answer", "overlap"],
                [[label, answers.get(prompt, "").strip() or "*(empty answer)*",
                  f"{overlaps[key][prompt]:.2f}" if prompt in overlaps.get(key, {}) else ""]
                 for label, key, answers in columns])
        else:
            sec.markdown += _md_table(["model", "answer"], [[label, answers.get(prompt, "").strip() or "*(empty answer)*"]
                                                            for label, _, answers in columns])
        sec.markdown.append("")
    return sec


# ------------------------------------------------------------------------------ checks
@dataclass(frozen=True)
class CheckSpec:
    name: str
    expect: str
    detail: str = ""
    source: str = ""


def pipeline_folders(workdir: WorkDir) -> list[Path]:
    """The folders of the YAML files the last ``crucible run`` loaded."""
    try:
        sources = json.loads((workdir.root / PIPELINE_FILE).read_text()).get("sources") or []
    except (OSError, ValueError):
        return []
    return list(dict.fromkeys(Path(src).parent for src in sources))


def load_checks(folders: list[Path]) -> tuple[list[CheckSpec], list[str]]:
    """The checks a pipeline declares in ``report-checks.toml`` beside its YAML files.

    Each ``[[check]]`` has a ``name``, an ``expect`` (a Jinja expression that must be true) and
    an optional ``detail`` (a Jinja template shown beside it). They see ``runs`` (name ->
    ``{"kind", "phase", "results"}``), ``perplexity`` (``"untrained"`` or a run name -> held-out
    perplexity) and ``answers`` (``"untrained"`` or a run name -> its answers); the filter
    ``count_starting(prefix)`` counts answers that start with a prefix. A check whose values
    are missing (the stage did not run) is left out. Returns (checks, problems).
    """
    specs: list[CheckSpec] = []
    problems: list[str] = []
    for folder in folders:
        path = folder / CHECKS_FILE
        if not path.is_file():
            continue
        try:
            doc = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            problems.append(f"{path}: {exc}; fix the TOML")
            continue
        for i, raw in enumerate(doc.get("check") or []):
            if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not isinstance(raw.get("expect"), str):
                problems.append(f"{path}: check[{i}]: needs a string name and a string expect")
                continue
            specs.append(CheckSpec(raw["name"], raw["expect"], str(raw.get("detail", "")), str(path)))
    return specs, problems


def _count_starting(answers: Any, prefix: str) -> int:
    return sum(1 for a in (answers or []) if str(a).strip().startswith(prefix))


def _check_env() -> SandboxedEnvironment:
    env = SandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False)
    env.filters["count_starting"] = _count_starting
    return env


def evaluate_checks(specs: list[CheckSpec], context: Mapping[str, Any]) -> tuple[list[Check], list[str]]:
    env = _check_env()
    checks: list[Check] = []
    problems: list[str] = []
    for spec in specs:
        try:
            ok = bool(env.compile_expression(spec.expect, undefined_to_none=False)(**context))
            detail = env.from_string(spec.detail).render(**context) if spec.detail else ""
        except jinja2.UndefinedError:
            continue  # what it looks at was not produced by this pipeline run
        except (jinja2.TemplateError, TypeError, ValueError, ZeroDivisionError) as exc:
            problems.append(f"{spec.source}: check {spec.name!r}: {type(exc).__name__}: {exc}")
            continue
        checks.append(Check(spec.name, ok, detail))
    return checks, problems


def check_context(states: list[RunState], m: Measurements,
                  columns: list[tuple[str, str, dict[str, str]]]) -> dict[str, Any]:
    return {
        "runs": {s.name: {"kind": s.kind, "phase": s.status.phase, "results": dict(s.status.results)} for s in states},
        "perplexity": dict(m.perplexity),
        "answers": {key: list(answers.values()) for _, key, answers in columns},
        "overlap": {key: _mean(scores) for key, scores in stage_overlaps(states).items()},
    }


# ---------------------------------------------------------------------------- assemble
def kind_sections(states: list[RunState]) -> list[tuple[str, Section]]:
    """(kind, its own section) of each kind present (``Kind.report_section``), in registry order."""
    out: list[tuple[str, Section]] = []
    present = {s.kind for s in states}
    for k in kinds():
        if k.name not in present or not k.report_section:
            continue
        module, _, function = k.report_section.partition(":")
        try:
            built = getattr(importlib.import_module(module), function)([s for s in states if s.kind == k.name])
        except Exception as exc:  # one kind's broken section must not lose the report
            out.append((k.name, Section(k.name, [f"*Section not built: {type(exc).__name__}: {exc}.*"])))
            continue
        out.append((k.name, built if isinstance(built, Section) else _section_from_mapping(built)))
    return out


def _section_from_mapping(data: Mapping[str, Any]) -> Section:
    sec = Section(str(data.get("title", "")))
    if data.get("markdown"):
        sec.markdown += str(data["markdown"]).splitlines()
    table = data.get("table")
    if isinstance(table, Mapping):
        sec.markdown += _md_table(list(table.get("header") or []), [list(r) for r in table.get("rows") or []])
    return sec


def build_report(workdir: WorkDir, *, measurements: Measurements | None = None) -> Report:
    states = workdir.all_states()
    report = Report(title=f"Crucible pipeline report — {workdir.root.name}")
    m = measurements if measurements is not None else measure(workdir, states)
    columns = stage_answers(states, m)
    report.sections.append(overview_section(workdir, states))
    own = kind_sections(states)
    # sections of kinds that make inputs (data) come before training; those of model kinds after
    report.sections += [sec for kind, sec in own if not kind_of(kind).produces_model]
    report.sections.append(loss_section(workdir, states))
    report.sections.append(perplexity_section(m))
    report.sections.append(answers_section(columns, stage_overlaps(states)))
    report.sections += [sec for kind, sec in own if kind_of(kind).produces_model]
    specs, problems = load_checks(pipeline_folders(workdir))
    report.checks, more = evaluate_checks(specs, check_context(states, m, columns))
    report.problems = problems + more
    return report


# ------------------------------------------------------------------------------ render
def _templates() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=jinja2.select_autoescape(["html", "html.j2"]),
                              trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)


_MD = MarkdownIt("commonmark", {"html": False}).enable("table")


def markdown_to_html(lines: list[str]) -> str:
    """A section's Markdown as HTML (markdown-it-py, CommonMark + tables; raw HTML is escaped)."""
    return _MD.render("\n".join(lines))


def render_markdown(report: Report, generated: str) -> str:
    return _templates().get_template("report.md.j2").render(report=report, generated=generated)


def render_html(report: Report, generated: str) -> str:
    """One self-contained page: Markdown rendered by markdown-it-py, images inlined as base64."""
    sections = [{"title": sec.title, "body": markdown_to_html(sec.markdown),
                 "images": [(name, base64.b64encode(png).decode()) for name, png in sec.images]}
                for sec in report.sections]
    return _templates().get_template("report.html.j2").render(report=report, sections=sections, generated=generated)


def write_report(root: Path | str, *, measurements: Measurements | None = None) -> dict[str, str]:
    """Write report.md (+ its PNGs) and a self-contained report.html into the work directory."""
    workdir = WorkDir(root)
    report = build_report(workdir, measurements=measurements)
    generated = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    for sec in report.sections:
        for name, png in sec.images:
            (workdir.root / name).write_bytes(png)
    md = workdir.root / REPORT_MD
    md.write_text(render_markdown(report, generated), encoding="utf-8")
    page = workdir.root / REPORT_HTML
    page.write_text(render_html(report, generated), encoding="utf-8")
    for problem in report.problems:
        print(f"report: {problem}", file=sys.stderr)
    return {"markdown": str(md), "html": str(page), "checks": json.dumps([c.__dict__ for c in report.checks])}


def print_checks(root: Path | str) -> None:
    """Print the report's checks (used at the end of `crucible run`)."""
    md = (WorkDir(root).root / REPORT_MD)
    if md.exists():
        for line in md.read_text(encoding="utf-8").splitlines():
            if line.startswith("- ✅") or line.startswith("- ❌"):
                print(line[2:])
