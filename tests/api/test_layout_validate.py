"""`crucible validate` rejects layouts that cannot run, naming the field; `plan` sizes the 70B example."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from crucible.cli import main


def pretrain(training: str, model: str = "{numHeads: 8, numKvHeads: 4, hiddenSize: 64, numLayers: 4}",
             resources: str = "{nodes: 2, gpusPerNode: 4, nodePool: gpu}") -> str:
    return textwrap.dedent(f"""\
        apiVersion: crucible.dev/v1alpha1
        kind: PretrainRun
        metadata: {{name: p}}
        spec:
          data: {{uri: /data}}
          model: {model}
          resources: {resources}
          training: {{maxSteps: 10, strategy: fsdp, seqLen: 64, parallelism: {training}}}
        """)


BAD_LAYOUTS = [
    ("tensor-vs-heads", pretrain("{tensor: 4}", model="{numHeads: 2, hiddenSize: 64}", resources="{nodes: 1, gpusPerNode: 4, nodePool: g}"),
     "spec.training.parallelism.tensor", "must divide model.numHeads (2)"),
    ("tensor-vs-kv-heads", pretrain("{tensor: 4}", model="{numHeads: 8, numKvHeads: 2, hiddenSize: 64}"),
     "spec.training.parallelism.tensor", "must divide model.numKvHeads (2)"),
    ("tensor-across-nodes", pretrain("{tensor: 8}", model="{numHeads: 8, hiddenSize: 64, numLayers: 4}"), "spec.training.parallelism.tensor",
     "must divide the 4 processes per node"),
    ("pipeline-vs-layers", pretrain("{pipeline: 8}"), "spec.training.parallelism.pipeline", "numLayers 4"),
    ("product-vs-world", pretrain("{tensor: 2, pipeline: 2, dataShard: 3}"), "spec.training.parallelism",
     "= 12, but the world has 8 ranks"),
    ("rest-does-not-divide", pretrain("{tensor: 2, pipeline: 2, dataReplicate: 3}"), "spec.training.parallelism",
     "does not divide the 8 ranks"),
    ("needs-fsdp", pretrain("{tensor: 2}").replace("strategy: fsdp", "strategy: ddp"), "spec.training.parallelism",
     "set strategy: fsdp"),
    ("tied-pipeline", pretrain("{pipeline: 2}", model="{numHeads: 8, hiddenSize: 64, numLayers: 4, tieWordEmbeddings: true}"),
     "spec.training.parallelism.pipeline", "tied embeddings"),
    ("moe-tensor", pretrain("{tensor: 2}", model="{numHeads: 8, hiddenSize: 64, architecture: mixtral}"),
     "spec.training.parallelism.tensor", "not tensor-parallel"),
    ("moe-without-mixtral", pretrain("{pipeline: 2}", model="{numHeads: 8, hiddenSize: 64, moe: {numExperts: 4}}"),
     "spec.model.moe", "set architecture: mixtral"),
    ("moe-topk", pretrain("{pipeline: 2}", model="{architecture: mixtral, moe: {numExperts: 4, topK: 5}}"),
     "spec.model.moe.topK", "exceeds numExperts"),
    ("moe-width", pretrain("{pipeline: 2}", model="{architecture: mixtral, intermediateSize: 128, moe: {everyNLayers: 2, expertIntermediateSize: 64}}"),
     "spec.model.moe.expertIntermediateSize", "must equal the dense MLP width (128)"),
    ("expert-vs-experts", pretrain("{expert: 3}", model="{architecture: mixtral, moe: {numExperts: 8}}",
                                   resources="{nodes: 1, gpusPerNode: 6, nodePool: g}"),
     "spec.training.parallelism.expert", "must divide model.moe.numExperts (8)"),
    ("expert-vs-shard", pretrain("{expert: 4, dataShard: 2, pipeline: 4}", model="{architecture: mixtral, moe: {numExperts: 8}}"),
     "spec.training.parallelism.expert", "must divide dataShard (2)"),
    ("expert-dense", pretrain("{expert: 2}"), "spec.training.parallelism.expert", "set model.architecture: mixtral"),
    ("expert-tensor", pretrain("{expert: 2, tensor: 2}", model="{numHeads: 8, hiddenSize: 64, architecture: mixtral}"),
     "spec.training.parallelism.tensor", "not tensor-parallel"),
]


@pytest.mark.parametrize(("case", "text", "field", "fragment"), BAD_LAYOUTS, ids=[c[0] for c in BAD_LAYOUTS])
def test_bad_layout_is_rejected_naming_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str,
                                                 text: str, field: str, fragment: str) -> None:
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    assert main(["validate", str(path)]) != 0
    out = capsys.readouterr()
    lines = (out.out + out.err).splitlines()
    assert any(f" {field}: " in line and fragment in line for line in lines), "\n".join(lines)


def test_a_good_layout_validates(tmp_path: Path) -> None:
    path = tmp_path / "good.yaml"
    path.write_text(pretrain("{tensor: 4, pipeline: 2}"))
    assert main(["validate", str(path)]) == 0
    moe = tmp_path / "expert.yaml"  # EP 4 inside dataShard 4, beside pipeline 2
    moe.write_text(pretrain("{expert: 4, pipeline: 2}", model="{architecture: mixtral, moe: {numExperts: 8}}"))
    assert main(["validate", str(moe)]) == 0


def test_plan_of_the_70b_example(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    assert main(["plan", str(repo / "examples" / "pretrainrun-70b.yaml"), "--json"]) == 0
    (plan,) = json.loads(capsys.readouterr().out)
    assert 68e9 < plan["parameters"] < 70e9 and plan["gpus"] == 128
    assert plan["layout"] == "dataReplicate 1 × dataShard 8 × pipeline 2 × tensor 8"
    assert 10 < plan["layout_memory_gib"] < 0.85 * 80  # fits an H100 with headroom
    assert plan["suggested_layout"] and plan["suggested_memory_gib"] < 0.85 * 80


def test_plan_counts_active_experts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    path = tmp_path / "moe.yaml"
    path.write_text(pretrain("{pipeline: 2}", model="{architecture: mixtral, hiddenSize: 256, numHeads: 4, "
                                                    "numLayers: 4, vocabSize: 1000, moe: {numExperts: 8, topK: 2}}"))
    assert main(["plan", str(path), "--json"]) == 0
    (plan,) = json.loads(capsys.readouterr().out)
    d, ff, vocab = 256, 704, 1000
    attention, expert = 4 * d * d, 3 * d * ff
    per_layer_total = attention + 2 * d + 8 * d + 8 * expert
    per_layer_active = attention + 2 * d + 8 * d + 2 * expert
    assert plan["parameters"] == 4 * per_layer_total + d + 2 * vocab * d
    assert plan["active_parameters"] == 4 * per_layer_active + d + 2 * vocab * d
    per_token = 6 * (4 * per_layer_active + d + vocab * d) + 12 * 4 * d * 64
    assert plan["flops"] == pytest.approx(per_token * plan["tokens"])
