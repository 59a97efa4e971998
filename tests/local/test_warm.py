"""Warm spares (crucible.local.warm): a released spare is the process a cold start would have been —
its log, environment, arguments and exit status — and one whose import-time environment changed is
not used. (End to end, with SIGKILLed real trainers: tests/local/test_goodput_bench.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from crucible.local import warm
from crucible.local.processes import ProcessGroup, ProcessSpec
from waits import scaled

from .conftest import Pipeline, data_pipeline, pretrain_run

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


def test_the_stage_of_the_first_training_run_is_read_from_kind_lines_alone(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "data.yaml").write_text("apiVersion: crucible.dev/v1alpha1\nkind: DataPipeline\n")
    assert warm.stage_in([tmp_path / "a"]) is None  # no training run: no spare
    (tmp_path / "a" / "sft.yml").write_text(
        "kind: 'FinetuneRun'  # tuned\r\nspec:\n  model:\n    fromRun: {kind: PretrainRun, name: base}\n"
        "  other:\n    kind: PretrainRun\n")  # only top-level kind lines count
    assert warm.stage_in([tmp_path / "a"]) == "finetune"
    (tmp_path / "base.yaml").write_text("---\nkind: PreferenceRun\n---\nkind: \"PretrainRun\"\n")
    assert warm.stage_in([tmp_path / "a", tmp_path / "base.yaml", tmp_path / "missing"]) == "pretrain"
    assert warm.first_attempt_spare([tmp_path], env={**os.environ, "CRUCIBLE_WARM_SPARES": "0"}) is None
    assert warm.first_attempt_spare([tmp_path], env={**os.environ, "CRUCIBLE_TRAINER_COMMAND": "x"}) is None


def test_the_first_attempts_spare_goes_to_a_run_of_its_stage_or_is_discarded_quietly(
        pipeline: Pipeline, capsys: pytest.CaptureFixture[str]) -> None:
    def spare_for(stage: str) -> warm.Spare:
        spare = _spare(pipeline.root, {**os.environ, "PYTHONUNBUFFERED": "1"})
        spare.stage, spare.quiet = stage, True  # as first_attempt_spare makes it (preloading nothing here)
        return spare

    pipeline.write([data_pipeline()])
    unused = spare_for("pretrain")
    assert pipeline.run(first_spare=unused)["corpus"].phase == "Succeeded"
    assert not unused.alive()  # no run of its stage: discarded when the runner ends
    pipeline.write([data_pipeline(), pretrain_run()])
    taken = spare_for("pretrain")
    outcomes = pipeline.run(first_spare=taken)
    assert outcomes["base"].phase == "Succeeded"
    # the PretrainRun's first attempt took it; a stand-in trainer does not fit it: discarded, no line said
    assert not taken.alive() and "starting the attempt cold" not in capsys.readouterr().out


def test_the_start_up_table_of_stages_agrees_with_the_registry() -> None:
    """warm.KIND_STAGES is read before crucible.api is imported; the kind modules stay its source."""
    from crucible.api.registry import kind_of, kinds

    for kind, stage in warm.KIND_STAGES.items():
        assert kind_of(kind).entry == ("-m", "crucible.trainer", stage), kind
        assert stage in warm.PRELOAD, stage
    # every training kind whose stage has a preload list is in the table
    expected = {k.name for k in kinds() if k.checkpoints and k.entry[-1] in warm.PRELOAD}
    assert set(warm.KIND_STAGES) == expected


@pytest.mark.parametrize(("stage", "spec", "needed"), [
    ("pretrain", {"model": {"hiddenSize": 64}}, False),  # a fresh Llama: crucible.trainer.llama
    ("pretrain", {"model": {"architecture": "llama"}}, False),
    ("pretrain", {"model": {"architecture": "mixtral"}}, True),
    ("pretrain", {"model": {"source": {"uri": "/models/base"}}}, True),
    ("pretrain", None, False),  # the first attempt's spare, before any YAML is parsed: a guess
    ("pretrain", "not json", True),  # unreadable: import it rather than pay it on the restart
    ("finetune", {"model": {}}, True),
    ("preference", None, True),
])
def test_a_spare_imports_transformers_only_for_an_attempt_that_builds_a_transformers_model(
        tmp_path: Path, stage: str, spec: object, needed: bool) -> None:
    import json

    path: str | None = None
    if spec is not None:
        file = tmp_path / "spec.json"
        file.write_text(spec if isinstance(spec, str) else json.dumps(spec))
        path = str(file)
    assert warm.needs_transformers(stage, path) is needed
    argv = [PYTHON, "-m", "crucible.trainer", stage, *(["--spec", path] if path else [])]
    assert warm.spec_path_of(argv) == path


def test_the_spare_of_a_fresh_pretrain_leaves_transformers_unimported(tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text('{"model": {"hiddenSize": 64}}')
    probe = ("import sys; from crucible.local import warm; warm._preload('pretrain', sys.argv[1]); "
             "print('torch' in sys.modules, 'crucible.trainer.pretrain' in sys.modules, "
             "any(m.split('.')[0] == 'transformers' for m in sys.modules))")
    out = subprocess.run([PYTHON, "-c", probe, str(spec)], capture_output=True, text=True, timeout=scaled(180))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "True", "False"], out.stdout + out.stderr[-2000:]
