"""lora/dropout.py: the CPU mask is dropout (right rate, scale, gradient) and reproducible."""

import torch
import torch.nn as nn

from philora.core.config import PeftConfig
from philora import lora
from philora.model.dropout import LEVELS, MIN_NUMEL, Dropout, cpu_dropout


def test_rate_scale_and_expectation():
    torch.manual_seed(0)
    x = torch.ones(1000, 1000)
    y = cpu_dropout(x, 0.05)
    kept = y != 0
    scale = LEVELS / (LEVELS - round(0.05 * LEVELS))
    assert abs(kept.float().mean().item() - 0.95) < 1e-3  # 1M draws: sd ~2e-4
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], scale))
    assert abs(y.mean().item() - 1.0) < 1e-3


def test_gradient_is_the_same_mask_and_scale():
    torch.manual_seed(1)
    x = torch.randn(300, 300, requires_grad=True)
    g = torch.randn(300, 300)
    y = cpu_dropout(x, 0.3)
    y.backward(g)
    keep = y != 0
    scale = LEVELS / (LEVELS - round(0.3 * LEVELS))
    torch.testing.assert_close(x.grad, g * keep * scale)
    torch.testing.assert_close(y, x.detach() * keep * scale)


def test_manual_seed_reproduces_and_masks_differ_per_call():
    x = torch.randn(400, 400)
    torch.manual_seed(3)
    a, b = cpu_dropout(x, 0.1), cpu_dropout(x, 0.1)
    torch.manual_seed(3)
    assert torch.equal(cpu_dropout(x, 0.1), a)
    assert not torch.equal(a, b)


def test_module_uses_it_only_where_it_pays():
    d = Dropout(0.2)
    assert isinstance(d, nn.Dropout)
    big, small = torch.randn(MIN_NUMEL), torch.randn(100)
    torch.manual_seed(4)
    out = d(small)
    torch.manual_seed(4)
    assert torch.equal(out, nn.functional.dropout(small, 0.2, True))  # F.dropout's own mask
    torch.manual_seed(4)
    fast = d(big)
    torch.manual_seed(4)
    assert torch.equal(fast, cpu_dropout(big, 0.2))
    assert torch.equal(d.eval()(big), big)


def test_philora_lora_keeps_nn_dropout_like_loralib():
    # The drop-in draws loralib's exact masks; only the pipeline (inject) uses the fast mask.
    layer = lora.Linear(512, 256, r=4, lora_alpha=8, lora_dropout=0.1)
    assert type(layer.lora_dropout) is nn.Dropout


def test_injected_lora_dropout_uses_the_fast_mask():
    from philora.model.inject import inject_lora

    model = nn.Sequential(nn.Linear(512, 256))
    inject_lora(model, PeftConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["0"]))
    assert type(model[0].lora_dropout) is Dropout


def test_lora_linear_dropout_touches_only_the_lora_branch():
    layer = lora.Linear(512, 256, r=4, lora_alpha=8, lora_dropout=0.1)
    layer.lora_dropout = Dropout(0.1)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(300, 512)
    torch.manual_seed(5)
    out = layer(x)
    torch.manual_seed(5)
    x_drop = cpu_dropout(x, 0.1)
    ref = x @ layer.weight.T + layer.bias + (x_drop @ layer.lora_A.T @ layer.lora_B.T) * 2
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
