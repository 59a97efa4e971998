"""What `crucible validate` used to accept although the run would fail late, hang, or do harm (issue #11).

Families: YAML that is valid but hostile (anchor bombs, duplicate keys, huge or empty files);
credentials in plain text; documents that raised a traceback; specs that only the trainer (or
the API server's CEL) caught; outputs that collide with inputs or with each other. Every case
exits 2 with the file, the dotted field and what to do — the same exit status as `crucible run`.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from crucible.api import yamlsafe
from crucible.api.validate import load_resources
from crucible.cli import main
from waits import scaled

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


def bomb(levels: int = 9, width: int = 9) -> str:
    lines = ["apiVersion: crucible.dev/v1alpha1", "kind: PretrainRun", "metadata:", "  name: p", "  labels:",
             "    l0: &a0 lol"]
    for i in range(1, levels + 1):
        lines.append(f"    l{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    lines += ["spec:", "  data: {uri: /data}", "  training: {maxSteps: 10}"]
    return "\n".join(lines) + "\n"


DNS = "must be a DNS label starting with a letter"
# (case id, YAML text, expected dotted field, expected fragment of the message)
CASES = [
    # hostile YAML
    ("anchor-bomb", bomb(), "", "expands to more than"),
    ("many-aliases", BASE.replace("metadata: {name: p}", "metadata:\n  name: p\n  x: &x 1\n  y: [" + ", ".join(["*x"] * 150) + "]"),
     "", "more than 100 YAML aliases"),
    ("duplicate-key", BASE + "  training: {maxSteps: 20}\n", "", "duplicate key 'training' (first on line 6)"),
    ("duplicate-nested-key", BASE.replace("{maxSteps: 10}", "{maxSteps: 10, maxSteps: 20}"), "", "duplicate key 'maxSteps'"),
    ("empty-file", "", "", "holds no YAML documents"),
    ("only-comments", "# nothing here\n---\n", "", "holds no YAML documents"),
    # tracebacks before
    ("kind-is-a-list", BASE.replace("kind: PretrainRun", "kind: [PretrainRun]"), "kind", "must be a string"),
    ("kind-is-a-mapping", BASE.replace("kind: PretrainRun", "kind: {a: b}"), "kind", "must be a string"),
    ("env-name-with-equals", with_spec("resources: {env: {'A=B': x}}"), "spec.resources.env", "not a valid environment variable name"),
    ("seed-beyond-64-bits", BASE.replace("{maxSteps: 10}", "{maxSteps: 10, seed: 123456789012345678901234567890}"),
     "spec.training.seed", "does not fit in a 64-bit integer"),
    # secrets in plain text
    ("aws-secret-in-env", with_spec("resources: {env: {AWS_SECRET_ACCESS_KEY: abc}}"), "spec.resources.env", "put it in a Secret"),
    ("hf-token-in-env", with_spec("resources: {env: {HF_TOKEN: hf_abc}}"), "spec.resources.env", "secretEnv"),
    ("wandb-key-in-env", with_spec("resources: {env: {WANDB_API_KEY: k}}"), "spec.resources.env", "looks like a credential"),
    ("credentials-in-endpoint", with_spec("storage: {s3: {endpointUrl: 'https://minio:secret@minio:9000'}}"),
     "spec.storage.s3.endpointUrl", "carries credentials"),
    ("signed-endpoint", with_spec("storage: {s3: {endpointUrl: 'https://minio:9000/?X-Amz-Signature=abc'}}"),
     "spec.storage.s3.endpointUrl", "no query"),
    # only the trainer (or CEL) caught these
    ("seq-beyond-positions", BASE.replace("{maxSteps: 10}", "{maxSteps: 10, seqLen: 4096, globalBatchTokens: 32768}"),
     "spec.training.seqLen", "longer than the model supports"),
    ("micro-batch-above-global", BASE.replace("{maxSteps: 10}", "{maxSteps: 10, seqLen: 512, microBatchSize: 8, globalBatchTokens: 2048}"),
     "spec.training.globalBatchTokens", "must be a multiple of microBatchSize × seqLen"),
    ("micro-batch-not-dividing", BASE.replace("{maxSteps: 10}", "{maxSteps: 10, seqLen: 64, microBatchSize: 4, globalBatchTokens: 1000}"),
     "spec.training.globalBatchTokens", "use 1024"),
    ("multi-node-local-checkpoint", with_spec("resources: {nodes: 2}\ncheckpoint: {uri: /tmp/ckpt}").replace(
        "{maxSteps: 10}", "{maxSteps: 10, seqLen: 64, microBatchSize: 4, globalBatchTokens: 2048}"),
     "spec.checkpoint.uri", "needs storage every node sees"),
    ("max-new-tokens-past-positions", with_spec("model: {maxPositionEmbeddings: 128}\neval: {prompts: [hi], maxNewTokens: 4000}").replace(
        "{maxSteps: 10}", "{maxSteps: 10, seqLen: 64, globalBatchTokens: 512}"),
     "spec.eval.maxNewTokens", "leaves no room for the prompt"),
    ("infinite-rope-theta", with_spec("model: {ropeTheta: .inf}"), "spec.model.ropeTheta", "finite number"),
    ("nan-eps", with_spec("optimizer: {eps: .nan}"), "spec.optimizer.eps", "finite number"),
    ("infinite-grad-clip", with_spec("optimizer: {gradClip: .inf}"), "spec.optimizer.gradClip", "finite number"),
    ("absurd-max-steps", BASE.replace("maxSteps: 10", "maxSteps: 1.0e+30"), "spec.training.maxSteps", "64-bit integer"),
    ("absurd-hang-timeout", with_spec("failurePolicy: {hangTimeout: 100000000000000000000h}"),
     "spec.failurePolicy.hangTimeout", "not a duration"),
    ("hang-timeout-over-a-week", with_spec("failurePolicy: {hangTimeout: 9999h}"), "spec.failurePolicy.hangTimeout", "longer than a week"),
    ("name-starts-with-digit", BASE.replace("name: p", "name: 1p"), "metadata.name", DNS),
    ("fromrun-name-starts-with-digit", BASE.replace("{uri: /data}", "{fromRun: {kind: DataPipeline, name: 9d}}"),
     "spec.data.fromRun.name", DNS),
    ("image-with-shell", with_spec("resources: {image: 'evil; rm -rf /'}"), "spec.resources.image", "must match"),
    ("image-with-space", with_spec("resources: {image: 'ghcr.io/x/y:1 --privileged'}"), "spec.resources.image", "must match"),
    ("bad-node-selector-key", with_spec("resources: {nodeSelector: {'bad key!': x}}"), "spec.resources.nodeSelector", "not a valid label key"),
    ("bad-node-selector-value", with_spec("resources: {nodeSelector: {pool: 'a b'}}"), "spec.resources.nodeSelector", "not a valid label value"),
    ("bad-topology-key", with_spec("resources: {topology: {key: '/nope'}}"), "spec.resources.topology.key", "not a valid label key"),
    ("data-uri-root", BASE.replace("{uri: /data}", "{uri: /}"), "spec.data.uri", "root of a filesystem"),
    ("data-uri-bare-s3", BASE.replace("{uri: /data}", "{uri: 's3://'}"), "spec.data.uri", "names no bucket"),
    ("data-uri-file-scheme", BASE.replace("{uri: /data}", "{uri: 'file://'}"), "spec.data.uri", "file:// is not supported"),
    ("output-uri-root", with_spec("output: {uri: /}"), "spec.output.uri", "root of a filesystem"),
    ("checkpoint-uri-bare-s3", with_spec("checkpoint: {uri: 's3:///x'}"), "spec.checkpoint.uri", "names no bucket"),
    ("namespace-traversal", BASE.replace("metadata: {name: p}", "metadata: {name: p, namespace: ../../somewhere}"),
     "metadata.namespace", "DNS label"),
    # outputs colliding with inputs or with each other
    ("output-is-own-input", with_spec("output: {uri: /data}"), "spec.output.uri", "overlaps the run's own input spec.data.uri"),
    ("output-inside-own-input", with_spec("output: {uri: /data/model}"), "spec.output.uri", "overlaps the run's own input"),
    ("checkpoint-is-output", with_spec("output: {uri: /m}\ncheckpoint: {uri: /m/}"), "spec.checkpoint.uri", "keep checkpoints and the output apart"),
    ("two-runs-one-output", with_spec("output: {uri: /shared}\n") + "---\n" + with_spec("output: {uri: /shared}").replace("name: p", "name: q"),
     "spec.output.uri", "is also where PretrainRun/p writes"),
]


@pytest.mark.parametrize(("case", "text", "field", "fragment"), CASES, ids=[c[0] for c in CASES])
def test_validate_refuses_with_a_precise_message(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str,
                                                  text: str, field: str, fragment: str) -> None:
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    started = time.monotonic()
    assert main(["validate", str(path)]) == 2
    assert time.monotonic() - started < 30  # a bomb is refused, not expanded
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    wanted = f" {field}: " if field else ": "
    lines = [line for line in out.out.splitlines() if line.strip()]
    matching = [line for line in lines if str(path) in line and wanted in line and fragment in line]
    assert matching, f"expected a line with {wanted!r} and {fragment!r}, got:\n" + "\n".join(lines)


def test_cases_are_distinct() -> None:
    assert len({c[0] for c in CASES}) == len(CASES)


def test_batch_that_does_not_split_over_the_ranks_is_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(with_spec("resources: {nodes: 3}").replace(
        "{maxSteps: 10}", "{maxSteps: 10, seqLen: 64, microBatchSize: 4, globalBatchTokens: 1024}"))
    assert main(["validate", str(path)]) == 0
    assert "spec.training.globalBatchTokens: 1024 is not a multiple of microBatchSize × seqLen × ranks" in capsys.readouterr().err


def test_huge_file_is_refused_before_it_is_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "huge.yaml"
    with open(path, "w") as fh:
        fh.write(BASE)
        fh.write("# " + "x" * (yamlsafe.MAX_BYTES + 10) + "\n")
    assert main(["validate", str(path)]) == 2
    assert "Crucible reads YAML files up to" in capsys.readouterr().out


def test_secret_env_is_the_way_to_pass_credentials(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(with_spec("resources: {env: {TOKENIZERS_PARALLELISM: 'false'}, secretEnv: {HF_TOKEN: {secret: hf, key: token}}}"))
    result = load_resources([path])
    assert not result.problems, result.problems


def test_run_refuses_the_same_files_with_the_same_exit_status(tmp_path: Path) -> None:
    """`crucible run` and `crucible validate` agree: 2 for bad input, before anything runs."""
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb())
    for command in ("validate", "run"):
        proc = subprocess.run([sys.executable, "-m", "crucible.cli", command, str(path), *(["-w", str(tmp_path / "w")]
                               if command == "run" else [])], capture_output=True, text=True, timeout=scaled(120))
        assert proc.returncode == 2, (command, proc.stdout, proc.stderr)
        assert "expands to more than" in proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr


# Item 3 of issue #11: fields that were accepted and then ignored are now refused (or take effect).
QUANT = "apiVersion: crucible.dev/v1alpha1\nkind: QuantizeJob\nmetadata: {name: q}\nspec:\n  model: {uri: /m}\n"
DATA = ("apiVersion: crucible.dev/v1alpha1\nkind: DataPipeline\nmetadata: {name: d}\nspec:\n"
        "  sources: [{name: a, uri: /x}]\n")
PREF = ("apiVersion: crucible.dev/v1alpha1\nkind: PreferenceRun\nmetadata: {name: r}\nspec:\n  model: {uri: /m}\n"
        "  dataset: {uri: /p.jsonl}\n  training: {maxSteps: 10}\n  method: reward-model\n")
IGNORED = [
    ("quantize-metrics", QUANT + "  metrics: {port: 9400}\n", "spec.metrics", "serves no Prometheus metrics"),
    ("gptq-group-size", QUANT + "  method: gptq\n  groupSize: 64\n  resources: {gpusPerNode: 1, nodePool: g}\n",
     "spec.groupSize", "whose group size is 128"),
    ("quantize-rdma", QUANT + "  resources: {rdma: {}}\n", "spec.resources.rdma", "does not use RDMA"),
    ("quantize-topology", QUANT + "  resources: {topology: {}}\n", "spec.resources.topology", "nothing to place together"),
    ("data-nodes", DATA + "  resources: {nodes: 4}\n", "spec.resources.nodes", "set workers: 4"),
    ("data-gpus", DATA + "  resources: {gpusPerNode: 2, nodePool: g}\n", "spec.resources.gpusPerNode", "CPUs only"),
    ("data-rdma", DATA + "  resources: {rdma: {}}\n", "spec.resources.rdma", "does not use RDMA"),
    ("data-processes", DATA + "  resources: {processesPerNode: 4}\n", "spec.resources.processesPerNode", "spec.workers"),
    ("volcano-timeout", with_spec("scheduling: {gang: volcano, scheduleTimeoutSeconds: 60}"),
     "spec.scheduling.scheduleTimeoutSeconds", "only the coscheduling plugin"),
    ("queue-without-gang", with_spec("scheduling: {queue: team-a}"), "spec.scheduling.queue", "only Kueue and Volcano"),
    ("queue-with-coscheduling", with_spec("scheduling: {gang: coscheduling, queue: team-a}"), "spec.scheduling.queue",
     "gang is coscheduling"),
    ("shape-with-source", with_spec("model: {source: {uri: /base}, hiddenSize: 64}"), "spec.model.hiddenSize",
     "not used when source is set"),
    ("compile-under-deepspeed", BASE.replace("{maxSteps: 10}", "{maxSteps: 10, strategy: deepspeed, compile: true}"),
     "spec.training.compile", "not applied under strategy deepspeed"),
    ("async-save-under-deepspeed", with_spec("checkpoint: {asyncSave: true}").replace(
        "{maxSteps: 10}", "{maxSteps: 10, strategy: deepspeed}"), "spec.checkpoint.asyncSave", "synchronously"),
    ("reward-model-reference", PREF + "  reference: {uri: /ref}\n", "spec.reference", "no reference model"),
    ("reward-model-dpo", PREF + "  dpo: {beta: 0.5}\n", "spec.dpo", "does not use dpo settings"),
    ("reward-model-prompts", PREF + "  eval: {prompts: [hi]}\n", "spec.eval", "does not answer prompts"),
]


@pytest.mark.parametrize(("case", "text", "field", "fragment"), IGNORED, ids=[c[0] for c in IGNORED])
def test_ignored_field_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, text: str,
                                  field: str, fragment: str) -> None:
    test_validate_refuses_with_a_precise_message(tmp_path, capsys, case, text, field, fragment)


def test_data_pipeline_stage_column_is_written() -> None:
    """status.progress.stage (the DataPipeline Stage printer column) is set when a stage starts."""
    from crucible.api import KIND_MODELS
    from crucible.api.common import RunStatus
    from crucible.core import reconcile as rc

    doc = {"apiVersion": "crucible.dev/v1alpha1", "kind": "DataPipeline", "metadata": {"name": "d"},
           "spec": {"sources": [{"name": "a", "uri": "s3://b/x"}], "workers": 2}}
    run = KIND_MODELS["DataPipeline"].model_validate(doc)
    settings = rc.Settings(storage_root="s3://b/root")
    start = rc.reconcile(run, rc.Observed(RunStatus(), rc.AttemptObservation("absent")), 100.0, settings=settings)
    assert start.status.progress.stage == "filter"
    running = start.status.model_copy(update={"phase": "Running"})
    nxt = rc.reconcile(run, rc.Observed(running, rc.AttemptObservation("running", next_role="dedup")), 200.0,
                       settings=settings)
    assert nxt.status.progress.stage == "dedup"


ROUND_TRIP = [
    with_spec("model: {source: {uri: /base}}"),
    with_spec("scheduling: {gang: volcano, queue: q}").replace("{maxSteps: 10}", "{maxSteps: 10, strategy: deepspeed}"),
    with_spec("scheduling: {gang: coscheduling, scheduleTimeoutSeconds: 60}"),
    PREF,
    QUANT + "  method: gptq\n  resources: {gpusPerNode: 1, nodePool: g}\n",
    "apiVersion: crucible.dev/v1alpha1\nkind: FinetuneRun\nmetadata: {name: f}\nspec:\n  model: {uri: /m}\n"
    "  dataset: {uri: /d.jsonl}\n  training: {maxSteps: 10, seqLen: 64, microBatchSize: 4, globalBatchTokens: 256}\n"
    "  method: full\n",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_a_valid_spec_stays_valid_after_json(tmp_path: Path, text: str) -> None:
    """What the checks above refuse is judged by value: the spec the backends hand the trainer (every default
    written out) passes the trainer's parse, and the resource read back from JSON passes again."""
    from crucible.core.plan import plan
    from crucible.trainer.config.stages import KIND_TO_STAGE, parse_stage_spec

    path = tmp_path / "r.yaml"
    path.write_text(text)
    result = load_resources([path])
    assert not result.problems, result.problems
    resource = result.resources[0].resource
    type(resource).model_validate(resource.model_dump(mode="json", by_alias=True, exclude_none=True))
    launch = plan(resource, storage_root="/r", inputs={})
    parse_stage_spec(KIND_TO_STAGE[resource.kind], dict(launch.spec))
