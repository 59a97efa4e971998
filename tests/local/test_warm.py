"""Warm spares (crucible.local.warm): a released spare is the process a cold start would have been —
its log, environment, arguments and exit status — and one whose import-time environment changed is
not used. (End to end, with SIGKILLed real trainers: tests/local/test_goodput_bench.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from crucible.local import warm
from crucible.local.processes import ProcessGroup, ProcessSpec
from waits import scaled

PYTHON = sys.executable


def _spare(tmp_path: Path, env: dict[str, str]) -> warm.Spare:
    # stage "probe" preloads nothing: the test pays no torch import
    return warm.Spare.start(PYTHON, "probe", env, tmp_path / "logs", 0)


def test_released_spare_runs_the_attempt_with_its_env_log_and_exit_code(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CRUCIBLE_ATTEMPT": "0", "MASTER_PORT": "1"}
    spare = _spare(tmp_path, env)
    argv = [PYTHON, "-m", "crucible.trainer", "probe", "--spec", "x.json"]
    attempt_env = {**env, "CRUCIBLE_ATTEMPT": "3", "MASTER_PORT": "2"}  # read after the imports: fits
    assert spare.usable_for(argv, attempt_env) is None
    log = tmp_path / "logs" / "attempt-3.log"
    group = ProcessGroup([ProcessSpec(argv, attempt_env, log, 0)])
    group.start([spare])
    assert group.pids == [spare.pid]
    assert group.procs[0].wait(timeout=scaled(120)) == 2  # an unknown stage is bad input, as from a cold start
    text = log.read_text()
    assert text.startswith("--- crucible: started ") and f"(warm spare, pid {spare.pid})" in text
    assert "crucible-spare: imports took" in text and "unknown stage 'probe'" in text
    assert not spare.preload_log.exists()  # its import output went into the attempt's log
    cold = subprocess.run(argv, env=attempt_env, capture_output=True, text=True, timeout=scaled(120))
    assert cold.returncode == 2 and "unknown stage 'probe'" in cold.stderr


def test_spare_with_a_changed_import_time_environment_or_stage_is_not_used(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    spare = _spare(tmp_path, env)
    try:
        argv = [PYTHON, "-m", "crucible.trainer", "probe", "--spec", "x.json"]
        why = spare.usable_for(argv, {**env, "HF_HOME": str(tmp_path / "elsewhere")})
        assert why is not None and "HF_HOME" in why
        assert "stage" in (spare.usable_for([*argv[:3], "pretrain", *argv[4:]], env) or "")
        assert spare.usable_for(["/other/python", *argv[1:]], env) is not None
        assert warm.env_differences(env, {**env, "RANK": "1", "CRUCIBLE_RESTARTS": "2", "OMP_NUM_THREADS": "1"}) == []
    finally:
        spare.discard()
    assert not spare.alive() and not spare.preload_log.exists()
    assert spare.usable_for(argv, env) is not None  # a dead spare is never released
