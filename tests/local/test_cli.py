"""`crucible run|status|logs` as a user runs them: a killed runner, Ctrl-C, reruns, the report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from waits import scaled

from .conftest import FAKE_STAGE, Pipeline, chain

CRUCIBLE = [sys.executable, "-m", "crucible.cli"]


def env_for(behaviour: dict | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["CRUCIBLE_TRAINER_COMMAND"] = f"{sys.executable} {FAKE_STAGE}"
    env["FAKE_BEHAVIOUR"] = json.dumps(behaviour or {})
    env.pop("CRUCIBLE_WORKDIR", None)
    return env


def crucible(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CRUCIBLE, *args], env=env or env_for(), cwd=cwd, capture_output=True, text=True, timeout=scaled(120))


def wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + scaled(timeout)
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


def step_of(pipeline: Pipeline, kind: str, name: str) -> int:
    state = pipeline.state(kind, name)
    return (state.status.progress.step or 0) if state else 0


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_killed_runner_takes_its_trainers_down_and_the_rerun_resumes(pipeline: Pipeline) -> None:
    pipeline.write(chain())
    slow = {"base": {"step_seconds": 0.4}}
    proc = subprocess.Popen([*CRUCIBLE, "run", str(pipeline.folder), "-w", str(pipeline.workdir), "--plain"],
                            env=env_for(slow), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: step_of(pipeline, "PretrainRun", "base") >= 3)
        trainer_pids = pipeline.state("PretrainRun", "base").pids
        assert trainer_pids
        proc.kill()  # SIGKILL: no cleanup code runs
        proc.wait()
        wait_for(lambda: not any(alive(p) for p in trainer_pids), timeout=scaled(10))
    finally:
        if proc.poll() is None:
            proc.kill()

    status = crucible("status", "-w", str(pipeline.workdir))
    assert status.returncode == 0
    base_line = next(line for line in status.stdout.splitlines() if line.startswith("base "))
    assert "Running" in base_line
    assert "no crucible run is active" in base_line

    rerun = crucible("run", str(pipeline.folder), "-w", str(pipeline.workdir), "--plain", "--no-report")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "corpus: already succeeded" in rerun.stdout.replace("DataPipeline ", "")
    logs = crucible("logs", "base", "-w", str(pipeline.workdir))
    assert "resumed from checkpoint step" in logs.stdout
    state = pipeline.state("PretrainRun", "base")
    assert state.status.phase == "Succeeded"
    assert state.status.restarts == 1  # the lost attempt counts as an infrastructure restart
    assert "attempt 0 disappeared while running" in rerun.stdout

    status = crucible("status", "-w", str(pipeline.workdir))
    for name in ("corpus", "base", "sft", "int8"):
        assert any(line.startswith(f"{name} ") and "Succeeded" in line for line in status.stdout.splitlines())
    assert "6/6" in status.stdout  # base's step column


def test_ctrl_c_stops_cleanly_and_the_rerun_resumes(pipeline: Pipeline) -> None:
    pipeline.write(chain()[:2])
    proc = subprocess.Popen([*CRUCIBLE, "run", str(pipeline.folder), "-w", str(pipeline.workdir), "--plain"],
                            env=env_for({"base": {"step_seconds": 0.4}}), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: step_of(pipeline, "PretrainRun", "base") >= 3)
    trainer_pids = pipeline.state("PretrainRun", "base").pids
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=scaled(30))
    assert proc.returncode == 130, out
    assert "Run the same command again to resume" in out
    assert not any(alive(p) for p in trainer_pids)
    state = pipeline.state("PretrainRun", "base")
    assert state.status.phase == "Pending"
    assert "Ctrl-C" in (state.status.message or "")
    rerun = crucible("run", str(pipeline.folder), "-w", str(pipeline.workdir), "--plain", "--no-report")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    state = pipeline.state("PretrainRun", "base")
    assert state.status.phase == "Succeeded"
    assert state.status.restarts == 0  # a stop the user asked for is not a failure
    assert "resumed from checkpoint step" in crucible("logs", "base", "-w", str(pipeline.workdir)).stdout


def test_run_writes_a_self_contained_report(pipeline: Pipeline) -> None:
    pipeline.write(chain())
    result = crucible("run", str(pipeline.folder), "-w", str(pipeline.workdir), "--plain")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4/4 run(s) succeeded" in result.stdout
    md = (pipeline.workdir / "report.md").read_text()
    assert "gopher_short" in md and "exact" in md  # the funnel, from manifest.json
    assert "report-loss.png" in md
    page = (pipeline.workdir / "report.html").read_text()
    assert "data:image/png;base64," in page
    assert 'src="http' not in page and "<link" not in page


def test_bad_input_exits_2_with_the_file_and_field(pipeline: Pipeline) -> None:
    resources = chain()
    resources[1]["spec"]["training"]["seqLen"] = 4
    pipeline.write(resources)
    result = crucible("run", str(pipeline.folder), "-w", str(pipeline.workdir))
    assert result.returncode == 2
    assert "pipeline.yaml" in result.stderr and "training.seqLen" in result.stderr


def test_failed_run_exits_1_and_points_at_its_log(pipeline: Pipeline) -> None:
    pipeline.write(chain()[:2])
    result = crucible("run", str(pipeline.folder), "-w", str(pipeline.workdir), "--plain", "--no-report",
                      env=env_for({"base": {"crash_at_step": 2}}))
    assert result.returncode == 1
    assert "crucible logs base" in result.stdout
    logs = crucible("logs", "pretrainrun/base", "-w", str(pipeline.workdir), "--tail", "3")
    assert "boom on purpose" in logs.stdout
    missing = crucible("logs", "nope", "-w", str(pipeline.workdir))
    assert missing.returncode == 1 and "pretrainrun/base" in missing.stderr


def test_default_workdir_is_found_by_status_and_logs(pipeline: Pipeline) -> None:
    pipeline.write(chain()[:1])
    workdir = pipeline.root / ".crucible" / "pipeline"  # .crucible/<name of the folder run>
    (workdir / "inputs").mkdir(parents=True)
    (workdir / "inputs" / "docs.jsonl").write_text('{"text": "hello"}\n')
    result = crucible("run", str(pipeline.folder), "--plain", "--no-report", cwd=pipeline.root)
    assert result.returncode == 0, result.stdout + result.stderr
    status = crucible("status", cwd=pipeline.root)
    assert any(line.startswith("corpus ") and "Succeeded" in line for line in status.stdout.splitlines())
    assert "fake data corpus" in crucible("logs", "corpus", cwd=pipeline.root).stdout


@pytest.mark.parametrize("output", ["table", "json"])
def test_status_output_formats(pipeline: Pipeline, output: str) -> None:
    pipeline.write(chain()[:1])
    assert crucible("run", str(pipeline.folder), "-w", str(pipeline.workdir), "--no-report").returncode == 0
    result = crucible("status", "-w", str(pipeline.workdir), "-o", output)
    assert result.returncode == 0
    if output == "json":
        data = json.loads(result.stdout)
        assert data[0]["status"]["phase"] == "Succeeded"
    else:
        assert result.stdout.splitlines()[0].split() == ["NAME", "KIND", "PHASE", "STEP", "LOSS", "RESTARTS", "TIME", "MESSAGE"]


def test_logs_follow_moves_to_the_next_attempt_and_stops_with_the_run(pipeline: Pipeline) -> None:
    from .conftest import data_pipeline, pretrain_run

    pipeline.write([data_pipeline(), pretrain_run(steps=12)])
    env = env_for({"base": {"step_seconds": 0.4, "kill_at_step": 10}})
    run = subprocess.Popen([*CRUCIBLE, "run", str(pipeline.folder), "-w", str(pipeline.workdir), "--plain",
                            "--no-report"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: step_of(pipeline, "PretrainRun", "base") >= 1)
    follow = subprocess.run([*CRUCIBLE, "logs", "base", "-f", "-w", str(pipeline.workdir)], env=env,
                            capture_output=True, text=True, timeout=scaled(60))
    assert run.wait(timeout=scaled(60)) == 0
    assert "attempt 0" in follow.stdout
    assert "attempt changed, now following" in follow.stdout
    assert "resumed from checkpoint step 8" in follow.stdout
