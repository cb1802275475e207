"""philora.lora's Linear and Embedding: the LoRA formula (with dropout on the LoRA branch only),
Embedding's max_norm (loralib renormalises lora_A in place), and fp32 LoRA on a bf16 base (loralib
fails). CPU, fp32 unless stated.
"""

import loralib
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import philora.lora as lora

BF16 = dict(rtol=1.6e-2, atol=1e-2)  # bf16 has an 8-bit mantissa

pytestmark = pytest.mark.usefixtures("torch_seed")


# ----------------------------------------------------------------------------- formula ---------

@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_linear_formula(fan_in_fan_out, helpers):
    layer = helpers.randomize_lora(lora.Linear(8, 6, r=2, lora_alpha=5, fan_in_fan_out=fan_in_fan_out))
    x = torch.randn(2, 3, 8)
    W = layer.weight.T if fan_in_fan_out else layer.weight  # (out, in)
    ref = x @ W.T + layer.bias + (x @ layer.lora_A.T @ layer.lora_B.T) * 2.5
    assert_close(layer(x), ref, **helpers.TIGHT)


def test_linear_formula_with_dropout_reproduced_mask(helpers):
    layer = helpers.randomize_lora(lora.Linear(8, 6, r=2, lora_alpha=6, lora_dropout=0.3))
    x = torch.randn(4, 8)
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)
    x_drop = F.dropout(x, 0.3, training=True)
    assert not torch.equal(x_drop, x)
    A, B = layer.lora_A, layer.lora_B
    assert_close(out, x @ layer.weight.T + layer.bias + (x_drop @ A.T @ B.T) * 3, **helpers.TIGHT)
    # The mask is on the LoRA branch only; eval (merged) has no dropout at all.
    assert not torch.allclose(out, x @ layer.weight.T + layer.bias + (x @ A.T @ B.T) * 3)
    layer.eval()
    assert_close(layer(x), x @ layer.weight.T + layer.bias, **helpers.TIGHT)


def test_embedding_formula(helpers):
    layer = helpers.randomize_lora(lora.Embedding(10, 6, r=3, lora_alpha=6))
    ids = torch.randint(0, 10, (2, 5))
    ref = layer.weight[ids] + (layer.lora_A.T[ids] @ layer.lora_B.T) * 2
    assert_close(layer(ids), ref, **helpers.TIGHT)


# ------------------------------------------------------------------------ loralib bugs ---------

def test_embedding_max_norm_does_not_touch_lora_A(helpers):
    ids = torch.tensor([[1, 2, 3, 2]])
    for L in (lora, loralib):
        torch.manual_seed(0)
        layer = helpers.randomize_lora(L.Embedding(10, 4, r=2, lora_alpha=2, max_norm=1.0), std=3.0)
        A0, W0 = layer.lora_A.detach().clone(), layer.weight.detach().clone()
        out = layer(ids)
        if L is loralib:  # renormalised columns of lora_A in place
            assert not torch.equal(layer.lora_A, A0)
            continue
        assert torch.equal(layer.lora_A, A0)
        ref = F.embedding(ids, W0, max_norm=1.0) + A0.T[ids] @ layer.lora_B.T
        assert_close(out, ref, **helpers.TIGHT)
        assert_close(layer(ids), ref, **helpers.TIGHT)  # and again: nothing drifted


# ------------------------------------------------------------ fp32 LoRA on a bf16 base ---------

def test_fp32_lora_on_bf16_base_linear(helpers):
    def make(L):
        torch.manual_seed(2)
        layer = helpers.randomize_lora(L.Linear(32, 16, r=4, lora_alpha=8))
        layer.weight.data, layer.bias.data = layer.weight.data.bfloat16(), layer.bias.data.bfloat16()
        return layer
    layer = make(lora)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    x = torch.randn(3, 32).bfloat16()
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    ref = x.float() @ layer.weight.float().T + layer.bias.float() + (x.float() @ A.T @ B.T) * 2
    out = layer(x)
    assert out.dtype == torch.bfloat16
    assert_close(out.float(), ref, **BF16)
    out.float().sum().backward()
    assert layer.lora_B.grad.dtype == torch.float32 and layer.lora_B.grad.abs().sum() > 0
    W_merged = (layer.weight.float() + (B @ A) * 2).bfloat16()  # merging rounds W + delta once
    layer.eval()
    assert layer.weight.dtype == torch.bfloat16 and torch.equal(layer.weight, W_merged)
    ref_merged = x.float() @ W_merged.float().T + layer.bias.float()
    assert_close(layer(x).float(), ref_merged, **BF16)
    layer.train()  # unmerging rounds again: back to W up to one bf16 step of W + delta
    assert_close(layer.weight.float(), make(lora).weight.float(), rtol=0, atol=2 ** -7 * 4)
    with pytest.raises(RuntimeError):  # loralib: bf16 input @ fp32 lora_A
        make(loralib)(x)
