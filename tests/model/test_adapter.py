"""philora.model.adapter: PEFT adapters in and out, checked against peft itself (equal logits), and a
one-line error for every adapter philora cannot load."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close
from transformers import GPT2Config, GPT2LMHeadModel

from philora.core.config import PeftConfig
from philora.model.adapter import AdapterError, read_adapter, save_adapter
from philora.model.inject import apply_adapter, inject_lora
from philora.lora import lora_layers


# -----------------------------------------------------------------------------
# loading peft's adapters

PEFT_CASES = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["qkv_proj", "down_proj"]),
    "rslora+patterns": dict(r=4, lora_alpha=8, use_rslora=True, target_modules="all-linear",
                            rank_pattern={"o_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
                            alpha_pattern={"gate_up_proj": 3, "qkv_proj": 16}),
}


@pytest.mark.parametrize("case", PEFT_CASES)
def test_peft_written_adapter_gives_peft_logits(base_dir, tmp_path, case, helpers):
    ids = helpers.token_ids()
    peft_model = helpers.peft_adapter(base_dir, tmp_path, **PEFT_CASES[case])
    model = helpers.load_model(base_dir)
    apply_adapter(model, tmp_path)
    want = helpers.peft_logits(base_dir, tmp_path, ids)
    assert_close(helpers.logits(peft_model, ids), want, rtol=0, atol=0)
    assert_close(helpers.logits(model, ids), want, **helpers.TIGHT)
    base = helpers.logits(helpers.load_model(base_dir), ids)
    assert (helpers.logits(model, ids) - base).abs().max() > 1e-2  # it did something
    if case == "rslora+patterns":  # patterns reached the layers: ranks and scalings differ by module
        layers = lora_layers(model)
        assert layers["model.layers.0.self_attn.o_proj"].r == 2
        assert layers["model.layers.1.mlp.down_proj"].r == 6 and layers["model.layers.0.mlp.down_proj"].r == 4
        assert layers["model.layers.0.mlp.gate_up_proj"].scaling == pytest.approx(3 / 2)


def test_keys_with_the_adapter_name(base_dir, tmp_path, helpers):
    ids = helpers.token_ids()
    helpers.peft_adapter(base_dir, tmp_path, r=4, lora_alpha=8, target_modules=["o_proj"])
    want = helpers.peft_logits(base_dir, tmp_path, ids)
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(file)
    renamed = {re.sub(r"\.(lora_[AB])\.weight$", r".\1.default.weight", k): v for k, v in tensors.items()}
    assert renamed.keys() != tensors.keys()
    save_file(renamed, file)
    model = helpers.load_model(base_dir)
    apply_adapter(model, tmp_path)
    assert_close(helpers.logits(model, ids), want, **helpers.TIGHT)


def test_fan_in_fan_out_gpt2_with_biases(tmp_path, helpers):
    """GPT-2 keeps Conv1D weights as (in, out); peft's bias='all' saves every bias too."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=2)).eval()
    base.save_pretrained(tmp_path / "base")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, bias="all")
    peft_model = helpers.randomize(get_peft_model(helpers.load_model(tmp_path / "base"), config)).eval()
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if p.requires_grad and n.endswith(".bias"):
                p.add_(0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any(k.endswith("c_attn.base_layer.bias") for k in saved)
    ids = helpers.token_ids(96)
    model = helpers.load_model(tmp_path / "base")
    apply_adapter(model, tmp_path / "adapter")
    assert lora_layers(model)["transformer.h.0.attn.c_attn"].fan_in_fan_out
    assert_close(helpers.logits(model, ids), helpers.logits(peft_model, ids), **helpers.TIGHT)


# -----------------------------------------------------------------------------
# philora's adapters, read by peft

@pytest.mark.parametrize("use_rslora", [False, True])
def test_per_slice_adapter_loads_in_peft_and_back(base_dir, tmp_path, use_rslora, helpers):
    ids = helpers.token_ids()
    model = helpers.philora_run_adapter(base_dir, tmp_path, use_rslora=use_rslora)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["gate_up_proj", "o_proj", "qkv_proj"]
    assert config["rank_pattern"] == {"qkv_proj": 8}  # q and v: rank 4 each, block-diagonal
    want = helpers.logits(model, ids)
    assert_close(helpers.peft_logits(base_dir, tmp_path, ids), want, **helpers.TIGHT)
    again = helpers.load_model(base_dir)
    apply_adapter(again, tmp_path)
    assert_close(helpers.logits(again, ids), want, **helpers.TIGHT)


def test_trained_biases_export_where_peft_reads_them(tmp_path, helpers):
    """bias='all': a LoRA layer's own bias is peft's '<module>.base_layer.bias', others keep their name."""
    torch.manual_seed(0)
    gpt2 = GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    GPT2LMHeadModel(gpt2).save_pretrained(tmp_path / "base")
    model = helpers.load_model(tmp_path / "base")
    inject_lora(model, PeftConfig(r=4, lora_alpha=8, target_modules=["c_attn"], bias="all", lora_dropout=0.0))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape) * 0.3)
    save_adapter(model, tmp_path / "adapter", str(tmp_path / "base"), PeftConfig(r=4, lora_alpha=8, bias="all", lora_dropout=0.0))
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias" in keys
    assert "base_model.model.transformer.h.0.ln_1.bias" in keys
    ids = helpers.token_ids(96)
    want = helpers.logits(model, ids)
    assert_close(helpers.peft_logits(tmp_path / "base", tmp_path / "adapter", ids), want, **helpers.TIGHT)
    again = helpers.load_model(tmp_path / "base")
    apply_adapter(again, tmp_path / "adapter")
    assert_close(helpers.logits(again, ids), helpers.logits(model, ids), **helpers.TIGHT)


# -----------------------------------------------------------------------------
# what philora cannot load: one line each

def _edit_config(path, **changes):
    file = path / "adapter_config.json"
    config = json.loads(file.read_text())
    config.update(changes)
    file.write_text(json.dumps(config))


def _edit_tensors(path, fn):
    file = path / "adapter_model.safetensors"
    save_file(fn(load_file(file)), file)


UNSUPPORTED = {
    "modules_to_save": (dict(modules_to_save=["lm_head"]), None, "modules_to_save"),
    "lora_bias": (None, lambda p: _edit_config(p, lora_bias=True), "lora_bias"),
    "pissa": (None, lambda p: _edit_config(p, init_lora_weights="pissa"), "pissa"),
    "peft_type": (None, lambda p: _edit_config(p, peft_type="LOHA"), "peft_type 'LOHA' is not LORA"),
    "magnitude": (None, lambda p: _edit_tensors(p, lambda t: {
        **t, "base_model.model.model.layers.0.self_attn.o_proj.lora_magnitude_vector": torch.ones(64)}), "DoRA"),
    "embedding": (None, lambda p: _edit_tensors(p, lambda t: {
        **t, "base_model.model.model.embed_tokens.lora_embedding_A": torch.ones(4, 128)}), "embedding LoRA"),
    "extra_tensor": (None, lambda p: _edit_tensors(p, lambda t: {
        **t, "base_model.model.lm_head.weight": torch.ones(128, 64)}), "not a LoRA weight"),
    "missing_B": (None, lambda p: _edit_tensors(p, lambda t: {
        k: v for k, v in t.items() if "layers.1.self_attn.o_proj.lora_B" not in k}), "has no lora_B weight"),
    "rank": (None, lambda p: _edit_config(p, r=8), "rank 4 but adapter_config says 8"),
    "empty": (None, lambda p: _edit_tensors(p, lambda t: {}), "has no LoRA weights"),
    "no_weights": (None, lambda p: (p / "adapter_model.safetensors").unlink(), "missing adapter weights"),
    "bad_json": (None, lambda p: (p / "adapter_config.json").write_text("{oops"), "invalid JSON"),
}


@pytest.mark.parametrize("case", UNSUPPORTED)
def test_unsupported_or_broken_adapter_is_one_line(base_dir, tmp_path, case, helpers):
    extra, edit, needle = UNSUPPORTED[case]
    helpers.peft_adapter(base_dir, tmp_path, r=4, lora_alpha=8, target_modules=["o_proj"], **(extra or {}))
    if edit:
        edit(tmp_path)
    with pytest.raises(AdapterError) as e:
        apply_adapter(helpers.load_model(base_dir), tmp_path)
    assert needle in helpers.one_line_error(e)


def test_missing_directory(tmp_path, helpers):
    with pytest.raises(AdapterError, match="no adapter_config.json") as e:
        read_adapter(tmp_path / "nope")
    helpers.one_line_error(e)


def test_wrong_base_names_the_module(base_dir, tmp_path, helpers):
    helpers.peft_adapter(base_dir, tmp_path / "a", r=4, lora_alpha=8, target_modules=["o_proj"])
    other = helpers.load_model(helpers.save_base(tmp_path / "other", kv_heads=4))  # same names, o_proj fits ...
    apply_adapter(other, tmp_path / "a")
    helpers.peft_adapter(base_dir, tmp_path / "b", r=4, lora_alpha=8, target_modules=["qkv_proj"])
    with pytest.raises(AdapterError) as e:  # ... qkv_proj does not (GQA 128 rows vs MHA 192)
        apply_adapter(helpers.load_model(tmp_path / "other"), tmp_path / "b")
    msg = helpers.one_line_error(e)
    assert "'model.layers.0.self_attn.qkv_proj' has lora_A (4, 64) / lora_B (128, 4)" in msg
    assert "(192, 4)" in msg


def test_unknown_module_lists_the_models_modules(base_dir, tmp_path, helpers):
    helpers.peft_adapter(base_dir, tmp_path, r=4, lora_alpha=8, target_modules=["o_proj"])
    _edit_tensors(tmp_path, lambda t: {k.replace("o_proj", "out_proj"): v for k, v in t.items()})
    with pytest.raises(AdapterError) as e:
        apply_adapter(helpers.load_model(base_dir), tmp_path)
    msg = helpers.one_line_error(e)
    assert "module 'model.layers.0.self_attn.out_proj' is not in the base model" in msg
    assert "self_attn.qkv_proj" in msg
