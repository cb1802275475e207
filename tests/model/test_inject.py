"""philora.model.inject: which modules get LoRA (as PEFT decides), per-slice LoRA on Phi-3's fused
projections (checked against a hand-computed reference), weight sharing and freezing."""

import copy
import math

import pytest
import torch
from torch.testing import assert_close
from transformers import Phi3Config, Phi3ForCausalLM

from philora.core.config import PeftConfig
from philora import lora
from philora.core.errors import PhiloraError
from philora.model.inject import InjectError, count_parameters, find_targets, inject_lora, linear_names
from philora.lora import lora_layers

HIDDEN, HEADS, KV_HEADS, INTER = 64, 4, 2, 96
HEAD_DIM = HIDDEN // HEADS
QKV_SIZES = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM)  # GQA: 64, 32, 32


def tiny_phi3(seed=0):
    config = Phi3Config(vocab_size=128, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2,
                        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
                        original_max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0,
                        attn_implementation="eager")
    torch.manual_seed(seed)
    return Phi3ForCausalLM(config).eval()


@pytest.fixture
def ids():
    return torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def randomize_lora(model, seed=3):
    """Nonzero LoRA factors (B starts at zero), so the updates are visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.2)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.2)


def peft_targets(target_modules):
    """The module names PEFT puts LoRA on, for the same model and target_modules."""
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(tiny_phi3(), LoraConfig(r=2, lora_alpha=4, target_modules=target_modules))
    prefix = "base_model.model."
    return {n[len(prefix):] for n, m in model.named_modules() if hasattr(m, "lora_A")}


LINEARS = {f"model.layers.{i}.{m}" for i in range(2)
           for m in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")}


def test_all_linear_is_every_linear_but_lm_head():
    model = tiny_phi3()
    assert set(linear_names(model)) == LINEARS
    targets = inject_lora(model, PeftConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    assert set(targets) == LINEARS == set(lora_layers(model))
    assert not isinstance(model.lm_head, lora.LoRALayer)
    assert set(targets) == peft_targets("all-linear")


@pytest.mark.parametrize("target_modules", [
    ["qkv_proj", "o_proj"],
    ["down_proj"],
    ["self_attn.o_proj", "gate_up_proj"],
    ["layers.1.mlp.down_proj"],
    ["model.layers.0.self_attn.qkv_proj"],
    r".*layers\.1\.(self_attn|mlp)\.\w+_proj",
    r".*\.0\.mlp\.down_proj",
    r".*_proj",
])
def test_targets_match_peft(target_modules):
    targets = find_targets(tiny_phi3(), target_modules)
    assert all(t.slices is None for t in targets.values())
    assert set(targets) == peft_targets(target_modules)
    assert targets  # every case selects something


@pytest.mark.parametrize("target_modules, fused_slices, needle", [
    (["q_projj"], None, "'q_projj'"),
    (["lm_head"], None, "'lm_head'"),
    (["proj"], None, "'proj'"),  # a suffix must be a whole dotted part, as in PEFT
    (r"layers\.0\.mlp\.down_proj", None, "regex"),  # a regex must match the whole name
    ([], None, "target_modules"),
    ([], {"qkv_proj": ["x"]}, "'x'"),
    ([], {"o_proj": ["q"]}, "'o_proj'"),
    ([], {"qkv": ["q"]}, "'qkv'"),
    ("all-linear", {"gate_up_proj": ["q"]}, "'q'"),
])
def test_bad_targets_raise_one_line(target_modules, fused_slices, needle):
    model = tiny_phi3()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(InjectError) as e:
        inject_lora(model, PeftConfig(r=4, lora_alpha=8, target_modules=target_modules, fused_slices=fused_slices, lora_dropout=0.0))
    msg = str(e.value)
    assert isinstance(e.value, PhiloraError) and "\n" not in msg and needle in msg, msg
    assert "peft_config" in msg
    assert not lora_layers(model)  # nothing injected
    assert model.state_dict().keys() == before.keys()


def test_no_match_lists_the_linear_modules():
    with pytest.raises(InjectError) as e:
        inject_lora(tiny_phi3(), PeftConfig(r=4, lora_alpha=8, target_modules=["q_projj"], lora_dropout=0.0))
    for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
        assert name in str(e.value)


def test_rank_must_be_positive():
    with pytest.raises(InjectError, match="peft_config.r"):
        inject_lora(tiny_phi3(), PeftConfig(r=0, lora_alpha=8, lora_dropout=0.0))


def test_output_unchanged_at_init_and_only_lora_trainable(ids):
    model = tiny_phi3()
    reference = copy.deepcopy(model)
    weights = {n: p.data_ptr() for n, p in model.named_parameters()}
    inject_lora(model, PeftConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear", fused_slices={"gate_up_proj": ["up"]}))
    # the base tensors are the model's own, not copies
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert p.data_ptr() == weights[n], n
    for name, layer in lora_layers(model).items():
        assert layer.weight.data_ptr() == weights[f"{name}.weight"]
        assert torch.count_nonzero(layer.lora_A) > 0 and torch.count_nonzero(layer.lora_B) == 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{x}" for n in LINEARS for x in "AB"}
    n_train, n_total = count_parameters(model)
    assert n_train == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    assert n_total == sum(p.numel() for p in reference.parameters()) + n_train
    # B = 0: the same function as the unmodified model, exactly
    with torch.no_grad():
        assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)
    # the eval/train mode of the model carries over to the new layers
    assert all(not m.training for m in lora_layers(model).values())


@pytest.mark.parametrize("bias, extra", [("none", set()), ("all", {"bias"}), ("lora_only", {"bias"})])
def test_bias_trainable_per_setting(bias, extra):
    config = tiny_phi3().config
    model = tiny_phi3()
    # Phi-3 has no biases: give o_proj one so the setting has something to act on
    model.model.layers[0].self_attn.o_proj = torch.nn.Linear(HIDDEN, HIDDEN, bias=True)
    model.requires_grad_(True)
    inject_lora(model, PeftConfig(r=2, lora_alpha=4, target_modules=["o_proj"], bias=bias, lora_dropout=0.0))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora_names = {n for n in trainable if "lora_" in n}
    assert {n.rsplit(".", 1)[-1] for n in trainable - lora_names} == extra
    assert config.model_type == "phi3"


def test_per_slice_qkv_matches_hand_computed_reference(ids):
    model = tiny_phi3()
    reference = copy.deepcopy(model)
    r, alpha = 4, 6.0
    targets = inject_lora(model, PeftConfig(r=r, lora_alpha=alpha, target_modules=[], fused_slices={"qkv_proj": ["v", "q"]}, lora_dropout=0.0))
    assert set(targets) == {f"model.layers.{i}.self_attn.qkv_proj" for i in range(2)}
    randomize_lora(model)
    scaling = alpha / r
    for i in range(2):
        t = targets[f"model.layers.{i}.self_attn.qkv_proj"]
        assert t.slices == ("q", "v") and t.split_sizes == QKV_SIZES
        layer = model.model.layers[i].self_attn.qkv_proj
        assert isinstance(layer, lora.LoRALinear) and layer.enable_lora is not None
        assert layer.enable_lora == [True, False, True] and list(layer.split_sizes) == list(QKV_SIZES)
        assert layer.lora_A.shape == (2 * r, HIDDEN) and layer.lora_B.shape == (QKV_SIZES[0] + QKV_SIZES[2], r)
        # one layer on its own: base + slice-wise B A x * scaling, k rows untouched
        x = torch.randn(3, 5, HIDDEN, generator=torch.Generator().manual_seed(i))
        A, B, W = layer.lora_A.detach(), layer.lora_B.detach(), layer.weight.detach()
        q, k, v = QKV_SIZES
        expected = x @ W.T
        expected[..., :q] += (x @ A[:r].T) @ B[:q].T * scaling
        expected[..., q + k:] += (x @ A[r:].T) @ B[q:].T * scaling
        with torch.no_grad():
            assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
        # the whole model: same logits as the unmodified model with W + delta written in by hand
        delta = torch.zeros_like(W, dtype=torch.float64)
        delta[:q] = (B[:q].double() @ A[:r].double()) * scaling
        delta[q + k:] = (B[q:].double() @ A[r:].double()) * scaling
        with torch.no_grad():
            ref_layer = reference.model.layers[i].self_attn.qkv_proj
            ref_layer.weight.copy_((ref_layer.weight.double() + delta).float())
    with torch.no_grad():
        assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target_modules, fused_slices, expected", [
    (["q_proj", "v_proj"], None, {"qkv_proj": [True, False, True]}),
    (["k_proj"], None, {"qkv_proj": [False, True, False]}),
    (["gate_proj", "up_proj", "o_proj"], None, {"gate_up_proj": [True, True], "o_proj": None}),
    (["up_proj"], {"qkv_proj": ["q"]}, {"gate_up_proj": [False, True], "qkv_proj": [True, False, False]}),
    # a per-slice request overrides a whole-module target of the same module
    ("all-linear", {"qkv_proj": ["q", "v"]},
     {"qkv_proj": [True, False, True], "o_proj": None, "gate_up_proj": None, "down_proj": None}),
])
def test_cookbook_names_map_to_slices(target_modules, fused_slices, expected):
    model = tiny_phi3()
    targets = inject_lora(model, PeftConfig(r=2, lora_alpha=4, target_modules=target_modules, fused_slices=fused_slices, lora_dropout=0.0))
    got = {}
    for name, layer in lora_layers(model).items():
        short = name.rsplit(".", 1)[-1]
        got[short] = layer.enable_lora
        assert targets[name].name == name
    assert got == expected
    assert set(targets) == {n for n in LINEARS if n.rsplit(".", 1)[-1] in expected}
    for name, layer in lora_layers(model).items():
        if name.endswith("gate_up_proj") and layer.enable_lora is not None:
            assert list(layer.split_sizes) == [INTER, INTER]


def test_same_function_as_peft_with_the_same_factors(ids):
    """All-linear LoRA with nonzero factors: philora's model and PEFT's give the same logits."""
    from peft import LoraConfig, get_peft_model
    model = tiny_phi3()
    inject_lora(model, PeftConfig(r=4, lora_alpha=12, target_modules="all-linear", use_rslora=True, lora_dropout=0.0))
    randomize_lora(model)
    ref = get_peft_model(tiny_phi3(), LoraConfig(r=4, lora_alpha=12, target_modules="all-linear", use_rslora=True))
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            assert layer.scaling == pytest.approx(12 / math.sqrt(4))
            peft_layer = ref.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
        out, expected = model(ids).logits, ref(ids).logits
    assert (out - model.lm_head(model.model(ids).last_hidden_state)).abs().max() == 0
    assert_close(out, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        plain = tiny_phi3()(ids).logits
    assert (out - plain).abs().max() > 1e-2  # the adapter does change the function


def test_dropout_only_in_training():
    model = tiny_phi3()
    inject_lora(model, PeftConfig(r=2, lora_alpha=4, lora_dropout=0.5, target_modules=["o_proj"]))
    layer = model.model.layers[0].self_attn.o_proj
    assert isinstance(layer.lora_dropout, torch.nn.Dropout) and layer.lora_dropout.p == 0.5
    model.train()
    assert layer.lora_dropout.training
    model.eval()
    assert not layer.lora_dropout.training
