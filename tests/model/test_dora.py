"""DoRA (peft_config.use_dora): philora's DoRA layers against peft's (outputs, gradients, dropout),
the PEFT file both ways, ``philora merge`` against peft's merge, QLoRA + DoRA against the formula,
adapter check, and a training run that peft loads and that resumes exactly."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from philora.lora import LoRALinear
from philora.model.adapter import read_adapter, save_adapter
from philora.export.adapter_check import check_cli
from philora.core.config import Config, ModelConfig, PeftConfig, save_config
from philora.model.inject import apply_adapter, inject_lora
from philora.lora import lora_layers
from philora.use.merge import merge
from philora.use.report import lora_disabled
from philora.run.train import train

DORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, use_dora=True)


def philora_dora(helpers, base_dir, seed=3, **kw):
    """A philora DoRA model on ``base_dir`` with random A, B and magnitudes (not ||W||)."""
    model = helpers.load_model(base_dir)
    inject_lora(model, PeftConfig(**{**DORA, **kw}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.3)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
            m = layer.lora_magnitude_vector
            m.mul_(1 + 0.3 * torch.randn(m.shape, generator=g))
    return model


def peft_twin(helpers, base_dir, model, **lora_kwargs):
    """peft's DoRA model on the same base holding ``model``'s LoRA tensors (whole modules)."""
    from peft import LoraConfig, get_peft_model
    twin = get_peft_model(helpers.load_model(base_dir), LoraConfig(**lora_kwargs))
    params = dict(twin.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                module, _, which = name.rpartition(".")
                params[f"base_model.model.{module}.{which}.default.weight"].copy_(p)
    return twin


def save_run(model, out, base_dir, **model_cfg):
    save_adapter(model, out, base_dir, PeftConfig(**DORA))
    save_config(Config(model=ModelConfig(name_or_path=str(base_dir), **model_cfg)), out / "config.yaml")


def test_starts_as_the_base_and_switches_off_to_it(base_dir, helpers):
    base = helpers.load_model(base_dir)
    ids = helpers.token_ids()
    want = helpers.logits(base, ids)
    model = helpers.load_model(base_dir)
    inject_lora(model, PeftConfig(**DORA, fused_slices={"qkv_proj": ["q", "v"]}))
    layer = model.model.layers[0].self_attn.o_proj
    assert isinstance(layer, LoRALinear) and layer.use_dora and layer.enable_lora is None
    assert layer.lora_magnitude_vector.requires_grad
    assert_close(layer.lora_magnitude_vector, torch.linalg.norm(base.model.layers[0].self_attn.o_proj.weight, dim=1),
                 rtol=0, atol=0)
    qkv = model.model.layers[0].self_attn.qkv_proj  # q and v rows only: 64 + 32 of 128
    assert isinstance(qkv, LoRALinear) and qkv.use_dora and qkv.enable_lora is not None
    assert qkv.lora_magnitude_vector.shape == (96,)
    assert torch.equal(helpers.logits(model, ids), want)  # B = 0 and m = ||W||: exactly the base
    model = philora_dora(helpers, base_dir, fused_slices={"qkv_proj": ["q", "v"]})
    assert (helpers.logits(model, ids) - want).abs().max() > 1e-2
    with lora_disabled(model):  # the report's base side: magnitude off too
        assert torch.equal(helpers.logits(model, ids), want)
    # The norm is kept between forwards only while A, B and W are unchanged: an in-place update
    # (an optimizer step, load_state_dict) gives what a model built with the new tensors gives.
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.mul_(2.0)
    fresh = helpers.load_model(base_dir)
    inject_lora(fresh, PeftConfig(**DORA, fused_slices={"qkv_proj": ["q", "v"]}))
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" in k}, strict=False)
    assert torch.equal(helpers.logits(model, ids), helpers.logits(fresh, ids))


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_forward_and_gradients_equal_peft(base_dir, helpers, dropout):
    model = philora_dora(helpers, base_dir, lora_dropout=dropout)
    twin = peft_twin(helpers, base_dir, model, r=4, lora_alpha=8, lora_dropout=dropout,
                     target_modules="all-linear", use_dora=True)
    model.train()
    twin.train()
    ids = helpers.token_ids()
    weights = torch.randn(2, 11, 128, generator=torch.Generator().manual_seed(5))
    outs = []
    for m in (model, twin):
        torch.manual_seed(7)  # the same dropout masks (tiny inputs: philora draws F.dropout's)
        out = m(input_ids=ids).logits
        (out * weights).sum().backward()
        outs.append(out.detach())
    assert_close(outs[0], outs[1], **helpers.TIGHT)
    grads = {n.replace("base_model.model.", "").replace(".default.weight", ""): p.grad
             for n, p in twin.named_parameters() if p.requires_grad}
    mine = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert mine.keys() == grads.keys() and any("lora_magnitude_vector" in n for n in mine)
    for n in mine:
        assert_close(mine[n], grads[n], **helpers.TIGHT, msg=n)


def test_conv1d_layers_equal_peft(helpers):
    """GPT-2's Conv1D (weight stored (in, out), fan_in_fan_out in peft), with biases."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32)).eval()
    mine = gpt2()
    inject_lora(mine, PeftConfig(**DORA))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in mine.named_parameters():
            if "lora_" in n:
                p.copy_(p * 1.3 if "magnitude" in n else torch.randn(p.shape, generator=g) * 0.3)
    theirs = get_peft_model(gpt2(), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                                               use_dora=True, fan_in_fan_out=True))
    params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, p in mine.named_parameters():
            if "lora_" in name:
                module, _, which = name.rpartition(".")
                params[f"base_model.model.{module}.{which}.default.weight"].copy_(p)
    ids = torch.randint(0, 64, (2, 9), generator=g)
    assert_close(helpers.logits(mine, ids), helpers.logits(theirs, ids), **helpers.TIGHT)


@pytest.mark.parametrize("rslora", [False, True])
def test_saved_adapter_is_peft_dora(base_dir, tmp_path, helpers, rslora):
    from peft import PeftModel
    model = philora_dora(helpers, base_dir, use_rslora=rslora, target_modules=["o_proj", "gate_up_proj"],
                         fused_slices={"qkv_proj": ["q", "v"]})
    save_adapter(model, tmp_path, base_dir, PeftConfig(**DORA, use_rslora=rslora))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert config["use_dora"] is True
    assert tensors["base_model.model.model.layers.0.self_attn.qkv_proj.lora_magnitude_vector"].shape == (128,)
    ids = helpers.token_ids()
    want = helpers.logits(model.eval(), ids)
    peft_model = PeftModel.from_pretrained(helpers.load_model(base_dir), tmp_path).eval()
    assert_close(helpers.logits(peft_model, ids), want, **helpers.TIGHT)
    again = helpers.load_model(base_dir)  # and back into philora
    apply_adapter(again, tmp_path)
    assert_close(helpers.logits(again, ids), want, **helpers.TIGHT)


def test_peft_dora_adapter_loads_in_philora(base_dir, tmp_path, helpers):
    peft_model = helpers.peft_adapter(base_dir, tmp_path, r=4, lora_alpha=8, target_modules=["qkv_proj", "down_proj"],
                                      use_dora=True)
    with torch.no_grad():  # a trained magnitude, not the ||W|| peft starts from
        for n, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1.5)
    peft_model.save_pretrained(tmp_path)
    adapter = read_adapter(tmp_path, dora=True)
    assert sorted(adapter.magnitudes) == sorted(adapter.modules) and len(adapter.modules) == 4
    model = helpers.load_model(base_dir)
    apply_adapter(model, tmp_path)
    ids = helpers.token_ids()
    assert_close(helpers.logits(model, ids), helpers.logits(peft_model, ids), **helpers.TIGHT)


def test_merge_equals_peft_merge(base_dir, tmp_path, helpers):
    from peft import PeftModel
    model = philora_dora(helpers, base_dir, fused_slices={"qkv_proj": ["q", "v"]}, target_modules=["o_proj"])
    run = tmp_path / "run"
    save_run(model, run, base_dir)
    merge(str(run), str(tmp_path / "merged"))
    merged = helpers.load_model(tmp_path / "merged")
    ids = helpers.token_ids()
    assert_close(helpers.logits(merged, ids), helpers.logits(model.eval(), ids), **helpers.TIGHT)
    reference = PeftModel.from_pretrained(helpers.load_model(base_dir), run).merge_and_unload()
    want = dict(reference.named_parameters())
    for name, p in merged.named_parameters():
        assert_close(p, want[name], **helpers.TIGHT, msg=name)


def test_adapter_check_says_merge_to_deploy(base_dir, tmp_path, capsys, helpers):
    model = philora_dora(helpers, base_dir, target_modules=["o_proj"])
    save_adapter(model, tmp_path, base_dir, PeftConfig(**DORA))
    assert check_cli(tmp_path) == 1
    errors = [line for line in capsys.readouterr().out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "vLLM cannot serve DoRA" in errors[0] and "philora merge" in errors[0]


def test_plain_lora_commands_refuse_dora_in_one_line(base_dir, tmp_path, helpers):
    from philora.model.adapter import AdapterError
    from philora.export.adapter_convert import convert
    model = philora_dora(helpers, base_dir, target_modules=["o_proj"])
    save_adapter(model, tmp_path / "a", base_dir, PeftConfig(**DORA))
    with pytest.raises(AdapterError) as e:  # loralib has no magnitude: dropping it would change the model
        convert(tmp_path / "a", tmp_path / "lora.safetensors", to="loralib")
    helpers.one_line_error(e, "DoRA", "philora merge")
    assert not (tmp_path / "lora.safetensors").exists()


def test_magnitude_that_does_not_fit_is_one_line(base_dir, tmp_path, helpers):
    from philora.model.adapter import AdapterError
    model = philora_dora(helpers, base_dir, target_modules=["o_proj"])
    save_adapter(model, tmp_path, base_dir, PeftConfig(**DORA))
    from safetensors.torch import save_file
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.o_proj.lora_magnitude_vector"
    save_file({**tensors, key: torch.ones(10)}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(AdapterError) as e:
        read_adapter(tmp_path)
    helpers.one_line_error(e, "o_proj", "lora_magnitude_vector has shape (10,)")
    del tensors[key]
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(AdapterError) as e:
        read_adapter(tmp_path)
    helpers.one_line_error(e, "has no DoRA magnitude vector")


# -----------------------------------------------------------------------------
# QLoRA + DoRA

def test_4bit_dora_layer_is_the_formula(small_model_dir, helpers):
    pytest.importorskip("bitsandbytes")
    from philora.model.loading import load_model_and_tokenizer
    from philora.model.quant import dequantize_weight, prepare_quantized
    cfg = ModelConfig(name_or_path=small_model_dir, quantization="nf4", compute_dtype="float32", dtype="float32")
    model, _, _ = load_model_and_tokenizer(cfg, torch.device("cpu"), training=True)
    prepare_quantized(model)
    inject_lora(model, PeftConfig(**DORA, target_modules=["o_proj"], fused_slices={"qkv_proj": ["q", "v"]}))
    g = torch.Generator().manual_seed(0)
    for layer in (model.model.layers[0].self_attn.qkv_proj, model.model.layers[0].self_attn.o_proj):
        assert isinstance(layer, LoRALinear) and layer.use_dora and layer.base_layer is not None
        with torch.no_grad():
            layer.lora_A.normal_(0, 0.3, generator=g)
            layer.lora_B.normal_(0, 0.3, generator=g)
            layer.lora_magnitude_vector.mul_(1.2)
        # The formula on the dequantised weight: (m / ||W + sBA||) (W + sBA) x on the rows with LoRA.
        W = dequantize_weight(layer.base_layer.weight).float()
        x = torch.randn(2, 5, W.shape[1], generator=g)
        m = layer.lora_magnitude_vector.detach().clone().requires_grad_()
        A, B = layer.lora_A.detach().clone().requires_grad_(), layer.lora_B.detach().clone().requires_grad_()
        fused = layer.enable_lora is not None
        V = W + (_per_slice(layer, A, B) if fused else B @ A) * layer.scaling
        rows = layer.lora_ind if fused else torch.ones(W.shape[0], dtype=torch.bool)
        norm = torch.linalg.norm(V, dim=1).detach()  # a constant in backward, as in the paper and peft
        factor = torch.ones(W.shape[0]).index_put((rows.nonzero()[:, 0],), m / norm[rows])
        want = (x @ V.T) * factor
        got = layer(x)
        assert_close(got, want, atol=1e-4, rtol=1e-4)
        w = torch.randn(got.shape, generator=g)
        (got * w).sum().backward()
        (want * w).sum().backward()
        for mine, ref in ((layer.lora_A, A), (layer.lora_B, B), (layer.lora_magnitude_vector, m)):
            assert_close(mine.grad, ref.grad, atol=1e-4, rtol=1e-4)


def _per_slice(layer, A=None, B=None):
    """A fused layer's (out, in) B A (zero rows where no slice is enabled), from A and B."""
    A = layer.lora_A.detach() if A is None else A
    B = layer.lora_B.detach() if B is None else B
    parts, a, b = [], 0, 0
    for size, on in zip(layer.split_sizes, layer.enable_lora):
        if on:
            parts.append(B[b:b + size] @ A[a:a + layer.r])
            a, b = a + layer.r, b + size
        else:
            parts.append(torch.zeros(size, A.shape[1]))
    return torch.cat(parts)


# -----------------------------------------------------------------------------
# training runs

DORA_RUN = ["peft_config.use_dora=true", "peft_config.target_modules=[q_proj,v_proj,o_proj]",
            "peft_config.lora_dropout=0.1", "training_config.max_steps=4", "training_config.save_steps=2"]


def test_training_run_is_peft_dora_and_resumes_exactly(tmp_path, small_model_dir, small_data, recorder, helpers):
    from peft import PeftModel
    full = train(helpers.make_cfg(tmp_path / "full", small_model_dir, small_data, *DORA_RUN))
    tensors = helpers.adapter_tensors(tmp_path / "full")
    m = tensors["base_model.model.model.layers.0.self_attn.qkv_proj.lora_magnitude_vector"]
    w = helpers.load_model(small_model_dir).model.layers[0].self_attn.qkv_proj.weight
    q, k = 64, 32  # Phi-3 q_proj / v_proj: slices of qkv_proj; k keeps the base's own norm
    assert torch.equal(m[q:q + k], torch.linalg.norm(w, dim=1)[q:q + k])
    assert (m[:q] - torch.linalg.norm(w, dim=1)[:q]).abs().max() > 1e-6  # q's magnitude trained
    ids = helpers.token_ids(vocab=1000)
    peft_model = PeftModel.from_pretrained(helpers.load_model(small_model_dir), tmp_path / "full").eval()
    assert_close(helpers.logits(peft_model, ids), helpers.logits(full.model.eval(), ids), **helpers.TIGHT)
    out = tmp_path / "killed"
    recorder.steps.clear()
    recorder.kill_at = 3  # killed during step 3, after checkpoint-2
    with pytest.raises(helpers.Killed):
        train(helpers.make_cfg(out, small_model_dir, small_data, *DORA_RUN))
    recorder.kill_at = None
    train(helpers.make_cfg(out, small_model_dir, small_data, *DORA_RUN), resume=True)
    resumed = helpers.adapter_tensors(out)
    assert resumed.keys() == tensors.keys()
    for key in tensors:
        assert torch.equal(resumed[key], tensors[key]), key


def test_qlora_dora_run_merges_to_what_it_trained(tmp_path, small_model_dir, small_data, helpers):
    pytest.importorskip("bitsandbytes")
    from philora.model.loading import load_model_and_tokenizer
    from philora.model.quant import prepare_quantized
    out = tmp_path / "run"
    train(helpers.make_cfg(out, small_model_dir, small_data, *DORA_RUN, "model.quantization=nf4",
                           "training_config.max_steps=2", "training_config.save_steps=0"))
    assert "lora_magnitude_vector" in " ".join(helpers.adapter_tensors(out))
    merge(str(out), str(tmp_path / "merged"))
    merged = helpers.load_model(tmp_path / "merged")
    cfg = ModelConfig(name_or_path=small_model_dir, quantization="nf4", compute_dtype="float32")
    base, _, _ = load_model_and_tokenizer(cfg, torch.device("cpu"), training=False)
    apply_adapter(prepare_quantized(base), out)
    ids = helpers.token_ids(vocab=1000)
    assert_close(helpers.logits(merged, ids), helpers.logits(base.eval(), ids), atol=1e-4, rtol=1e-4)
