"""crucible.trainer.llama: our Llama is transformers' LlamaForCausalLM bit for bit, without importing it.

The fresh PretrainRun model is built from our own modules so no attempt imports transformers
before its first step (≈ 3.3 s of CPU at every start and restart). These tests hold it to
transformers' model: the same weights from one seed (and the same generator state after), the
same loss and gradients with and without activation checkpointing and under bf16 autocast, the
same meta-device materialisation, the same export files, and a transformers view over the same
parameters for what it does not do itself (generation, padding masks).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from crucible.trainer.config.training import ModelConfig
from crucible.trainer.llama import LlamaForCausalLM as OurLlama
from crucible.trainer.model import build_meta_model, build_model, llama_config, llama_settings
from waits import scaled

REPO = Path(__file__).resolve().parents[2]
VOCAB = 300

SHAPES = [
    pytest.param({"hiddenSize": 64, "numLayers": 2, "numHeads": 4}, id="mha"),
    pytest.param({"hiddenSize": 64, "numLayers": 3, "numHeads": 4, "numKvHeads": 2, "tieWordEmbeddings": True},
                 id="gqa-tied"),
    pytest.param({"hiddenSize": 32, "numLayers": 1, "numHeads": 2, "intermediateSize": 80, "ropeTheta": 500000,
                  "initializerRange": 0.05, "maxPositionEmbeddings": 256}, id="odd"),
]


def _pair(shape: dict, seed: int = 3, eos: int | None = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    from transformers import LlamaForCausalLM

    cfg = ModelConfig.model_validate(shape)
    torch.manual_seed(seed)
    theirs = LlamaForCausalLM(llama_config(cfg, VOCAB, eos))
    theirs.config.use_cache = False
    after_theirs = torch.get_rng_state()
    torch.manual_seed(seed)
    ours = OurLlama(llama_settings(cfg, VOCAB, eos))
    assert torch.equal(torch.get_rng_state(), after_theirs), "the builds drew a different number of random values"
    return theirs, ours


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert list(a) == list(b), f"{what}: names differ"
    differ = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not differ, f"{what} differ: {differ[:5]}"


@pytest.mark.parametrize("shape", SHAPES)
def test_the_transformers_config_is_the_one_written_out_field_by_field(shape: dict) -> None:
    """llama_config derives from llama_settings; it is the LlamaConfig the trainer always built."""
    from transformers import LlamaConfig

    cfg = ModelConfig.model_validate(shape)
    direct = LlamaConfig(
        vocab_size=VOCAB, hidden_size=cfg.hidden_size, intermediate_size=llama_settings(cfg, VOCAB).intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads, max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_word_embeddings, initializer_range=cfg.initializer_range, eos_token_id=0,
        bos_token_id=None, pad_token_id=None, use_cache=False)
    assert llama_config(cfg, VOCAB, 0).to_dict() == direct.to_dict()


@pytest.mark.parametrize("shape", SHAPES)
def test_same_weights_buffers_and_generator_state_as_transformers(shape: dict) -> None:
    theirs, ours = _pair(shape)
    _assert_same_tensors(theirs.state_dict(), ours.state_dict(), "weights")
    _assert_same_tensors(dict(theirs.named_buffers()), dict(ours.named_buffers()), "buffers")
    assert [n for n, _ in theirs.named_modules()] == [n for n, _ in ours.named_modules()]
    tied = bool(shape.get("tieWordEmbeddings"))
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) is tied
    assert set(ours.all_tied_weights_keys) == set(theirs.all_tied_weights_keys if tied else {})


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation-checkpointing"])
def test_same_loss_and_gradients_as_transformers(shape: dict, checkpointing: bool) -> None:
    theirs, ours = _pair(shape)
    if checkpointing:
        for model in (theirs, ours):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, VOCAB, (2, 33), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :5] = -100  # ignored positions count the same
    for model in (theirs, ours):
        model.train()
        model(input_ids=ids, labels=labels, use_cache=False).loss.backward()
    ours_params = dict(ours.named_parameters())
    differ = [n for n, p in theirs.named_parameters() if not torch.equal(p.grad, ours_params[n].grad)]
    assert not differ, f"gradients differ: {differ[:5]}"
    with torch.no_grad():
        a = theirs(input_ids=ids, labels=labels, use_cache=False)
        b = ours(input_ids=ids, labels=labels, use_cache=False)
        assert a.loss.item().hex() == b.loss.item().hex()
        assert torch.equal(a.logits, b.logits)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a = theirs(input_ids=ids, labels=labels)
            b = ours(input_ids=ids, labels=labels)
        assert a.loss.item().hex() == b.loss.item().hex()


def test_training_steps_match_transformers_bit_for_bit() -> None:
    theirs, ours = _pair({"hiddenSize": 64, "numLayers": 2, "numHeads": 4, "numKvHeads": 1})
    losses: dict[str, list[str]] = {}
    for name, model in (("theirs", theirs), ("ours", ours)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(7)
        losses[name] = []
        for _ in range(4):
            ids = torch.randint(0, VOCAB, (2, 17), generator=gen)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            losses[name].append(loss.item().hex())
    assert losses["ours"] == losses["theirs"]


def test_build_model_is_ours_for_llama_and_transformers_for_mixtral() -> None:
    llama = build_model(ModelConfig.model_validate({"hiddenSize": 32, "numLayers": 1, "numHeads": 2}), VOCAB, 0)
    assert isinstance(llama, OurLlama)
    mixtral = build_model(ModelConfig.model_validate({"architecture": "mixtral", "hiddenSize": 32, "numLayers": 1,
                                                      "numHeads": 2, "moe": {"numExperts": 2, "topK": 1}}), VOCAB, 0)
    assert type(mixtral).__module__.startswith("transformers.")


@pytest.mark.parametrize("shape", SHAPES)
def test_meta_build_materialises_to_the_cpu_build(shape: dict) -> None:
    from crucible.trainer.meta_init import pending_init

    cfg = ModelConfig.model_validate(shape)
    cpu = build_model(cfg, VOCAB, seed=11, eos_id=0)
    meta = build_meta_model(cfg, VOCAB, seed=11, eos_id=0)
    assert isinstance(meta, OurLlama) and all(t.is_meta for t in meta.parameters())
    init = pending_init(meta)
    assert init is not None
    init.materialise([meta], torch.device("cpu"))
    _assert_same_tensors(cpu.state_dict(), meta.state_dict(), "materialised weights")
    _assert_same_tensors(dict(cpu.named_buffers()), dict(meta.named_buffers()), "materialised buffers")


@pytest.mark.parametrize("eos", [0, None], ids=["eos", "no-eos"])
@pytest.mark.parametrize("shape", SHAPES)
def test_export_config_files_are_the_ones_transformers_writes(tmp_path: Path, shape: dict, eos: int | None) -> None:
    from transformers import AutoModelForCausalLM

    from crucible.trainer.output import write_hf_model

    theirs, ours = _pair(shape, eos=eos)
    state = ours.state_dict()
    specs = [(n, tuple(t.shape), t.dtype) for n, t in state.items()]
    write_hf_model(ours, specs, iter(state.items()), tmp_path / "ours", None)
    write_hf_model(theirs, specs, iter(theirs.state_dict().items()), tmp_path / "theirs", None)
    for name in ("config.json", "generation_config.json"):
        assert (tmp_path / "ours" / name).read_text() == (tmp_path / "theirs" / name).read_text(), name
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, ours(input_ids=ids).logits)


def test_transformers_view_shares_parameters_for_generation_and_padding() -> None:
    theirs, ours = _pair({"hiddenSize": 64, "numLayers": 2, "numHeads": 4, "numKvHeads": 2})
    view = ours.transformers_view()
    assert view.model.layers[1].mlp.up_proj.weight is ours.model.layers[1].mlp.up_proj.weight
    ids = torch.randint(1, VOCAB, (2, 7))
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        assert torch.equal(ours.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0),
                           theirs.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0))
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # right padding: transformers' masked forward, our parameters' gradients
    ours.train()
    theirs.train()
    ours(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    theirs(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    assert torch.equal(ours.model.embed_tokens.weight.grad, theirs.model.embed_tokens.weight.grad)
    with torch.no_grad():  # an all-ones mask is no mask: our own forward
        assert torch.equal(ours(input_ids=ids, attention_mask=torch.ones_like(ids)).logits,
                           theirs(input_ids=ids).logits)


def test_reentrant_activation_checkpointing_is_refused() -> None:
    _, ours = _pair({"hiddenSize": 32, "numLayers": 1, "numHeads": 2})
    with pytest.raises(ValueError, match="use_reentrant"):
        ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})


def test_a_fresh_llama_trains_and_exports_without_importing_transformers(tmp_path: Path) -> None:
    """What the start of every PretrainRun attempt imports: the stage, a meta build, its init, a
    step, a checkpoint-shaped state dict and the export — and never transformers."""
    script = textwrap.dedent(f"""
        import sys, torch
        from crucible.trainer import pretrain, checkpoint, output  # noqa: F401 - what the stage imports
        from crucible.trainer.config.training import ModelConfig
        from crucible.trainer.meta_init import pending_init
        from crucible.trainer.model import build_meta_model
        model = build_meta_model(ModelConfig.model_validate({{"hiddenSize": 32, "numLayers": 2, "numHeads": 2}}),
                                 {VOCAB}, seed=0, eos_id=0)
        pending_init(model).materialise([model], torch.device("cpu"))
        ids = torch.randint(0, {VOCAB}, (2, 16))
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        state = model.state_dict()
        output.write_hf_model(model, [(n, tuple(t.shape), t.dtype) for n, t in state.items()],
                              iter(state.items()), {str(tmp_path)!r}, None)
        loaded = sorted(m for m in sys.modules if m == "transformers" or m.startswith("transformers."))
        print("TRANSFORMERS", len(loaded), loaded[:5])
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=scaled(120),
                         cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "TRANSFORMERS 0 []" in out.stdout, out.stdout
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and (tmp_path / "model.safetensors").is_file()
