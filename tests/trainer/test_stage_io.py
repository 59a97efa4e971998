"""The stage I/O contract (crucible.trainer.stage_io): torch-free, one _SUCCESS writer, the
termination message from every stage, the data stage included."""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from crucible.trainer import stage_io
from crucible.trainer.config import parse_stage_spec
from crucible.trainer.config.common import EXIT_BAD_INPUT, EXIT_OK
from crucible.trainer.config.receipt import ForeignResultError
from crucible.trainer.storage import Storage

REPO = Path(__file__).resolve().parents[2]


def test_the_contract_imports_no_torch() -> None:
    code = ("import sys, crucible.trainer.stage_io, crucible.trainer.faults; "
            "print(','.join(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_success_is_written_once_whole_and_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "termination-log"
    monkeypatch.setenv("CRUCIBLE_TERMINATION_LOG", str(log))
    monkeypatch.delenv("CRUCIBLE_RUN", raising=False)
    out = tmp_path / "out"
    config = parse_stage_spec("quantize", {"model": {"uri": "/m"}})
    record = stage_io.write_success(Storage(), str(out), "quantize", {"model": {"uri": "/m"}},
                                    {"perplexityAfter": math.nan, "sizeBytesAfter": 10}, config)
    on_disk = json.loads((out / stage_io.SUCCESS).read_text())
    assert on_disk == record and on_disk["stage"] == "quantize"
    assert set(on_disk) == {"stage", "specHash", "finishedAt", "inputs", "results"}
    assert on_disk["results"] == {"perplexityAfter": None, "sizeBytesAfter": 10}  # JSON has no NaN
    assert [p.name for p in out.iterdir()] == [stage_io.SUCCESS]  # no temporary file left beside it
    assert json.loads(log.read_text()) == {"stage": "quantize", "results": on_disk["results"]}
    assert stage_io.finished(Storage(), str(out), config) and stage_io.read_success(Storage(), str(out)) == on_disk
    other = parse_stage_spec("quantize", {"model": {"uri": "/another"}})
    with pytest.raises(ForeignResultError, match="written for a different spec"):
        stage_io.finished(Storage(), str(out), other)  # an edited spec's output is not taken as done
    assert stage_io.read_success(Storage(), str(tmp_path / "elsewhere")) is None


def test_no_stage_spells_the_success_file_itself() -> None:
    offenders = []
    for path in (REPO / "trainer").rglob("*.py"):
        if path.name == "stage_io.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value == "_SUCCESS":
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == [], "use crucible.trainer.stage_io.SUCCESS / write_success"


def test_the_data_stage_leaves_its_failure_in_the_termination_message(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from crucible.trainer.data.pipeline import main

    log = tmp_path / "termination-log"
    monkeypatch.setenv("CRUCIBLE_TERMINATION_LOG", str(log))
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"sources": [{"name": "web", "uri": str(tmp_path / "nothing-here")}],
                                "output": {"uri": str(tmp_path / "out")}}))
    assert main(["--spec", str(spec)]) == EXIT_BAD_INPUT
    message = json.loads(log.read_text().splitlines()[-1])
    assert message["exitCode"] == EXIT_BAD_INPUT and message["kind"] == "bad-input"
    assert "sources[0].uri" in message["reason"]
    assert not (tmp_path / "out" / stage_io.SUCCESS).exists()


def test_every_stage_main_goes_through_the_contract(tmp_path: Path) -> None:
    """A bad spec gets the same exit code and file-naming message from each of the five stages."""
    from crucible.trainer.__main__ import STAGES, main

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for stage in STAGES:
        assert main([stage, "--spec", str(bad)]) == EXIT_BAD_INPUT, stage
    assert main(["data", "--help"]) == EXIT_OK


def test_success_lists_the_hash_of_every_output_file(tmp_path: Path) -> None:
    import hashlib

    out = tmp_path / "out"
    (out / "eval").mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"weights")
    (out / "eval" / "prompts.json").write_text("{}")
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "step-1").write_text("not part of the artefact")
    config = parse_stage_spec("quantize", {"model": {"uri": "/m"}})
    record = stage_io.write_success(Storage(), str(out), "quantize", {}, {}, config)
    assert record["outputs"] == {"eval/prompts.json": hashlib.sha256(b"{}").hexdigest(),
                                 "model.safetensors": hashlib.sha256(b"weights").hexdigest()}
