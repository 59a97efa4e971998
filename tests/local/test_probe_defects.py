"""The embedded runner as a new user meets it (issue #11): YAML that runs commands, torn state,
credentials in the work directory.

* ``crucible.dev/prepare`` ran a shell command from any YAML file handed to ``crucible run``: now
  only with ``--allow-prepare`` or a yes at a terminal prompt that shows the command;
* a truncated ``state.json`` raised a traceback (and ``crucible status`` said "no runs recorded");
* ``spec.json`` and ``state.json`` were world-readable; credentials come only by Secret reference
  (``resources.secretEnv``), taken from the environment in embedded mode.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from tests.local.conftest import Pipeline, data_pipeline, pretrain_run

from crucible.local.runner import RunnerError
from waits import scaled

CRUCIBLE = [sys.executable, "-m", "crucible.cli"]


def prepared_pipeline(pipeline: Pipeline) -> Path:
    marker = pipeline.root / "ran.txt"
    (pipeline.folder / "make_inputs.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    dp = data_pipeline()
    dp["metadata"]["annotations"] = {"crucible.dev/prepare": "python make_inputs.py"}
    pipeline.write([dp])
    return marker


def test_prepare_command_does_not_run_unless_allowed(pipeline: Pipeline) -> None:
    marker = prepared_pipeline(pipeline)
    with pytest.raises(RunnerError, match=r"asks to run `python make_inputs.py`.*--allow-prepare"):
        pipeline.run()
    assert not marker.exists()
    asked: list[str] = []
    with pytest.raises(RunnerError):
        pipeline.run(confirm_prepare=lambda what: asked.append(what) or False)
    assert not marker.exists() and "python make_inputs.py" in asked[0]
    out = pipeline.run(confirm_prepare=lambda what: True)
    assert marker.exists() and out["corpus"].phase == "Succeeded"


def test_cli_refuses_prepare_without_a_terminal_and_runs_it_with_the_flag(pipeline: Pipeline) -> None:
    from tests.local.conftest import FAKE_STAGE

    marker = prepared_pipeline(pipeline)
    env = {**os.environ, "CRUCIBLE_TRAINER_COMMAND": f"{sys.executable} {FAKE_STAGE}"}
    argv = [*CRUCIBLE, "run", str(pipeline.folder), "-w", str(pipeline.workdir), "--plain", "--no-report"]
    refused = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=scaled(120))
    assert refused.returncode == 2 and "--allow-prepare" in refused.stderr and not marker.exists()
    allowed = subprocess.run([*argv, "--allow-prepare"], env=env, capture_output=True, text=True, timeout=scaled(120))
    assert allowed.returncode == 0, allowed.stderr
    assert marker.exists()


def test_truncated_state_is_set_aside_and_the_run_resumes(pipeline: Pipeline) -> None:
    pipeline.write([data_pipeline(), pretrain_run()])
    pipeline.run()
    state_file = pipeline.run_dir("PretrainRun", "base") / "state.json"
    state_file.write_text(state_file.read_text()[:40])
    status = subprocess.run([*CRUCIBLE, "status", "-w", str(pipeline.workdir)], capture_output=True, text=True,
                            timeout=scaled(60))
    assert "Traceback" not in status.stderr
    assert f"{state_file}: unreadable run state (not complete JSON" in status.stderr
    out = pipeline.run()  # no traceback: the state is rebuilt, the output checked again by its _SUCCESS
    assert out["base"].phase == "Succeeded" and out["base"].skipped
    assert (state_file.parent / "state.json.unreadable").exists()
    assert pipeline.state("PretrainRun", "base").status.phase == "Succeeded"


def test_spec_and_state_files_are_readable_by_their_owner_only(pipeline: Pipeline) -> None:
    pipeline.write([data_pipeline()])
    pipeline.run()
    for name in ("spec.json", "state.json"):
        mode = stat.S_IMODE((pipeline.run_dir("DataPipeline", "corpus") / name).stat().st_mode)
        assert mode & 0o077 == 0, (name, oct(mode))


def test_secret_env_comes_from_the_environment_in_embedded_mode(pipeline: Pipeline,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    dp = data_pipeline()
    dp["spec"]["resources"] = {"secretEnv": {"HF_TOKEN": {"secret": "hf", "key": "token"}}}
    pipeline.write([dp])
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(RunnerError, match=r"spec.resources.secretEnv.HF_TOKEN: embedded mode has no Secrets"):
        pipeline.run()
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    assert pipeline.run()["corpus"].phase == "Succeeded"
    spec_text = (pipeline.run_dir("DataPipeline", "corpus") / "spec.json").read_text()
    assert "hf_not_a_real_token" not in spec_text
