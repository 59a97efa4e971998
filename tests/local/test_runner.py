"""The embedded runner with a stand-in trainer: resume, skip, restart policy, failures, inputs."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from crucible.local.runner import RunnerError
from crucible.local.workdir import WorkDir, WorkDirBusyError

from .conftest import Pipeline, behave, chain, data_pipeline, pretrain_run, quantize_job


def spec_of(pipeline: Pipeline, kind: str, name: str) -> dict:
    return json.loads((pipeline.run_dir(kind, name) / "spec.json").read_text())


def test_chain_runs_in_order_with_inputs_resolved(pipeline: Pipeline) -> None:
    pipeline.write(chain())
    out = pipeline.run()
    assert {n: o.phase for n, o in out.items()} == dict.fromkeys(["corpus", "base", "sft", "int8"], "Succeeded")
    work = pipeline.workdir.absolute()
    data_spec = spec_of(pipeline, "DataPipeline", "corpus")
    assert data_spec["sources"][0]["uri"] == str(work / "inputs/docs.jsonl")  # relative -> work directory
    assert data_spec["output"]["uri"] == str(work / "default/datapipeline/corpus/output")
    base_spec = spec_of(pipeline, "PretrainRun", "base")
    assert base_spec["data"] == {"uri": str(work / "default/datapipeline/corpus/output")}
    assert base_spec["checkpoint"]["uri"] == str(work / "default/pretrainrun/base/checkpoints")
    assert spec_of(pipeline, "FinetuneRun", "sft")["model"] == {"uri": str(work / "default/pretrainrun/base/output")}
    state = pipeline.state("PretrainRun", "base")
    assert state.status.phase == "Succeeded"
    assert state.status.progress.step == 6
    assert state.status.results["finalLoss"] == pytest.approx(5.0 / 6)
    assert state.status.output_uri == str(work / "default/pretrainrun/base/output")
    assert pipeline.state("DataPipeline", "corpus").status.results["documentsOut"] == 7
    assert "rank 0 world 1" in pipeline.log("PretrainRun", "base")


def test_rerun_skips_finished_runs(pipeline: Pipeline) -> None:
    pipeline.write(chain())
    pipeline.run()
    again = pipeline.run()
    assert all(o.skipped and o.phase == "Succeeded" for o in again.values())
    assert not (pipeline.run_dir("PretrainRun", "base") / "logs" / "attempt-1.log").exists()


def test_sigkilled_trainer_is_restarted_and_resumes_from_checkpoint(pipeline: Pipeline, monkeypatch) -> None:
    behave(monkeypatch, base={"kill_at_step": 5})
    pipeline.write(chain())
    out = pipeline.run()
    assert out["base"].phase == "Succeeded"
    assert out["base"].restarts == 1
    state = pipeline.state("PretrainRun", "base")
    assert state.status.restarts == 1
    assert state.status.attempt == 1
    assert "resumed from checkpoint step 4" in pipeline.log("PretrainRun", "base", attempt=1)
    assert state.status.results["resumedFrom"] == 4
    # 6 kept steps of 0.02 s against the wall time of two attempts (process start-up included)
    assert state.status.goodput is not None and 0 < state.status.goodput < 0.5
    assert out["sft"].phase == "Succeeded"


def test_application_error_fails_without_restart_and_blocks_downstream(pipeline: Pipeline, monkeypatch) -> None:
    behave(monkeypatch, base={"crash_at_step": 3})
    pipeline.write(chain())
    out = pipeline.run()
    assert out["corpus"].phase == "Succeeded"
    assert out["base"].phase == "Failed"
    assert out["base"].restarts == 0
    assert "exited 1" in out["base"].message
    assert "boom on purpose" in out["base"].message  # the last log lines travel with the failure
    assert out["sft"].phase == "Failed"
    assert "DependencyFailed" in pipeline.state("FinetuneRun", "sft").status.message
    assert out["int8"].phase == "Failed"

    # Fixed (the crash only happens on attempt 0): the rerun resumes from the step-2 checkpoint.
    monkeypatch.delenv("FAKE_BEHAVIOUR")
    again = pipeline.run()
    assert {n: o.phase for n, o in again.items()} == dict.fromkeys(["corpus", "base", "sft", "int8"], "Succeeded")
    assert again["corpus"].skipped
    assert "resumed from checkpoint step 2" in pipeline.log("PretrainRun", "base", attempt=1)


def test_retriable_exit_restarts_until_the_budget_is_spent(pipeline: Pipeline, monkeypatch) -> None:
    behave(monkeypatch, base={"exit": 75})
    pipeline.write(chain()[:2])
    out = pipeline.run()
    assert out["base"].phase == "Failed"
    assert out["base"].restarts == 2
    status = pipeline.state("PretrainRun", "base").status
    assert status.message.startswith("RestartBudgetExhausted")
    assert "maxRestarts" in out["base"].message


def test_exit_zero_without_success_marker_is_an_application_error(pipeline: Pipeline, monkeypatch) -> None:
    behave(monkeypatch, corpus={"no_success": True})
    pipeline.write(chain()[:1])
    out = pipeline.run()
    assert out["corpus"].phase == "Failed"
    assert "_SUCCESS was not written" in out["corpus"].message


def test_changed_spec_reruns_that_run_and_everything_downstream(pipeline: Pipeline) -> None:
    pipeline.write(chain())
    pipeline.run()
    resources = chain()
    resources[1]["spec"]["model"]["hiddenSize"] = 64
    pipeline.write(resources)
    out = pipeline.run()
    assert out["corpus"].skipped
    assert not out["base"].skipped and not out["sft"].skipped and not out["int8"].skipped
    # started over: a different model cannot continue from the old checkpoints
    assert "resumed" not in pipeline.log("PretrainRun", "base")


def test_longer_training_continues_from_the_latest_checkpoint(pipeline: Pipeline) -> None:
    pipeline.write(chain())
    pipeline.run()
    resources = chain()
    resources[1] = pretrain_run(steps=8)
    pipeline.write(resources)
    out = pipeline.run()
    assert out["corpus"].skipped
    assert not out["base"].skipped and not out["sft"].skipped
    state = pipeline.state("PretrainRun", "base")
    assert state.status.progress.step == 8
    assert "resumed from checkpoint step 6" in pipeline.log("PretrainRun", "base", attempt=state.status.attempt)


@pytest.mark.parametrize(
    "edit",
    [
        lambda spec: spec["failurePolicy"].update(maxRestarts=7),
        lambda spec: spec.update(metrics={"port": 0}),
        lambda spec: spec.update(resources={"cpu": "2"}),
    ],
    ids=["failurePolicy", "metrics", "resources"],
)
def test_operational_edits_do_not_rerun(pipeline: Pipeline, edit) -> None:
    pipeline.write(chain()[:2])
    pipeline.run()
    resources = chain()[:2]
    edit(resources[1]["spec"])
    pipeline.write(resources)
    assert all(o.skipped for o in pipeline.run().values())


def test_changed_input_file_reruns_the_pipeline_that_reads_it(pipeline: Pipeline) -> None:
    pipeline.write(chain()[:2])
    pipeline.run()
    (pipeline.workdir / "inputs" / "docs.jsonl").write_text('{"text": "changed"}\n')
    out = pipeline.run()
    assert not out["corpus"].skipped
    assert not out["base"].skipped


def test_missing_local_input_names_file_field_and_directory(pipeline: Pipeline) -> None:
    pipeline.write([data_pipeline(source="inputs/missing.jsonl")])
    with pytest.raises(RunnerError) as err:
        pipeline.run()
    text = str(err.value)
    assert "pipeline.yaml" in text
    assert "spec.sources[0].uri" in text
    assert "missing.jsonl does not exist" in text
    assert str(pipeline.workdir.absolute()) in text


def test_processes_per_node_starts_a_torchrun_style_world(pipeline: Pipeline) -> None:
    base = pretrain_run()
    base["spec"]["resources"] = {"processesPerNode": 2}
    pipeline.write([data_pipeline(), base])
    out = pipeline.run()
    assert out["base"].phase == "Succeeded"
    logs = pipeline.run_dir("PretrainRun", "base") / "logs"
    assert "rank 0 world 2" in (logs / "attempt-0.log").read_text()
    assert "rank 1 world 2" in (logs / "attempt-0.rank-1.log").read_text()


def test_only_runs_the_named_run_and_what_it_needs(pipeline: Pipeline) -> None:
    pipeline.write(chain())
    out = pipeline.run(only=["sft"])
    assert sorted(out) == ["base", "corpus", "sft"]
    with pytest.raises(RunnerError, match="no such run"):
        pipeline.run(only=["nope"])


def test_fresh_starts_over(pipeline: Pipeline) -> None:
    pipeline.write(chain()[:2])
    pipeline.run()
    out = pipeline.run(fresh=True)
    assert not out["corpus"].skipped and not out["base"].skipped


def test_hang_is_killed_and_restarted(pipeline: Pipeline, monkeypatch) -> None:
    behave(monkeypatch, base={"hang_at_step": 3})
    pipeline.write(chain()[:2])
    out = pipeline.run()
    assert out["base"].phase == "Succeeded"
    assert out["base"].restarts == 1
    assert "resumed from checkpoint step 2" in pipeline.log("PretrainRun", "base", attempt=1)


def test_second_runner_on_the_same_workdir_is_refused(pipeline: Pipeline) -> None:
    pipeline.write(chain()[:1])
    with WorkDir(pipeline.workdir).lock(), pytest.raises(WorkDirBusyError, match="in use"):
        pipeline.run()


def test_prepare_annotation_runs_before_the_pipeline(pipeline: Pipeline) -> None:
    (pipeline.folder / "make_inputs.py").write_text(
        "import os, pathlib\n"
        "p = pathlib.Path(os.environ['CRUCIBLE_WORKDIR']) / 'inputs' / 'made.jsonl'\n"
        "p.write_text('{\"text\": \"made\"}\\n')\nprint('made', p)\n"
    )
    dp = data_pipeline(source="inputs/made.jsonl")
    dp["metadata"]["annotations"] = {"crucible.dev/prepare": "python make_inputs.py"}
    pipeline.write([dp])
    out = pipeline.run(allow_prepare=True)
    assert out["corpus"].phase == "Succeeded"
    assert (pipeline.workdir / "inputs" / "made.jsonl").exists()


def test_failing_prepare_names_the_annotation(pipeline: Pipeline) -> None:
    dp = data_pipeline()
    dp["metadata"]["annotations"] = {"crucible.dev/prepare": f"{sys.executable} -c 'raise SystemExit(3)'"}
    pipeline.write([dp])
    with pytest.raises(RunnerError, match=r"crucible.dev/prepare.*exited 3"):
        pipeline.run(allow_prepare=True)


def test_base_model_override_continues_pretraining_from_it(pipeline: Pipeline, tmp_path: Path) -> None:
    model = tmp_path / "base-model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    pipeline.write(chain()[:2])
    pipeline.run(base_model=str(model))
    assert spec_of(pipeline, "PretrainRun", "base")["model"]["source"] == {"uri": str(model)}
    assert spec_of(pipeline, "DataPipeline", "corpus")["tokenizer"]["source"] == {"uri": str(model)}


def test_quantize_of_a_finetune_output(pipeline: Pipeline) -> None:
    pipeline.write([data_pipeline(), pretrain_run(), quantize_job(model="base", kind="PretrainRun")])
    out = pipeline.run()
    assert out["int8"].phase == "Succeeded"
    assert spec_of(pipeline, "QuantizeJob", "int8")["model"]["uri"].endswith("pretrainrun/base/output")
    assert os.path.isdir(out["int8"].output_uri)


def test_data_pipeline_workers_run_each_stage_as_shards(pipeline: Pipeline) -> None:
    dp = data_pipeline()
    dp["spec"]["workers"] = 2
    pipeline.write([dp])
    out = pipeline.run()
    assert out["corpus"].phase == "Succeeded"
    logs = pipeline.run_dir("DataPipeline", "corpus") / "logs"
    first = (logs / "attempt-0.log").read_text()
    for stage in ("filter", "dedup", "tokenize"):
        assert f"--stage {stage} --shard 0 --num-shards 2" in first
        assert f"--stage {stage} --shard 1 --num-shards 2" in (logs / f"attempt-0.{stage}-1.log").read_text()
    assert "rank None" in first  # shards are independent processes, not a torch.distributed world


def test_suspended_run_is_not_started_and_blocks_what_needs_it(pipeline: Pipeline) -> None:
    resources = chain()[:3]
    resources[1]["spec"]["suspend"] = True
    pipeline.write(resources)
    out = pipeline.run()
    assert out["corpus"].phase == "Succeeded"
    assert out["base"].phase == "Suspended"
    assert out["sft"].phase == "Waiting"
    assert "PretrainRun base (Suspended)" in out["sft"].message
    resources[1]["spec"]["suspend"] = False
    pipeline.write(resources)
    again = pipeline.run()
    assert again["base"].phase == "Succeeded" and again["sft"].phase == "Succeeded"


def test_a_finetune_following_its_dataset_makes_a_revision_of_new_records_not_of_a_new_base(
        pipeline: Pipeline) -> None:
    resources = chain()[:3]
    resources[2]["spec"].update(method="full", revisions={"follow": "dataset"})
    pipeline.write(resources)
    pipeline.run()
    (pipeline.workdir / "inputs" / "docs.jsonl").write_text('{"text": "changed"}\n')
    out = pipeline.run()  # a new base model: revision 1 read the base, later ones continue from it
    assert not out["base"].skipped and out["sft"].skipped
    assert len(pipeline.state("FinetuneRun", "sft").status.revisions) == 1
    (pipeline.workdir / "inputs" / "sft.jsonl").write_text('{"prompt": "q2", "response": "a2"}\n')
    out = pipeline.run()
    assert not out["sft"].skipped and out["base"].skipped
    status = pipeline.state("FinetuneRun", "sft").status
    assert [r.revision for r in status.revisions] == [1, 2]
    spec = json.loads((pipeline.run_dir("FinetuneRun", "sft") / "spec.json").read_text())
    assert spec["model"]["uri"] == status.revisions[0].output_uri  # continued from revision 1
    assert spec["dataset"]["earlierRevisions"] == [status.revisions[0].output_uri]


def test_ports_chosen_together_are_distinct() -> None:
    """The rendezvous port and the metrics port of one attempt never coincide (two free_port() calls
    in a row may return the same port; a trainer then failed with "Address already in use")."""
    from crucible.local.processes import free_ports

    for _ in range(50):
        ports = free_ports(2)
        assert len(set(ports)) == 2 and all(0 < p < 65536 for p in ports)
