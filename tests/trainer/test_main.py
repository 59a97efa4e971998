"""`python -m crucible.trainer STAGE` dispatch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from crucible.trainer.__main__ import main
from waits import scaled


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


EXIT_PROBE = r'''
import atexit, os, runpy, sys, threading, time, types
from concurrent.futures import ThreadPoolExecutor

out = sys.argv[1]

def mark(name, _os=os):
    _os.close(_os.open(_os.path.join(out, name), _os.O_CREAT | _os.O_WRONLY))

class Finalised:
    def __del__(self, _mark=mark):
        _mark("teardown")

def main(argv):
    stage.keep = Finalised()  # finalised only by the interpreter's teardown
    atexit.register(mark, "atexit")
    threading.Thread(target=lambda: (time.sleep(0.3), mark("thread"))).start()
    pool = ThreadPoolExecutor(1)
    pool.submit(lambda: (time.sleep(0.3), mark("pool")))
    print("still in a buffer", end="")
    return 3

stage = types.ModuleType("crucible.trainer.pretrain")
stage.main = main
sys.modules["crucible.trainer.pretrain"] = stage
sys.argv = ["-m", "pretrain", "--spec", "x.json"]
runpy.run_module("crucible.trainer", run_name="__main__", alter_sys=True)
'''


def test_module_exit_skips_the_interpreter_teardown_but_not_what_a_normal_exit_does(tmp_path) -> None:
    """`python -m crucible.trainer` ends without finalising every module (seconds with torch loaded,
    after `_SUCCESS`), yet joins threads, finishes executors, runs atexit and flushes stdout."""
    proc = subprocess.run([sys.executable, "-c", EXIT_PROBE, str(tmp_path)], capture_output=True, text=True,
                          timeout=scaled(120))
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "still in a buffer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atexit", "pool", "thread"]
