from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from crucible.trainer.config.stages import SftDataset
from crucible.trainer.faults import SpecError
from crucible.trainer.sft_data import (
    DEFAULT_CHAT_TEMPLATE,
    IGNORE_INDEX,
    Conversation,
    SftBatches,
    build_sft_data,
    first_fit_decreasing,
    resolve_chat_template,
    save_seen,
    split_indices,
    tokenize_conversation,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _learned_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t, lab in zip(example.input_ids, example.labels, strict=True) if lab != IGNORE_INDEX])


def test_prompt_tokens_are_masked_and_response_plus_eos_learned(tokenizer) -> None:
    conv = Conversation([{"role": "user", "content": "one two"}, {"role": "assistant", "content": "three four"}], "x:1")
    example, truncated = tokenize_conversation(tokenizer, DEFAULT_CHAT_TEMPLATE, conv, 512)
    assert example is not None and not truncated
    assert _learned_text(tokenizer, example) == "three four<|endoftext|>"
    assert tokenizer.decode(example.input_ids) == "<|user|>\none two\n<|assistant|>\nthree four<|endoftext|>"
    # No prompt token is learned.
    first_learned = next(i for i, lab in enumerate(example.labels) if lab != IGNORE_INDEX)
    assert tokenizer.decode(example.input_ids[:first_learned]) == "<|user|>\none two\n<|assistant|>\n"


def test_multi_turn_learns_every_assistant_turn_only(tokenizer) -> None:
    conv = Conversation(
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": "two"},
            {"role": "user", "content": "three"},
            {"role": "assistant", "content": "four"},
        ],
        "x:1",
    )
    example, _ = tokenize_conversation(tokenizer, DEFAULT_CHAT_TEMPLATE, conv, 512)
    learned = _learned_text(tokenizer, example)
    assert "two" in learned and "four" in learned
    assert "one" not in learned and "three" not in learned and "brief" not in learned


def test_truncation_keeps_start_and_drops_examples_without_response(tokenizer) -> None:
    conv = Conversation([{"role": "user", "content": "one two three " * 20}, {"role": "assistant", "content": "yes"}], "x:1")
    example, truncated = tokenize_conversation(tokenizer, DEFAULT_CHAT_TEMPLATE, conv, 16)
    assert example is None and truncated


def test_template_precedence(tokenizer) -> None:
    assert resolve_chat_template("{{ x }}", tokenizer) == ("{{ x }}", "spec")
    assert resolve_chat_template(None, tokenizer) == (DEFAULT_CHAT_TEMPLATE, "default")


def test_non_prefix_stable_template_is_rejected(tokenizer) -> None:
    template = "{% for m in messages %}{{ m['content'] }}|{% endfor %}{{ messages | length }}"
    conv = Conversation([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "data.jsonl:3")
    with pytest.raises(SpecError, match=r"data.jsonl:3: the chat template is not prefix-stable"):
        tokenize_conversation(tokenizer, template, conv, 64)


def test_first_fit_decreasing_never_overflows_and_keeps_everything() -> None:
    lengths = [7, 3, 5, 2, 8, 1, 4, 6]
    bins = first_fit_decreasing(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(8))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 4  # 36 tokens need at least 4 rows of 10
    assert bins == first_fit_decreasing(lengths, 10)


def test_packed_examples_do_not_attend_to_each_other(tiny_model_dir: Path, tokenizer) -> None:
    """transformers 5.x derives a block-diagonal mask from reset position_ids (sdpa and eager)."""
    convs = [
        Conversation([{"role": "user", "content": p}, {"role": "assistant", "content": r}], f"x:{i}")
        for i, (p, r) in enumerate([("one two", "three"), ("the quick brown", "fox jumps"), ("cat", "dog bird")])
    ]
    examples = [tokenize_conversation(tokenizer, DEFAULT_CHAT_TEMPLATE, c, 128)[0] for c in convs]
    batches = SftBatches(examples, seq_len=128, packing=True, pad_id=tokenizer.pad_token_id)
    assert batches.num_items == 1
    batch = batches.fetch([0])
    assert "attention_mask" not in batch
    for implementation in ("sdpa", "eager"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=implementation)
        with torch.no_grad():
            packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
            cursor = 0
            for i in batches.rows[0]:
                ids = torch.tensor([examples[i].input_ids])
                alone = model(input_ids=ids, use_cache=False).logits
                n = ids.shape[1]
                torch.testing.assert_close(packed[:, cursor : cursor + n], alone, atol=1e-5, rtol=1e-4)
                cursor += n
            # Control: without position ids the packed examples do see each other.
            leaky = model(input_ids=batch["input_ids"], use_cache=False).logits
            assert not torch.allclose(leaky[:, cursor - n : cursor], alone, atol=1e-3)


def test_unpacked_batches_pad_with_attention_mask(tokenizer) -> None:
    examples = [tokenize_conversation(tokenizer, DEFAULT_CHAT_TEMPLATE, Conversation(
        [{"role": "user", "content": p}, {"role": "assistant", "content": "yes"}], "x"), 64)[0] for p in ("a", "one two three")]
    batch = SftBatches(examples, 64, packing=False, pad_id=0).fetch([0, 1])
    width = len(examples[1].input_ids)
    assert batch["input_ids"].shape == (2, width)
    assert batch["attention_mask"][0].sum() == len(examples[0].input_ids)
    assert (batch["labels"][0, len(examples[0].input_ids):] == IGNORE_INDEX).all()


def test_split_is_seeded_and_nonempty() -> None:
    train, val = split_indices(10, 0.1, seed=1)
    assert len(val) == 1 and sorted(train + val) == list(range(10))
    assert split_indices(10, 0.1, seed=1) == (train, val)
    assert split_indices(10, 0.0, seed=1) == (list(range(10)), [])
    assert len(split_indices(3, 0.5, seed=1)[1]) == 2


def test_build_from_folder_of_mixed_records(tokenizer, tmp_path: Path, write_jsonl) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl("data/a.jsonl", [{"prompt": f"one {i}", "response": "two"} for i in range(6)])
    write_jsonl("data/b.jsonl", [{"messages": [{"role": "user", "content": "cat"}, {"role": "assistant", "content": "dog"}]}] * 4)
    data = build_sft_data(SftDataset(uri=str(folder), validation_fraction=0.2), tokenizer, 64, packing=True, seed=0)
    assert data.stats.records == 10 and data.stats.validation_examples == 2 and data.stats.train_examples == 8
    assert data.stats.train_rows < 8  # packed
    assert 0 < data.stats.to_json()["packingEfficiency"] <= 1
    assert data.stats.template_source == "default"
    assert data.validation is not None and data.validation.num_items >= 1


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([{"prompt": "a"}], "expected string fields 'prompt' and 'response'"),
        ([{"messages": []}], "field 'messages' must be a non-empty list"),
        ([{"messages": [{"role": "bot", "content": "x"}]}], r"messages\[0\].role is 'bot'"),
        ([{"messages": [{"role": "user", "content": "x"}]}], "the conversation has no assistant message"),
        (["just a string"], "each line must be a JSON object"),
    ],
)
def test_bad_records_name_file_and_line(tokenizer, write_jsonl, records, message) -> None:
    path = write_jsonl("bad.jsonl", [{"prompt": "ok", "response": "ok"}, *records])
    with pytest.raises(SpecError, match=rf"bad.jsonl:2: {message}"):
        build_sft_data(SftDataset(uri=str(path)), tokenizer, 64, packing=False, seed=0)


def test_missing_and_empty_sources(tokenizer, tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"spec.dataset.uri: .*no such file"):
        build_sft_data(SftDataset(uri=str(tmp_path / "none.jsonl")), tokenizer, 64, packing=False, seed=0)
    with pytest.raises(SpecError, match=r"folder with no \.jsonl files"):
        build_sft_data(SftDataset(uri=str(tmp_path)), tokenizer, 64, packing=False, seed=0)


def test_records_an_earlier_revision_trained_on_are_dropped(tokenizer, tmp_path: Path, write_jsonl) -> None:
    first = [{"prompt": f"q{i}", "response": f" a{i}"} for i in range(6)]
    rev1 = build_sft_data(SftDataset(uri=str(write_jsonl("d1.jsonl", first)), validation_fraction=0),
                          tokenizer, 64, packing=False, seed=0)
    earlier = tmp_path / "rev1"
    earlier.mkdir()
    save_seen(rev1, earlier)
    assert len(rev1.seen) == 6 and rev1.stats.to_json().get("seenInEarlierRevision") is None
    grown = write_jsonl("d2.jsonl", [*first, {"prompt": "new", "response": " one"}])
    rev2 = build_sft_data(SftDataset(uri=str(grown), validation_fraction=0, earlier_revisions=[str(earlier)]),
                          tokenizer, 64, packing=False, seed=0)
    assert rev2.stats.seen_in_earlier_revision == 6 and rev2.stats.train_examples == 1
    assert len(rev2.seen) == 7  # cumulative: a third revision reads only the second's
    with pytest.raises(SpecError, match=r"every one of its 6 records was trained on by an earlier revision"):
        build_sft_data(SftDataset(uri=str(write_jsonl("d3.jsonl", first)), earlier_revisions=[str(earlier)]),
                       tokenizer, 64, packing=False, seed=0)
    with pytest.raises(SpecError, match=r"spec.dataset.earlierRevisions\[0\]: .* has no seen.npy"):
        build_sft_data(SftDataset(uri=str(grown), earlier_revisions=[str(tmp_path / "nothing")]),
                       tokenizer, 64, packing=False, seed=0)
    (earlier / "seen.npy").write_text("not numpy")
    with pytest.raises(SpecError, match=r"spec.dataset.earlierRevisions\[0\]: .*seen.npy is not a key array"):
        build_sft_data(SftDataset(uri=str(grown), earlier_revisions=[str(earlier)]), tokenizer, 64, packing=False, seed=0)
