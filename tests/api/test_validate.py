"""`crucible validate`: every example passes; each kind of mistake gets its own precise message."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from crucible.api.validate import load_resources
from crucible.cli import main

BASE = """\
apiVersion: crucible.dev/v1alpha1
kind: PretrainRun
metadata: {name: p}
spec:
  data: {uri: /data}
  training: {maxSteps: 10}
"""


def with_spec(extra: str) -> str:
    return BASE + textwrap.indent(textwrap.dedent(extra), "  ")


CYCLE = """\
apiVersion: crucible.dev/v1alpha1
kind: FinetuneRun
metadata: {name: a}
spec:
  model: {fromRun: {kind: PreferenceRun, name: b}}
  dataset: {uri: /d.jsonl}
  training: {maxSteps: 10}
---
apiVersion: crucible.dev/v1alpha1
kind: PreferenceRun
metadata: {name: b}
spec:
  model: {fromRun: {kind: FinetuneRun, name: a}}
  dataset: {uri: /p.jsonl}
  training: {maxSteps: 10}
"""

FOLLOW_A_RUN_WITHOUT_REVISIONS = """\
apiVersion: crucible.dev/v1alpha1
kind: FinetuneRun
metadata: {name: chat}
spec:
  model: {fromRun: {kind: PretrainRun, name: p}}
  dataset: {uri: /d.jsonl}
  training: {maxSteps: 10}
  revisions: {follow: model}
---
""" + BASE

# (case id, YAML text, expected dotted field, expected fragment of the message)
BAD_INPUTS = [
    ("unparsable-yaml", "a: [1,\n b: 2\n", "", "not valid YAML"),
    ("wrong-api-version", BASE.replace("v1alpha1", "v1"), "apiVersion", "must be crucible.dev/v1alpha1"),
    ("unknown-kind", BASE.replace("PretrainRun", "PretrainJob"), "kind", "did you mean PretrainRun"),
    ("unknown-field", with_spec("trainng: {}"), "spec.trainng", "did you mean training"),
    ("wrong-type", BASE.replace("maxSteps: 10", "maxSteps: ten"), "spec.training.maxSteps", "valid integer"),
    ("zero-nodes", with_spec("resources: {nodes: 0}"), "spec.resources.nodes", "must be >= 1, got 0"),
    ("negative-nodes", with_spec("resources: {nodes: -2}"), "spec.resources.nodes", "must be >= 1, got -2"),
    ("gpus-without-pool", with_spec("resources: {nodes: 2, gpusPerNode: 8}"), "spec.resources.nodePool", "required when gpusPerNode > 0"),
    ("impossible-fromrun-kind", BASE.replace("{uri: /data}", "{fromRun: {kind: QuantizeJob, name: q}}"),
     "spec.data.fromRun.kind", "cannot read the output of a QuantizeJob"),
    ("fromrun-unknown-kind", BASE.replace("{uri: /data}", "{fromRun: {kind: Dataset, name: q}}"),
     "spec.data.fromRun.kind", "Input should be"),
    ("missing-required", BASE.replace("  training: {maxSteps: 10}\n", ""), "spec.training", "required field is missing"),
    ("missing-name", BASE.replace("metadata: {name: p}", "metadata: {labels: {a: b}}"), "metadata.name", "required"),
    ("both-uri-and-fromrun", BASE.replace("{uri: /data}", "{uri: /data, fromRun: {kind: DataPipeline, name: d}}"),
     "spec.data", "exactly one of fromRun or uri"),
    ("inline-credentials", with_spec("storage: {s3: {accessKeyId: AKIA, secretAccessKey: x}}"), "spec.storage.s3", "inline credentials"),
    ("kueue-without-queue", with_spec("scheduling: {gang: kueue}"), "spec.scheduling.queue", "Kueue LocalQueue"),
    ("unknown-gang", with_spec("scheduling: {gang: slurm}"), "spec.scheduling.gang", "'slurm'"),
    ("zero-checkpoint-interval", with_spec("checkpoint: {interval: 0}"), "spec.checkpoint.interval", "positive number of steps or auto"),
    ("bad-duration", with_spec("failurePolicy: {hangTimeout: soon}"), "spec.failurePolicy.hangTimeout", "not a duration"),
    ("heads-do-not-divide", with_spec("model: {hiddenSize: 100, numHeads: 3}"), "spec.model.hiddenSize", "divisible by numHeads"),
    ("bad-name", BASE.replace("name: p", "name: Bad_Name"), "metadata.name", "DNS label"),
    ("no-length", BASE.replace("{maxSteps: 10}", "{seqLen: 64}"), "spec.training.maxSteps", "set maxSteps or maxTokens"),
    ("batch-smaller-than-sequence", BASE.replace("{maxSteps: 10}", "{maxSteps: 10, seqLen: 4096, globalBatchTokens: 1024}"),
     "spec.training.globalBatchTokens", "at least one sequence"),
    ("not-a-mapping", "- just\n- a list\n", "", "expected a mapping"),
    ("fromrun-cycle", CYCLE, "spec", "cycle: FinetuneRun/a -> PreferenceRun/b -> FinetuneRun/a"),
    ("follow-a-run-without-revisions", FOLLOW_A_RUN_WITHOUT_REVISIONS, "spec.revisions.follow",
     "PretrainRun/p (model.fromRun), which declares no spec.revisions"),
    ("duplicate-name", BASE + "---\n" + BASE, "metadata.name", "duplicate PretrainRun named 'p'"),
    ("qlora-on-cpu", BASE.replace("PretrainRun", "FinetuneRun").replace("data: {uri: /data}", "model: {uri: /m}\n  dataset: {uri: /d.jsonl}\n  method: qlora"),
     "spec.method", "qlora needs CUDA"),
    ("gptq-on-cpu", "apiVersion: crucible.dev/v1alpha1\nkind: QuantizeJob\nmetadata: {name: q}\nspec:\n  model: {uri: /m}\n  method: gptq\n",
     "spec.method", "gptq needs CUDA"),
    ("negative-lr", with_spec("optimizer: {lr: -1}"), "spec.optimizer.lr", "must be > 0.0, got -1"),
    ("duplicate-sources", "apiVersion: crucible.dev/v1alpha1\nkind: DataPipeline\nmetadata: {name: d}\nspec:\n  sources:\n"
     "    - {name: a, uri: /x}\n    - {name: a, uri: /y}\n", "spec.sources", "names must be unique"),
]


@pytest.mark.parametrize(("case", "text", "field", "fragment"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gets_its_own_message(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, text: str,
                                        field: str, fragment: str) -> None:
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    assert main(["validate", str(path)]) == 2
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    lines = [line for line in out.out.splitlines() if line.strip()]
    assert lines, "no problem reported"
    wanted = f" {field}: " if field else ": "
    matching = [line for line in lines if str(path) in line and wanted in line and fragment in line]
    assert matching, f"expected a line with {wanted!r} and {fragment!r}, got:\n" + "\n".join(lines)


def test_bad_inputs_are_distinct() -> None:
    assert len({(f, m) for _, _, f, m in BAD_INPUTS}) == len(BAD_INPUTS)
    assert len(BAD_INPUTS) >= 20


def test_examples_are_valid(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(repo / "examples")]) == 0
    assert "resource(s) valid" in capsys.readouterr().out


def test_examples_cover_every_kind(repo: Path) -> None:
    result = load_resources([repo / "examples"])
    kinds = {item.resource.kind for item in result.resources}
    assert kinds == {"DataPipeline", "PretrainRun", "FinetuneRun", "PreferenceRun", "QuantizeJob"}
    pretrain = next(i.resource for i in result.resources if i.resource.name == "llama-1b")
    assert pretrain.spec.resources.nodes == 2 and pretrain.spec.resources.gpus_per_node == 8
    assert pretrain.spec.scheduling.gang == "kueue"
    assert pretrain.spec.checkpoint.uri and pretrain.spec.checkpoint.uri.startswith("s3://")


def test_line_numbers_point_at_the_field(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(with_spec("resources:\n  nodes: 0\n"))
    result = load_resources([path])
    (problem,) = result.problems
    assert problem.line == 8 and problem.field == "spec.resources.nodes"


def test_missing_path_and_empty_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["validate", str(tmp_path / "nope.yaml"), str(tmp_path / "empty")]) == 2
    out = capsys.readouterr().out
    assert "no such file or folder" in out and "holds no .yaml" in out


def test_reference_outside_the_files_is_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(BASE.replace("{uri: /data}", "{fromRun: {kind: DataPipeline, name: elsewhere}}"))
    assert main(["validate", str(path)]) == 0
    assert "DataPipeline/elsewhere is not among these files" in capsys.readouterr().err


def test_cycle_across_files_and_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first, second = CYCLE.split("---\n")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "sft.yaml").write_text(first)
    (tmp_path / "dpo.yml").write_text(second)
    assert main(["validate", str(tmp_path)]) == 2
    out = capsys.readouterr().out
    assert "cycle: FinetuneRun/a -> PreferenceRun/b -> FinetuneRun/a" in out
    assert str(tmp_path / "a" / "sft.yaml") in out


def test_not_utf8_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(BASE.replace("name: p", "name: p # caf\xe9").encode("latin-1"))
    assert main(["validate", str(path)]) == 2
    assert "not UTF-8 text" in capsys.readouterr().out
