"""Our DPO loss and TRL's DPOTrainer on the same tiny batch agree to 1e-5 (TRL is a test-only dependency)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from crucible.trainer.config.stages import PreferenceDataset
from crucible.trainer.preference import dpo_loss, sequence_logps
from crucible.trainer.preference_data import PreferencePairs, tokenize_pair

RECORDS = {
    "prompt": ["the quick", "one two three", "cat"],
    "chosen": [" brown fox", " four", " dog bird fish"],
    "rejected": [" lazy dog jumps", " ten nine", " apple"],
}


@pytest.fixture(scope="module")
def models(tiny_model_dir: Path):
    torch.manual_seed(1)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():  # a policy that differs from its reference, so the log-ratios are not 0
        for param in policy.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    return policy, reference, AutoTokenizer.from_pretrained(tiny_model_dir)


def _trl_loss_and_batch(policy, reference, tokenizer, tmp_path: Path, loss_type: str, beta: float):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=3, report_to=[], beta=beta,
        loss_type=[loss_type], use_cpu=True, bf16=False, max_length=64,
    )
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_dict(RECORDS),
                         processing_class=tokenizer)
    trainer.model.eval()  # no dropout; TRL and we then see identical logits
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    return float(loss), batch


@pytest.mark.parametrize(("loss_type", "beta"), [("sigmoid", 0.1), ("sigmoid", 2.0), ("ipo", 0.5), ("hinge", 0.3)])
def test_dpo_loss_matches_trl(models, tmp_path: Path, loss_type: str, beta: float) -> None:
    policy, reference, tokenizer = models
    trl_loss, batch = _trl_loss_and_batch(policy, reference, tokenizer, tmp_path, loss_type, beta)
    policy.eval()
    with torch.no_grad():
        logps, counts = sequence_logps(policy, batch)
        ref_logps, _ = sequence_logps(reference, batch)
    chosen, rejected = logps.chunk(2)
    ref_chosen, ref_rejected = ref_logps.chunk(2)
    chosen_tokens, rejected_tokens = counts.chunk(2)
    ours = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta, loss_type=loss_type,  # type: ignore[arg-type]
                    chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens).losses.mean()
    assert abs(float(ours) - trl_loss) < 1e-5, (float(ours), trl_loss)
    assert trl_loss > 0


def test_our_tokenization_builds_trls_sequences(models, tmp_path: Path) -> None:
    """Same records → the same token rows and completion masks as TRL's collator."""
    policy, reference, tokenizer = models
    _, batch = _trl_loss_and_batch(policy, reference, tokenizer, tmp_path, "sigmoid", 0.1)
    spec = PreferenceDataset(uri="unused")
    pairs = []
    for i in range(3):
        record = {k: v[i] for k, v in RECORDS.items()}
        pair, status = tokenize_pair(record, f"r:{i}", spec, tokenizer, 64)
        assert status == "ok" and pair is not None
        pairs.append(pair)
    ours = PreferencePairs(pairs, tokenizer.pad_token_id).fetch([0, 1, 2])

    def rows(b: dict) -> set[tuple]:  # TRL's sampler shuffles the pairs: compare the pairs as a set
        out = set()
        half = b["input_ids"].shape[0] // 2
        for i in range(half):
            keep = [i, i + half]
            ids, att, comp = (b[k][keep] for k in ("input_ids", "attention_mask", "completion_mask"))
            width = int(att.sum(-1).max())
            out.add((tuple(ids[:, :width].flatten().tolist()), tuple(att[:, :width].flatten().tolist()),
                     tuple(comp[:, :width].flatten().tolist())))
        return out

    assert rows(ours) == rows(batch)


def test_label_smoothing_is_conservative_dpo() -> None:
    delta = torch.tensor([0.7, -1.2])
    zeros = torch.zeros(2)
    terms = dpo_loss(delta, zeros, zeros, zeros, beta=0.5, label_smoothing=0.2)
    expected = -0.8 * torch.nn.functional.logsigmoid(0.5 * delta) - 0.2 * torch.nn.functional.logsigmoid(-0.5 * delta)
    torch.testing.assert_close(terms.losses, expected)
    torch.testing.assert_close(terms.chosen_rewards, 0.5 * delta)
    assert terms.metrics()["preferenceAccuracy"] == 0.5


def test_ipo_needs_token_counts() -> None:
    with pytest.raises(ValueError, match="token counts"):
        dpo_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=0.1, loss_type="ipo")
