"""Layouts without processes: rank order of the rendered Job, layer cuts, and the Mixtral export of a MoE model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from crucible.trainer.config.training import ModelConfig
from crucible.trainer.parallel.llama import split_layers
from crucible.trainer.parallel.mesh import Layout

REPO = Path(__file__).resolve().parents[2]


def test_rendered_job_keeps_tensor_groups_inside_a_node_and_pipeline_stages_across_nodes() -> None:
    from crucible.api.validate import load_or_raise
    from crucible.core.plan import plan
    from crucible.operator.render import render

    (loaded,) = load_or_raise([REPO / "examples" / "pretrainrun-70b.yaml"])
    resource = loaded.resource
    job = render(resource, plan(resource, storage_root="s3://r", inputs={"data": "s3://r/web-corpus"})).jobs[0]
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    # torchrun numbers ranks node by node: rank = node index × 8 + local rank
    assert command[:4] == ["torchrun", "--nnodes=16", "--nproc-per-node=8", "--node-rank=$(JOB_COMPLETION_INDEX)"]
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 16
    par = resource.spec.training.parallelism
    layout = Layout(*par.resolve(128))
    assert layout == Layout(1, 8, 2, 8)
    node = {rank: rank // 8 for rank in range(128)}
    groups: dict[tuple[int, ...], list[int]] = {}
    stages: dict[tuple[int, ...], list[int]] = {}
    for rank in range(128):
        c = layout.coordinates(rank)
        groups.setdefault((c["dp_replicate"], c["dp_shard"], c["pp"]), []).append(rank)
        stages.setdefault((c["dp_replicate"], c["dp_shard"], c["tp"]), []).append(rank)
    assert all(len({node[r] for r in ranks}) == 1 for ranks in groups.values())  # TP: one node, NVLink
    assert all(len({node[r] for r in ranks}) == 2 for ranks in stages.values())  # PP: next node
    assert sorted(layout.data_rank(r) for r in range(0, 128, 16)) == list(range(8))


def test_layers_are_cut_evenly() -> None:
    assert split_layers(80, 2) == [list(range(40)), list(range(40, 80))]
    assert [len(c) for c in split_layers(10, 4)] == [3, 3, 2, 2]


@pytest.mark.parametrize("every", [1, 2], ids=["all-moe", "interleaved"])
def test_moe_exports_as_mixtral_with_equal_logits(tmp_path: Path, every: int) -> None:
    from transformers import AutoModelForCausalLM, MixtralForCausalLM

    from crucible.trainer.model import build_model
    from crucible.trainer.moe import MoEBlock, from_mixtral
    from crucible.trainer.output import save_hf_model

    cfg = ModelConfig.model_validate({
        "architecture": "mixtral", "hiddenSize": 32, "numLayers": 2, "numHeads": 4, "numKvHeads": 2,
        "intermediateSize": 64, "moe": {"numExperts": 4, "topK": 2, "everyNLayers": every, "capacityFactor": 1.0},
    })
    model = build_model(cfg, 96, seed=3).eval()
    save_hf_model(model, model.state_dict(), tmp_path, None)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert isinstance(loaded, MixtralForCausalLM)
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-5
    back = from_mixtral(loaded, None).eval()  # and back, dense blocks dense again
    assert [isinstance(layer.mlp, MoEBlock) for layer in back.model.layers] == [
        isinstance(layer.mlp, MoEBlock) for layer in model.model.layers]
    with torch.no_grad():
        assert (back(input_ids=ids).logits - ours).abs().max().item() <= 1e-5


def test_capacity_drops_and_counts_in_training_only() -> None:
    from crucible.trainer.config.training import MoEConfig
    from crucible.trainer.moe import MoEBlock, summarize_stats, take_stats

    block = MoEBlock(16, 32, MoEConfig(numExperts=4, topK=1, capacityFactor=0.5))
    block.init_weights(0.5)
    x = torch.randn(1, 64, 16, requires_grad=True)
    block.train()
    block(x).sum().backward()
    stats = summarize_stats(take_stats(block, 4, torch.device("cpu")).tolist(), 4)
    assert stats["moeDroppedTokens"] >= 64 - 4 * 8  # capacity 0.5 × 64 / 4 = 8 per expert
    assert max(stats["moeExpertShare"]) <= 0.25 + 1e-9
    assert block.gate.weight.grad is not None and block.gate.weight.grad.abs().sum() > 0  # aux loss reaches the router
    block.eval()
    with torch.no_grad():
        block(x)  # inference never drops, and counts nothing
    assert take_stats(block, 4, torch.device("cpu")).sum() == 0


def _train_block(aux_loss_coef: float, steps: int = 60) -> list[float]:
    """A lone MoE block fitted to a target, its router skewed to expert 0 at the start."""
    from crucible.trainer.config.training import MoEConfig
    from crucible.trainer.moe import MoEBlock, summarize_stats, take_stats

    torch.manual_seed(0)
    block = MoEBlock(16, 32, MoEConfig(numExperts=4, topK=1, auxLossCoef=aux_loss_coef))
    block.init_weights(0.2)
    with torch.no_grad():
        block.gate.weight[0] += 0.5 * torch.randn(16).abs()
    x, target = torch.randn(1, 256, 16).abs(), 0.1 * torch.randn(1, 256, 16)
    optimizer = torch.optim.AdamW(block.parameters(), lr=3e-3)
    imbalance = []
    for _ in range(steps):
        ((block(x) - target) ** 2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        imbalance.append(summarize_stats(take_stats(block, 4, torch.device("cpu")).tolist(), 4)["moeImbalance"])
    return imbalance


def test_aux_loss_lowers_routing_imbalance_over_training() -> None:
    without, with_aux = _train_block(0.0), _train_block(0.1)
    assert without[0] == with_aux[0] == 4.0  # every token on expert 0 at the start
    assert min(without[-10:]) > 3.5  # the task alone keeps the skew
    assert max(with_aux[-10:]) < 2.0  # the load-balancing loss spreads the tokens
