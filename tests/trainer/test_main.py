"""`python -m crucible.trainer STAGE` dispatch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from crucible.trainer.__main__ import main


def test_unknown_stage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train"]) == 2
    assert "unknown stage 'train'" in capsys.readouterr().err


def test_no_stage_is_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage" in capsys.readouterr().out


def test_missing_module(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from crucible.trainer import __main__ as entry

    monkeypatch.setitem(entry.STAGES, "quantize", "crucible.trainer.no_such_stage_module")
    assert main(["quantize", "--spec", "x.json"]) == 1
    assert "not available" in capsys.readouterr().err


def test_dispatches_to_pretrain_main(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    import crucible.trainer.pretrain as pretrain

    monkeypatch.setattr(pretrain, "main", lambda argv: seen.append(argv) or 0)
    assert main(["pretrain", "--spec", "f.json"]) == 0
    assert seen == [["--spec", "f.json"]]


def test_module_entry_point() -> None:
    proc = subprocess.run([sys.executable, "-m", "crucible.trainer", "nope"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown stage" in proc.stderr


def test_success_results_reach_the_termination_message(tmp_path, monkeypatch) -> None:
    """The operator reads status.results from rank 0's termination message (outputs may be on S3)."""
    import json as _json

    from crucible.trainer.faults import write_success_message

    log = tmp_path / "termination-log"
    monkeypatch.setenv("CRUCIBLE_TERMINATION_LOG", str(log))
    write_success_message({"stage": "pretrain", "finishedAt": "now", "inputs": {"data": {"uri": "s3://b/d"}},
                           "results": {"finalLoss": 2.5, "perplexity": 12.1}})
    write_success_message({"stage": "pretrain", "results": {"blob": "x" * 5000}})
    first, second = (_json.loads(line) for line in log.read_text().splitlines())
    assert first == {"stage": "pretrain", "results": {"finalLoss": 2.5, "perplexity": 12.1}}
    assert second["results"] == {"note": "results too large; see _SUCCESS"}
