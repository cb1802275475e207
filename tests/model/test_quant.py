"""QLoRA: LoRA on a 4-bit (bitsandbytes) tiny Phi-3, on CPU, against plain-torch references."""

import builtins
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

pytest.importorskip("bitsandbytes")

from philora import lora  # noqa: E402
from philora.model.adapter import save_adapter  # noqa: E402
from philora.core.config import CONFIG_DIR, ModelConfig, PeftConfig, load_config  # noqa: E402
from philora.core.errors import PhiloraError  # noqa: E402
from philora.model.inject import apply_adapter, inject_lora  # noqa: E402
from philora.lora import lora_layers  # noqa: E402
from philora.model.loading import load_model_and_tokenizer  # noqa: E402
from philora.use.merge import load_dequantized_base  # noqa: E402
from philora.model.quant import (dequantize_weight,  # noqa: E402
                           prepare_quantized, quantization_kwargs)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_path(tiny_model_dir):  # conftest: the built-in tiny Phi-3, built once per session
    return tiny_model_dir


def qcfg(path, quant="nf4", compute="float32", dtype="float32", **kw):
    return ModelConfig(name_or_path=path, quantization=quant, compute_dtype=compute, dtype=dtype, **kw)


def load_4bit(path, **kw):
    model, _, _ = load_model_and_tokenizer(qcfg(path, **kw), CPU, training=True)
    return prepare_quantized(model)


def randomize_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)


def ids(batch=2, length=12, seed=1):
    return torch.randint(3, 1000, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_quantization_kwargs(tiny_path):
    cfg = ModelConfig(name_or_path=tiny_path, quantization="fp4", double_quant=False, compute_dtype="bfloat16")
    kw = quantization_kwargs(cfg, CPU)
    q = kw["quantization_config"]
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "fp4" and not q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16 and kw["device_map"] == {"": "cpu"}
    auto = quantization_kwargs(ModelConfig(name_or_path=tiny_path, quantization="nf4"), CPU)["quantization_config"]
    assert auto.bnb_4bit_quant_type == "nf4" and auto.bnb_4bit_use_double_quant
    assert auto.bnb_4bit_compute_dtype == torch.float32  # auto on CPU
    assert quantization_kwargs(ModelConfig(name_or_path="x"), CPU) == {}


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_lora_layer_on_4bit_base_matches_dequantized_reference(tiny_path, quant):
    model = load_4bit(tiny_path, quant=quant)
    inject_lora(model, PeftConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", fused_slices={"qkv_proj": ["q", "v"]}))
    randomize_lora(model)
    attn = model.model.layers[0].self_attn
    fused, plain = attn.qkv_proj, attn.o_proj
    assert isinstance(fused, lora.LoRALinear) and isinstance(plain, lora.LoRALinear)
    assert fused.enable_lora == [True, False, True] and plain.enable_lora is None
    assert type(fused.base_layer).__name__ == "Linear4bit" and not fused.base_layer.weight.requires_grad
    for layer in (fused, plain):
        # Reference: the same LoRA in plain philora.lora around the dequantized weight.
        w = dequantize_weight(layer.base_layer.weight)
        kind = dict(enable_lora=layer.enable_lora, split_sizes=layer.split_sizes) if layer is fused else {}
        cls = lora.MergedLinear if layer is fused else lora.Linear
        ref = cls(layer.in_features, layer.out_features, r=4, lora_alpha=8, bias=False,
                  merge_weights=False, **kind)
        with torch.no_grad():
            ref.weight.copy_(w)
            ref.lora_A.copy_(layer.lora_A)
            ref.lora_B.copy_(layer.lora_B)
        x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(2))
        layer.eval()
        with torch.no_grad():  # an eval pass first: bitsandbytes must not repack the weight for good
            layer(x)
        layer.train()
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = layer(xa), ref(xb)
        torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-5)
        grad_out = torch.randn(ya.shape, generator=torch.Generator().manual_seed(3))
        ya.backward(grad_out)
        yb.backward(grad_out)
        torch.testing.assert_close(xa.grad, xb.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.lora_A.grad, ref.lora_A.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.lora_B.grad, ref.lora_B.grad, atol=1e-5, rtol=1e-5)


def test_same_lora_tensors_as_plain_model_and_no_in_place_merge(tiny_path):
    model = load_4bit(tiny_path)
    inject_lora(model, PeftConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["qkv_proj", "down_proj"], fused_slices={"gate_up_proj": ["up"]}, use_rslora=True))
    plain, _, _ = load_model_and_tokenizer(ModelConfig(name_or_path=tiny_path), CPU)
    inject_lora(plain, PeftConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["qkv_proj", "down_proj"], fused_slices={"gate_up_proj": ["up"]}, use_rslora=True))
    shapes = lambda m: {k: tuple(v.shape) for k, v in lora.lora_state_dict(m).items()}  # noqa: E731
    assert shapes(model) == shapes(plain) and len(shapes(model)) == 2 * 3 * 4
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(shapes(model))
    layer = model.model.layers[0].mlp.down_proj
    assert layer.scaling == 8 / math.sqrt(4) and layer.use_rslora and layer.lora_A.dtype == torch.float32
    with pytest.raises(ValueError, match="dequantises"):  # philora.lora imports torch only: no PhiloraError
        layer._set_merged(True)
    assert not layer.merged


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_merge_path_dequantized_base_plus_adapter_matches_4bit(tiny_path, tmp_path, dtype, tol):
    cfg = qcfg(tiny_path, compute=dtype, dtype=dtype)
    model, _, _ = load_model_and_tokenizer(cfg, CPU, training=False)
    prepare_quantized(model)
    inject_lora(model, PeftConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", fused_slices={"qkv_proj": ["q", "v"]}))
    randomize_lora(model)
    save_adapter(model, tmp_path, tiny_path, PeftConfig(r=4, lora_alpha=8, lora_dropout=0.0))
    x = ids()
    with torch.no_grad():
        want = model(x).logits.float()

    base = load_dequantized_base(cfg, getattr(torch, dtype))
    assert not any(type(m).__name__ == "Linear4bit" for m in base.modules())
    assert base.dtype == getattr(torch, dtype) and not hasattr(base.config, "quantization_config")
    apply_adapter(base, tmp_path)
    base.eval()
    with torch.no_grad():
        got = base(x).logits.float()
    torch.testing.assert_close(got, want, atol=tol * want.abs().max().item(), rtol=tol)
    # The merge itself (delta into the plain weight) still equals the unmerged layers.
    for layer in lora_layers(base).values():
        layer._set_merged(True)
    with torch.no_grad():
        merged = base(x).logits.float()
    torch.testing.assert_close(merged, want, atol=tol * want.abs().max().item(), rtol=tol)
    # And it is a plain model that saves without any quantization config.
    base.save_pretrained(tmp_path / "merged")
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())


def test_adapter_loads_in_peft_on_the_same_4bit_base(tiny_path, tmp_path):
    peft = pytest.importorskip("peft")
    model = load_4bit(tiny_path)
    inject_lora(model, PeftConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", fused_slices={"qkv_proj": ["q", "v"]}))
    randomize_lora(model)
    save_adapter(model, tmp_path, tiny_path, PeftConfig(r=4, lora_alpha=8, lora_dropout=0.0))
    model.eval()
    x = ids()
    with torch.no_grad():
        want = model(x).logits
    base, _, _ = load_model_and_tokenizer(qcfg(tiny_path), CPU, training=False)
    prepare_quantized(base)
    with torch.no_grad():
        before = base(x).logits
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    assert type(peft_model.base_model.model.model.layers[0].self_attn.qkv_proj.base_layer).__name__ == "Linear4bit"
    with torch.no_grad():
        got = peft_model(x).logits
    assert (before - want).abs().max() > 1e-3  # the adapter matters, so the comparison means something
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def qlora_run_config(tiny_path, out, *extra):
    """A 2-step nf4 training run on the tiny model, plus ``extra`` overrides."""
    return load_config(None, [f"model.name_or_path={tiny_path}", "model.quantization=nf4",
                              f"training_config.output_dir={out}", "training_config.max_steps=2",
                              "training_config.save_steps=0", "training_config.eval_max_samples=4",
                              "training_config.per_device_train_batch_size=2",
                              "training_config.report_samples=0", "training_config.progress_bar=false",
                              *extra])


def test_qlora_training_run(tiny_path, tmp_path):
    from philora.run.train import train
    cfg = qlora_run_config(tiny_path, tmp_path, "model.gradient_checkpointing=true",
                           "training_config.eval_steps=0", "training_config.logging_steps=1")
    metrics = train(cfg).metrics
    assert math.isfinite(metrics["eval_loss"])
    from safetensors.torch import load_file
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert any("qkv_proj.lora_B" in k for k in tensors)
    assert all(v.abs().max() > 0 for k, v in tensors.items() if "lora_B" in k)  # every layer trained
    losses = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses if "loss" in r] == [1, 2]
    # `philora merge` of the QLoRA run: a plain model computing what the 4-bit base + adapter does.
    from transformers import AutoModelForCausalLM

    from philora.use.merge import merge
    merge(str(tmp_path), str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any(type(m).__name__ == "Linear4bit" for m in merged.modules())
    base, _, _ = load_model_and_tokenizer(qcfg(tiny_path, compute="auto", dtype="auto"), CPU, training=False)
    apply_adapter(prepare_quantized(base), tmp_path)
    x = ids()
    with torch.no_grad():
        want, got = base.eval()(x).logits, merged(x).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_shipped_qlora_config():
    q = load_config(CONFIG_DIR / "phi3-mini-qlora.yaml")
    base = load_config(CONFIG_DIR / "phi3-mini-lora.yaml")
    assert (q.model.quantization, q.model.double_quant, q.model.compute_dtype) == ("nf4", True, "auto")
    assert q.model.gradient_checkpointing
    raw_q = yaml.safe_load((CONFIG_DIR / "phi3-mini-qlora.yaml").read_text())
    raw_b = yaml.safe_load((CONFIG_DIR / "phi3-mini-lora.yaml").read_text())
    for section in ("data", "peft_config"):
        assert raw_q[section] == raw_b[section]
    assert q.model.name_or_path == base.model.name_or_path
    assert q.training_config.output_dir != base.training_config.output_dir


# -- bad input: one line saying what to change -------------------------------------------------

def test_error_without_bitsandbytes(monkeypatch, helpers):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "bitsandbytes" or name.startswith("bitsandbytes."):
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(PhiloraError) as e:
        quantization_kwargs(ModelConfig(name_or_path="x", quantization="nf4"), CPU)
    helpers.one_line_error(e, "pip install bitsandbytes", "model.quantization: null")


def test_error_on_a_device_bitsandbytes_cannot_use(helpers):
    with pytest.raises(PhiloraError) as e:
        quantization_kwargs(ModelConfig(name_or_path="x", quantization="nf4"), torch.device("mps"))
    assert "'mps'" in helpers.one_line_error(e)


def test_error_on_a_model_that_cannot_be_quantised(tiny_path, tmp_path, helpers):
    # A base that is already quantised some other way (GPTQ here) cannot be loaded in 4 bits.
    config = json.loads((Path(tiny_path) / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(PhiloraError) as e:
        quantization_kwargs(qcfg(str(tmp_path)), CPU)
    assert "already quantised (gptq)" in helpers.one_line_error(e)
    # An architecture with no plain nn.Linear for bitsandbytes to convert.
    from transformers import AutoModelForCausalLM
    real = AutoModelForCausalLM.from_config

    def no_linear(config, **kw):
        model = real(config, **kw)
        for layer in model.model.layers:
            layer.self_attn, layer.mlp = torch.nn.Identity(), torch.nn.Identity()
        return model

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AutoModelForCausalLM, "from_config", no_linear)
        with pytest.raises(PhiloraError) as e:
            quantization_kwargs(qcfg(tiny_path), CPU)
    assert "model type 'phi3'" in helpers.one_line_error(e)
    quantization_kwargs(qcfg(tiny_path), CPU)  # the real tiny Phi-3 passes
    # A model that loaded without any 4-bit layer.
    plain, _, _ = load_model_and_tokenizer(ModelConfig(name_or_path=tiny_path), CPU)
    with pytest.raises(PhiloraError) as e:
        prepare_quantized(plain)
    helpers.one_line_error(e)


def test_lora_dtype_and_input_dtype(tiny_path):
    # bf16 activations into a fp32-compute 4-bit layer with fp32 LoRA: output in the input dtype.
    model = load_4bit(tiny_path)
    inject_lora(model, PeftConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["o_proj"]))
    layer = model.model.layers[0].self_attn.o_proj
    randomize_lora(model)
    x = torch.randn(3, layer.in_features).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = F.linear(x.float(), dequantize_weight(layer.base_layer.weight)).to(torch.bfloat16) + \
        (F.linear(F.linear(x.float(), layer.lora_A), layer.lora_B) * layer.scaling).to(torch.bfloat16)
    torch.testing.assert_close(y, ref, atol=2e-2, rtol=2e-2)


def test_qlora_with_untargeted_4bit_layers_trains(tiny_path, tmp_path):
    # Only qkv_proj gets LoRA: the other 4-bit layers run a no-grad eval first (step 0) and must
    # still pass gradients back in training (loading.py calls prepare_quantized for them).
    from philora.run.train import train
    cfg = qlora_run_config(tiny_path, tmp_path, "peft_config.target_modules=[qkv_proj]")
    metrics = train(cfg).metrics
    assert math.isfinite(metrics["eval_loss"])
    from safetensors.torch import load_file
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    b = [v for k, v in tensors.items() if "lora_B" in k]
    assert b and all(v.abs().max() > 0 for v in b)  # gradients reached every layer's LoRA
