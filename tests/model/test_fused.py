"""fused.py: the pipeline's one-autograd-function LoRA layers compute what the plain layers and
the formula compute (outputs and every gradient), keep less for backward, and are the plain
layers outside training."""

import pytest
import torch
import torch.nn as nn

from philora.model import fused
from philora import lora
from philora.core.config import PeftConfig
from philora.model.dropout import LEVELS, MIN_NUMEL, Dropout, keep_mask
from philora.model.inject import inject_lora

IN, OUT, R = 96, 90, 4
KINDS = {  # name: (plain constructor, fused constructor, extra constructor arguments)
    "linear": (lora.Linear, fused.Linear, {}),
    "conv1d_layout": (lora.Linear, fused.Linear, {"fan_in_fan_out": True}),
    "merged_q_v_unequal": (lora.MergedLinear, fused.MergedLinear,
                           {"enable_lora": [True, False, True], "split_sizes": [40, 20, 30]}),
    "merged_all": (lora.MergedLinear, fused.MergedLinear, {"enable_lora": [True, True, True]}),
}


def pair(kind, p, dtype=torch.float32, train_bias=False):
    """(plain, fused) layers with the same random weights; LoRA factors float32."""
    plain_cls, fused_cls, extra = KINDS[kind]
    torch.manual_seed(0)
    a = plain_cls(IN, OUT, r=R, lora_alpha=8, **extra)
    for t in (a.lora_A, a.lora_B, a.bias):
        nn.init.normal_(t, std=0.3)
    a.weight.data = a.weight.data.to(dtype)
    a.bias.data = a.bias.data.to(dtype)
    b = fused_cls(IN, OUT, r=R, lora_alpha=8, **extra)
    b.weight.data, b.bias.data = a.weight.data.clone(), a.bias.data.clone()
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        m.lora_dropout = Dropout(p) if p else nn.Identity()
        m.bias.requires_grad = train_bias
    return a.train(), b.train()


def run(layer, x, g, seed=7):
    """Output and gradients (x, A, B, bias) of one forward/backward at ``seed``."""
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = layer(x)
    y.backward(g)
    grads = [x.grad, layer.lora_A.grad, layer.lora_B.grad, layer.bias.grad]
    layer.zero_grad(set_to_none=True)
    return [y.detach()] + grads


def formula(layer, x, keep, scale):
    """x W.T + b + ((x * keep * scale) A.T B_i.T) * scaling per enabled slice, in float64."""
    W = layer.weight.double()
    W = W.T if layer.fan_in_fan_out else W
    xd = x.double() * keep.double() * scale
    h = xd @ layer.lora_A.double().T * layer.scaling
    delta = torch.zeros(*x.shape[:-1], layer.out_features, dtype=torch.float64)
    for o0, size, a, b in layer.blocks():
        delta[..., o0:o0 + size] = h[..., a] @ layer.lora_B.double()[b].T
    return x.double() @ W.T + layer.bias.double() + delta


def close(v, u, rel=1e-5):
    """Equal up to float rounding: a gradient is a sum over tokens, so its rounding scales with
    its largest entries, not with each (possibly cancelled-out) entry."""
    torch.testing.assert_close(v, u, rtol=rel, atol=rel * max(1.0, u.abs().max().item()))


def tokens_for_fast_mask():
    """(rows, length) so rows * length * IN >= MIN_NUMEL: the plain Dropout draws keep_mask too."""
    return 2, -(-MIN_NUMEL // (2 * IN))


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("train_bias", [False, True])
def test_fused_equals_plain_and_formula(kind, p, train_bias):
    a, b = pair(kind, p, train_bias=train_bias)
    rows, length = tokens_for_fast_mask()
    x = torch.randn(rows, length, IN)
    g = torch.randn(rows, length, OUT)
    plain, fast = run(a, x, g), run(b, x, g)
    assert type(b(x.requires_grad_()).grad_fn).__name__ == "_LoRALinearBackward"
    for u, v in zip(plain, fast):
        if u is None:
            assert v is None  # a frozen bias gets no gradient on either path
        else:
            close(v, u)
    # The formula with the mask the same seed draws (dropout.keep_mask: torch's RNG seeds it).
    torch.manual_seed(7)
    keep = keep_mask((rows * length, IN), p).reshape(x.shape) if p else torch.ones_like(x, dtype=torch.bool)
    scale = LEVELS / (LEVELS - round(p * LEVELS))
    close(fast[0].double(), formula(b, x, keep, scale))


@pytest.mark.parametrize("kind", ["linear", "merged_q_v_unequal"])
def test_gradients_by_finite_differences(kind):
    plain_cls, fused_cls, extra = KINDS[kind]
    torch.manual_seed(1)
    layer = fused_cls(12, 9 if kind == "linear" else 90, r=2, lora_alpha=4, **extra).double()
    nn.init.normal_(layer.lora_B)
    layer.bias.requires_grad = True
    blks = layer.blocks()
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)

    def f(x, A, B, bias):
        return fused._LoRALinear.apply(x, None, layer.weight, bias, A, B, layer.scaling, 0.0, False,
                                       blks, torch.float64)
    assert torch.autograd.gradcheck(f, (x, layer.lora_A, layer.lora_B, layer.bias))


def test_bf16_base_with_float32_factors():
    a, b = pair("merged_q_v_unequal", 0.0, dtype=torch.bfloat16)
    x = torch.randn(2, 30, IN).to(torch.bfloat16)
    g = torch.randn(2, 30, OUT).to(torch.bfloat16)
    plain, fast = run(a, x, g), run(b, x, g)
    assert fast[0].dtype == torch.bfloat16 and fast[1].dtype == torch.bfloat16
    assert fast[2].dtype == torch.float32  # the factors' gradients stay float32
    for u, v in zip(plain[:3], fast[:3]):  # the same ops in the same dtypes: bf16 rounding at most
        torch.testing.assert_close(v, u, rtol=1e-2, atol=1e-2)


def test_autocast_bf16_model_takes_the_fused_path():
    a, b = pair("linear", 0.0, dtype=torch.bfloat16)
    x = torch.randn(2, 30, IN).to(torch.bfloat16).requires_grad_()
    assert fused.compute_dtype(b, x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused.compute_dtype(b, x) == torch.bfloat16  # the LoRA matmuls in bf16, as autocast
        assert fused.compute_dtype(b, x.float()) is None  # any other mix: the plain path
        ya, yb = a(x), b(x)
    assert type(yb.grad_fn).__name__ == "_LoRALinearBackward"
    torch.testing.assert_close(yb.float(), ya.float(), rtol=2e-2, atol=2e-2)


def test_plain_outside_training():
    a, b = pair("merged_all", 0.1)
    x = torch.randn(2, 7, IN)
    with torch.no_grad():  # training mode without gradients: the plain layer, its dropout included
        torch.manual_seed(3)
        yb = b(x)
        torch.manual_seed(3)
        assert torch.equal(yb, a(x))
    a.eval(), b.eval()
    assert torch.equal(b(x), a(x))
    b.lora_dropout = nn.AlphaDropout(0.1)  # an unknown dropout: the plain path, which calls it
    b.train()
    assert type(b(x.requires_grad_()).grad_fn).__name__ != "_LoRALinearBackward"


def saved_bytes(layer, x):
    """Bytes autograd keeps for backward of one forward (parameters excluded)."""
    params = {p.data_ptr() for p in layer.parameters()}
    seen = {}

    def pack(t):
        if t.data_ptr() not in params:
            seen[t.data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(seen.values())


def test_keeps_less_for_backward_than_the_plain_path():
    a, b = pair("linear", 0.1)
    x = torch.randn(*tokens_for_fast_mask(), IN, requires_grad=True)
    plain, fast = saved_bytes(a, x), saved_bytes(b, x)
    # plain: the dropped copy (4 B per input element), the mask (1 B), the scaled x A.T;
    # fused: the masked input (4 B) and the scaled x A.T (the mask is redrawn from its seed)
    assert plain - fast == x.numel()
    a, b = pair("linear", 0.0)
    assert saved_bytes(b, x) <= saved_bytes(a, x)


def test_inject_builds_the_fused_layers_with_loralib_keys():
    model = nn.Sequential(nn.Linear(IN, OUT), nn.Linear(OUT, IN))
    ref = nn.Sequential(lora.Linear(IN, OUT, r=4, lora_alpha=8), lora.Linear(OUT, IN, r=4, lora_alpha=8))
    inject_lora(model, PeftConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["0", "1"]))
    assert all(type(m) is lora.LoRALinear and m.fast_path is fused.forward for m in model)
    assert sorted(lora.lora_state_dict(model)) == sorted(lora.lora_state_dict(ref))
    assert sorted(model.state_dict()) == sorted(ref.state_dict())


def plain_copy(model):
    """The same model object graph with the fused path switched off (philora.lora's plain path)."""
    for m in model.modules():
        if isinstance(m, lora.LoRALinear) and m.fast_path is fused.forward:
            m.fast_path = None
    return model


def test_whole_model_loss_and_gradients_match_the_plain_layers(helpers):
    from philora.model.loss import CausalLMLoss
    model = helpers.lora_phi3().train()
    assert any(getattr(m, "fast_path", None) is fused.forward for m in model.modules())
    ids = torch.randint(3, 128, (2, 24))
    batch = {"input_ids": ids, "labels": ids.clone(),
             "position_ids": torch.cat([torch.arange(10), torch.arange(14)]).expand(2, -1)}

    def loss_and_grads(m):
        loss, n = CausalLMLoss(m)(batch)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in m.named_parameters() if p.requires_grad}
        m.zero_grad(set_to_none=True)
        return loss.detach(), grads

    fast_loss, fast_grads = loss_and_grads(model)
    plain_loss, plain_grads = loss_and_grads(plain_copy(model))
    torch.testing.assert_close(fast_loss, plain_loss, **helpers.TIGHT)
    assert fast_grads.keys() == plain_grads.keys() and len(fast_grads) > 0
    for k in fast_grads:
        torch.testing.assert_close(fast_grads[k], plain_grads[k], **helpers.TIGHT)


def test_4bit_base_trains_through_the_fused_lora_half():
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    from philora.model.inject import Target, lora_layer
    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(IN, OUT, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    base.load_state_dict(nn.Linear(IN, OUT).state_dict())
    base = base.to("cpu")
    layer = lora_layer(base, Target("q"), PeftConfig(r=4, lora_alpha=8, lora_dropout=0.0))
    nn.init.normal_(layer.lora_B, std=0.3)
    layer.train()
    x = torch.randn(2, 9, IN, requires_grad=True)
    y = layer(x)
    assert type(y.grad_fn).__name__ == "_LoRALinearBackward"
    g = torch.randn_like(y)
    y.backward(g)
    fast = [y.detach(), x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()]
    x.grad, layer.lora_A.grad, layer.lora_B.grad = None, None, None
    ref = layer.base_layer(x) + layer.lora_forward(x)  # the plain path, written out
    ref.backward(g)
    for u, v in zip([ref.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad], fast):
        close(v, u)
