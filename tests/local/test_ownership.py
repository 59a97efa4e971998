"""The embedded runner deletes only what it created, and never reports another run's result as its own.

Two families (issue #11, item 4):

* data loss — a run folder outside the work directory, ``--fresh`` or a spec edit deleting a
  folder of the user's, a damaged input making the runner throw away the run's checkpoints;
* stale or borrowed results — a ``_SUCCESS`` left by an edited spec or another run sharing the
  output, accepted as this run's success.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from tests.local.conftest import Pipeline, data_pipeline, pretrain_run

from crucible.local.runner import RunnerError
from crucible.local.workdir import OWNER_FILE, NotOwnedError, WorkDir, claim, remove_owned
from waits import scaled


def user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "thesis.tex").write_text("years of work\n")
    return path


# ---------------------------------------------------------------------------- data loss
@pytest.mark.parametrize("namespace", ["../../somewhere", "..", "a/b", "UPPER", "-x"])
def test_namespace_that_is_not_a_dns_label_is_refused_before_anything_is_written(
    pipeline: Pipeline, namespace: str
) -> None:
    from crucible.local.load import LoadError

    victim = user_folder(pipeline.root / "somewhere")
    resource = data_pipeline()
    resource["metadata"]["namespace"] = namespace
    pipeline.write([resource])
    with pytest.raises(LoadError, match=r"metadata\.namespace"):
        pipeline.run(fresh=True)
    assert (victim / "thesis.tex").exists()


@pytest.mark.parametrize("parts", [("..", "pretrainrun", "x"), ("default", "..", "x"), ("default", "k", "../..")])
def test_run_folder_never_leaves_the_work_directory(tmp_path: Path, parts: tuple[str, str, str]) -> None:
    with pytest.raises(NotOwnedError, match="outside the work directory"):
        WorkDir(tmp_path / "work").run_dir(*parts)


def test_remove_owned_refuses_a_folder_without_this_runs_marker(tmp_path: Path) -> None:
    folder = user_folder(tmp_path / "mine")
    with pytest.raises(NotOwnedError, match="does not delete it"):
        remove_owned(folder, "default/PretrainRun/x")
    with pytest.raises(NotOwnedError, match="did not write"):
        claim(folder, "default/PretrainRun/x")
    fresh = tmp_path / "new"
    claim(fresh, "default/PretrainRun/x")
    with pytest.raises(NotOwnedError, match="belongs to default/PretrainRun/x"):
        claim(fresh, "default/PretrainRun/y")
    with pytest.raises(NotOwnedError):
        remove_owned(fresh, "default/PretrainRun/y")
    assert remove_owned(fresh, "default/PretrainRun/x") and not fresh.exists()
    assert (folder / "thesis.tex").exists()


def test_fresh_keeps_a_run_folder_holding_files_crucible_did_not_write(pipeline: Pipeline) -> None:
    pipeline.write([data_pipeline()])
    pipeline.run()
    run_dir = pipeline.run_dir("DataPipeline", "corpus")
    assert json.loads((run_dir / OWNER_FILE).read_text())["run"] == "default/DataPipeline/corpus"
    (run_dir / OWNER_FILE).unlink()
    (run_dir / "notes.txt").write_text("mine\n")
    with pytest.raises(RunnerError, match="does not delete it"):
        pipeline.run(fresh=True)
    assert (run_dir / "notes.txt").exists() and (run_dir / "output" / "_SUCCESS").exists()


def test_explicit_output_into_an_existing_user_folder_is_refused_and_left_alone(pipeline: Pipeline) -> None:
    victim = user_folder(pipeline.root / "results")
    resource = data_pipeline()
    resource["spec"]["output"] = {"uri": str(victim)}
    pipeline.write([resource])
    with pytest.raises(RunnerError, match="did not write"):
        pipeline.run()
    with pytest.raises(RunnerError, match="does not delete it"):
        pipeline.run(fresh=True)
    assert sorted(p.name for p in victim.iterdir()) == ["thesis.tex"]


def test_spec_edit_replaces_an_explicit_output_crucible_created(pipeline: Pipeline) -> None:
    out_dir = pipeline.root / "model-out"
    base = pretrain_run()
    base["spec"]["output"] = {"uri": str(out_dir)}
    pipeline.write([data_pipeline(), base])
    pipeline.run()
    first = json.loads((out_dir / "_SUCCESS").read_text())
    base["spec"]["model"]["hiddenSize"] = 64
    pipeline.write([data_pipeline(), base])
    out = pipeline.run()
    assert not out["base"].skipped
    second = json.loads((out_dir / "_SUCCESS").read_text())
    assert second["specHash"] != first["specHash"]
    assert json.loads((out_dir / OWNER_FILE).read_text())["run"] == "default/PretrainRun/base"


def shard_input(root: Path) -> Path:
    """A token split whose index.json lists two shards (what a DataPipeline leaves)."""
    split = root / "shards" / "train"
    split.mkdir(parents=True)
    entries = []
    for i in range(2):
        data = bytes([i]) * 64
        (split / f"shard-{i:05d}.bin").write_bytes(data)
        (split / f"shard-{i:05d}.idx").write_bytes(b"idx")
        entries.append({"name": f"shard-{i:05d}", "tokens": 32, "documents": 1,
                        "sha256": hashlib.sha256(data).hexdigest()})
    (split / "index.json").write_text(json.dumps({"format": "crucible-tokens", "shards": entries}))
    return split


@pytest.mark.parametrize("damage", ["deleted", "torn"])
def test_damaged_shard_input_keeps_the_runs_checkpoints(pipeline: Pipeline, damage: str) -> None:
    split = shard_input(pipeline.workdir)
    base = pretrain_run()
    base["spec"]["data"] = {"uri": "shards"}
    pipeline.write([base])
    pipeline.run()
    checkpoints = pipeline.run_dir("PretrainRun", "base") / "checkpoints"
    before = sorted(p.name for p in checkpoints.iterdir())
    shard = split / "shard-00001.bin"
    if damage == "deleted":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:10])
    with pytest.raises(RunnerError) as err:
        pipeline.run()
    assert "spec.data.uri" in str(err.value) and "shard-00001.bin" in str(err.value)
    assert "nothing of this run was deleted" in str(err.value)
    assert sorted(p.name for p in checkpoints.iterdir()) == before


# ------------------------------------------------------------------ stale or borrowed results
def test_a_success_of_another_spec_in_the_run_folder_is_not_taken_as_this_runs(pipeline: Pipeline) -> None:
    pipeline.write([data_pipeline()])
    pipeline.run()
    success = pipeline.run_dir("DataPipeline", "corpus") / "output" / "_SUCCESS"
    receipt = json.loads(success.read_text())
    success.write_text(json.dumps({**receipt, "specHash": "0" * 64}))
    out = pipeline.run()
    assert not out["corpus"].skipped
    assert json.loads(success.read_text())["specHash"] == receipt["specHash"]


def test_a_success_without_spec_hash_is_not_trusted(pipeline: Pipeline) -> None:
    pipeline.write([data_pipeline()])
    pipeline.run()
    success = pipeline.run_dir("DataPipeline", "corpus") / "output" / "_SUCCESS"
    success.write_text(json.dumps({"stage": "data", "results": {"borrowed": True}}))
    out = pipeline.run()
    assert not out["corpus"].skipped and "borrowed" not in out["corpus"].results


def test_second_run_sharing_an_output_is_refused_not_reported_succeeded(pipeline: Pipeline) -> None:
    shared = pipeline.root / "shared-out"
    first, second = data_pipeline("first"), data_pipeline("second")
    for r in (first, second):
        r["spec"]["output"] = {"uri": str(shared)}
    pipeline.write([first], "first.yaml")
    pipeline.run()
    (pipeline.folder / "first.yaml").unlink()
    pipeline.write([second], "second.yaml")
    with pytest.raises(RunnerError, match="belongs to default/DataPipeline/first"):
        pipeline.run()


def test_trainer_refuses_a_success_written_for_another_spec(tmp_path: Path) -> None:
    """The stage's own skip check (what pods run): exit 2 naming the file, not exit 0."""
    import os
    import subprocess
    import sys

    out = tmp_path / "out"
    out.mkdir()
    (out / "_SUCCESS").write_text(json.dumps({"stage": "data", "specHash": "f" * 64, "results": {}}))
    (tmp_path / "docs.jsonl").write_text('{"text": "hello world"}\n')
    spec = {"sources": [{"name": "docs", "uri": str(tmp_path / "docs.jsonl")}], "tokenizer": {"vocabSize": 300},
            "output": {"uri": str(out)}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-m", "crucible.trainer", "data", "--spec", str(tmp_path / "spec.json")],
                          capture_output=True, text=True, env={**os.environ, "CRUCIBLE_KIND": "DataPipeline",
                                                              "CRUCIBLE_RUN": "corpus"}, timeout=scaled(300))
    assert proc.returncode == 2, proc.stderr
    assert f"{out}/_SUCCESS is not this run's result" in proc.stderr
    assert "different spec" in proc.stderr
