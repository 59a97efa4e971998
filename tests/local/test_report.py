"""The report from what runs leave behind: funnel, curves, answers, checks, self-contained HTML."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crucible.api.common import RunStatus
from crucible.local.report import (
    Measurements,
    build_report,
    load_checks,
    markdown_to_html,
    render_html,
    render_markdown,
    write_report,
)
from crucible.local.workdir import RunState, WorkDir

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "quickstart"
MEASURED = Measurements(perplexity={"untrained": 900.0, "stdlib-lm": 40.0},
                        rows=[["before training (step 0)", "900.00", "6.8", ""]], note="measured")


def add_run(workdir: WorkDir, kind: str, name: str, results: dict | None = None, phase: str = "Succeeded") -> Path:
    out = workdir.run_dir("default", kind, name) / "output"
    out.mkdir(parents=True)
    status = RunStatus(phase=phase, output_uri=str(out), results=results or {},
                       start_time="2026-01-01T00:00:00Z", completion_time="2026-01-01T00:01:30Z")
    workdir.save_state(RunState(kind, name, "default", status=status))
    (out / "_SUCCESS").write_text(json.dumps({"stage": kind, "results": results or {}}))
    return out


def prompts(out: Path, before: list[str], after: list[str], labels=("base", "tuned")) -> None:
    (out / "eval").mkdir()
    records = [{"prompt": f"q{i}", labels[0]: b, labels[1]: a} for i, (b, a) in enumerate(zip(before, after, strict=True))]
    (out / "eval" / "prompts.json").write_text(json.dumps({"labels": list(labels), "prompts": records}))


def metrics(workdir: WorkDir, kind: str, name: str, losses: list[float]) -> None:
    path = workdir.run_dir("default", kind, name) / "checkpoints" / "metrics.jsonl"
    path.parent.mkdir(parents=True)
    lines = [json.dumps({"step": i + 1, "loss": v}) for i, v in enumerate(losses)]
    lines.append(json.dumps({"event": "eval", "step": len(losses), "loss": losses[-1] + 0.5}))
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def workdir(tmp_path: Path) -> WorkDir:
    wd = WorkDir(tmp_path)
    data = add_run(wd, "DataPipeline", "corpus", {"documentsIn": 10, "documentsOut": 6})
    (data / "manifest.json").write_text(json.dumps({
        "documentsIn": 10, "documentsOut": 6, "tokens": {"train": 900, "validation": 100},
        "funnel": [{"step": "read", "documentsIn": 10, "documentsOut": 10, "dropped": {}},
                   {"step": "language", "documentsIn": 10, "documentsOut": 8, "dropped": {"language_de": 2}},
                   {"step": "dedup", "documentsIn": 8, "documentsOut": 6, "dropped": {"exact_duplicate": 2}}],
        "pii": {"email": 3},
    }))
    pre = add_run(wd, "PretrainRun", "stdlib-lm", {"finalLoss": 4.0, "perplexity": 200.0})
    prompts(pre, ["", ""], ["gibberish", "more"], labels=("before", "after"))
    metrics(wd, "PretrainRun", "stdlib-lm", [8.0, 6.0, 4.0])
    sft = add_run(wd, "FinetuneRun", "stdlib-sft", {"finalLoss": 2.0})
    prompts(sft, ["x", "y"], ["In short, a: b.", "In short, c: d."])
    metrics(wd, "FinetuneRun", "stdlib-sft", [5.0, 3.0])
    add_run(wd, "PreferenceRun", "stdlib-dpo", {"preferenceAccuracy": 0.75, "rewardMargin": 1.5, "method": "dpo", "beta": 0.1})
    add_run(wd, "QuantizeJob", "stdlib-int8", {"method": "int8", "sizeBytesBefore": 4_000_000, "sizeBytesAfter": 2_000_000,
                                        "perplexityBefore": 100.0, "perplexityAfter": 101.0,
                                        "maxPerplexityIncrease": 0.05})
    wd.save_pipeline([], [str(QUICKSTART / "01-data.yaml")])  # the quickstart's folder: its report-checks.toml
    return wd


def test_checks_and_sections(workdir: WorkDir) -> None:
    report = build_report(workdir, measurements=MEASURED)
    checks = {c.what: c for c in report.checks}
    assert checks["Answers after SFT follow the instruction format"].ok is True
    assert checks["Answers after SFT follow the instruction format"].detail.startswith("2/2")
    assert checks["DPO preference accuracy on held-out pairs is above 0.5"].ok is True
    assert checks["INT8 stays within its perplexity threshold"].ok is True
    assert "+1.00 %" in checks["INT8 stays within its perplexity threshold"].detail
    md = render_markdown(report, "now")
    assert "| language | 10 | 8 | language_de 2 |" in md
    assert "exact_duplicate 2" in md and "email 3" in md
    assert "loss 8.000 at step 1 → 4.000 at step 3" in md
    assert "| after finetune (stdlib-sft) | In short, a: b. |" in md
    assert checks["Domain perplexity falls after pretraining"].detail == "900.0 → 40.00"
    assert "| 3.8 MiB | 1.9 MiB | 0.50× |" in md


def test_failing_thresholds_are_marked(workdir: WorkDir) -> None:
    state = workdir.load_state("default", "PreferenceRun", "stdlib-dpo")
    assert state is not None
    state.status.results["preferenceAccuracy"] = 0.4
    workdir.save_state(state)
    checks = {c.what: c.ok for c in build_report(workdir, measurements=MEASURED).checks}
    assert checks["DPO preference accuracy on held-out pairs is above 0.5"] is False


def test_html_is_self_contained(workdir: WorkDir) -> None:
    paths = write_report(workdir.root, measurements=MEASURED)
    page = Path(paths["html"]).read_text()
    assert page.count("data:image/png;base64,") == 2  # funnel and loss curves
    assert "<link" not in page and 'src="http' not in page and "<script" not in page
    assert (workdir.root / "report-loss.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["| a | b |", "| --- | --- |", "| 1 | x \\| y |"], "<td>x | y</td>"),
        (["- **bold** item"], "<li><strong>bold</strong> item</li>"),
        (["*note*"], "<p><em>note</em></p>"),
        (["<script>"], "&lt;script&gt;"),
    ],
)
def test_markdown_is_rendered_by_markdown_it(lines: list[str], expected: str) -> None:
    assert expected in markdown_to_html(lines)


def test_a_pipeline_without_checks_gets_none(workdir: WorkDir, tmp_path: Path) -> None:
    """A user's own pipeline is not judged by the quickstart's checks (issue 12 item 6)."""
    folder = tmp_path / "mine"
    folder.mkdir()
    workdir.save_pipeline([], [str(folder / "sft.yaml")])
    report = build_report(workdir, measurements=MEASURED)
    assert report.checks == []
    assert "What changed" not in render_markdown(report, "now")


def test_bad_check_declarations_are_named(tmp_path: Path) -> None:
    (tmp_path / "report-checks.toml").write_text('[[check]]\nname = "x"\n')
    specs, problems = load_checks([tmp_path])
    assert specs == [] and "check[0]: needs a string name and a string expect" in problems[0]
    (tmp_path / "report-checks.toml").write_text("[[check]\n")
    assert "fix the TOML" in load_checks([tmp_path])[1][0]


def test_render_html_escapes_titles(workdir: WorkDir) -> None:
    report = build_report(workdir, measurements=MEASURED)
    report.title = "<b>x</b>"
    assert "&lt;b&gt;x&lt;/b&gt;" in render_html(report, "now")


def test_reference_overlap_is_shown_per_stage_and_checked(tmp_path: Path) -> None:
    """eval.references: each answer's overlap with its reference, per stage, and a check that reads it."""
    wd = WorkDir(tmp_path / "work")
    for kind, name, before, after in [("PretrainRun", "smol-domain", 0.1, 0.2), ("FinetuneRun", "smol-sft", 0.2, 0.6)]:
        out = add_run(wd, kind, name, {"finalLoss": 1.0})
        (out / "eval").mkdir()
        labels = ("before", "after") if kind == "PretrainRun" else ("base", "tuned")
        records = [{"prompt": "q0", labels[0]: "b", labels[1]: "a", "reference": "r",
                    "overlap": {labels[0]: before, labels[1]: after}}]
        (out / "eval" / "prompts.json").write_text(json.dumps({"labels": list(labels), "prompts": records}))
    wd.save_pipeline([("default", "PretrainRun", "smol-domain"), ("default", "FinetuneRun", "smol-sft")],
                     [str(REPO / "examples" / "real-model" / "01-data.yaml")])
    report = build_report(wd, measurements=Measurements(perplexity={"untrained": 20.0, "smol-domain": 10.0}))
    checks = {c.what: c for c in report.checks}
    check = checks["Answers after SFT are closer to the reference answers than SmolLM2's own"]
    assert check.ok is True and check.detail == "ROUGE-L F1 0.100 → 0.600"
    md = render_markdown(report, "now")
    assert "| before training | 0.100 |" in md and "| after finetune (smol-sft) | 0.600 |" in md
    assert "| after pretrain (smol-domain) | a | 0.20 |" in md


def test_measurements_use_the_threads_the_runs_were_given(workdir: WorkDir, monkeypatch: pytest.MonkeyPatch) -> None:
    from crucible.local.report import measure_threads
    from crucible.local.workdir import SPEC_FILE

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    states = workdir.all_states()
    assert measure_threads(workdir, states) == 1  # nothing asked: one thread, robust on a busy machine
    for name, threads in [("stdlib-lm", "2"), ("stdlib-sft", "not-a-number")]:
        kind = "PretrainRun" if name == "stdlib-lm" else "FinetuneRun"
        (workdir.run_dir("default", kind, name) / SPEC_FILE).write_text(
            json.dumps({"resources": {"env": {"OMP_NUM_THREADS": threads}}}))
    assert measure_threads(workdir, states) == 2  # the largest a measured model ran with; junk ignored
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert measure_threads(workdir, states) == 3  # the user's environment wins
