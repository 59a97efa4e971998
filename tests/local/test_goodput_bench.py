"""bench/goodput.py --smoke: an embedded PretrainRun SIGKILLed twice mid-training resumes and ends
with exactly the weights and per-step losses of its uninterrupted twin (figures not asserted:
they depend on the machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from waits import scaled

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_goodput_smoke_loses_nothing_to_sigkills(tmp_path: Path) -> None:
    figures = tmp_path / "goodput.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "goodput.py"), "--smoke", "--workdir",
                           str(tmp_path / "bench"), "--json", str(figures)],
                          capture_output=True, text=True, timeout=scaled(300), cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    f = json.loads(figures.read_text())
    assert f["faults"] >= 2 and f["restarts"] >= 2
    assert f["lossesEqualReference"] and f["weightsEqualReference"]
    assert f["steps"] == 80 and all(x["stepsLost"] >= 0 for x in f["perFault"])
    assert 0 < f["goodput"] < f["referenceGoodput"] <= 1
    assert "goodput" in proc.stdout and "restart latency" in proc.stdout
    # every restart ran on a warm spare (imports done before the fault): its latency is taken apart
    assert f["warmRestarts"] == f["faults"], f["perFault"]
    # the first attempt ran on the spare `crucible run` started before its own imports
    assert f["startupPhases"]["warm"] is True, f["startupPhases"]
    # a fresh Llama is crucible.trainer.llama's: no attempt imported transformers before its first step
    assert f["startupPhases"]["transformersImported"] is False, f["startupPhases"]
    assert not any(x.get("transformersImported") for x in f["perFault"]), f["perFault"]
    assert set(f["exportPhases"]) == {"finalCheckpoint", "finalEvaluation", "exportAndSuccess", "trainerExitSeen",
                                      "cliExit"}
    phases = f["restartPhasesMeanSeconds"]
    assert set(phases) == {"exitSeen", "processStarted", "importsDone", "checkpointRead", "firstStepDone"}
    assert all(v >= 0 for v in phases.values())
