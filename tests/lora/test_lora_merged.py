"""philora.lora.MergedLinear (LoRA on slices of a fused projection such as Phi-3's qkv_proj): unequal
slices as in grouped-query attention, no enabled slice, and a forward that never builds the full
delta (loralib: only equal slices, a crash, and a delta-sized tensor per call). CPU, fp32.
"""

import loralib
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import philora.lora as lora

pytestmark = pytest.mark.usefixtures("torch_seed")


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_merged_linear_unequal_splits_gqa(fan_in_fan_out, helpers):
    with pytest.raises(AssertionError):  # loralib: only equal slices
        loralib.MergedLinear(8, 32, r=2, enable_lora=[True, False, True])
    layer = helpers.randomize_lora(lora.MergedLinear(
        8, 32, r=2, lora_alpha=4, enable_lora=[True, False, True], split_sizes=[16, 8, 8],
        fan_in_fan_out=fan_in_fan_out))
    assert layer.lora_A.shape == (4, 8) and layer.lora_B.shape == (24, 2)
    W = (layer.weight.T if fan_in_fan_out else layer.weight).detach()  # (out, in)
    b = layer.bias.detach()
    A, B = layer.lora_A.detach().clone().requires_grad_(), layer.lora_B.detach().clone().requires_grad_()
    # Reference: one nn.Linear per projection, LoRA on q (A rows 0:2) and v (A rows 2:4).
    q, k, v = nn.Linear(8, 16), nn.Linear(8, 8), nn.Linear(8, 8)
    with torch.no_grad():
        for lin, rows in ((q, slice(0, 16)), (k, slice(16, 24)), (v, slice(24, 32))):
            lin.weight.copy_(W[rows]), lin.bias.copy_(b[rows])
    x = torch.randn(2, 3, 8)
    ref = torch.cat([q(x) + (x @ A[0:2].T @ B[0:16].T) * 2, k(x),
                     v(x) + (x @ A[2:4].T @ B[16:24].T) * 2], dim=-1)
    out = layer(x)
    assert_close(out, ref, **helpers.TIGHT)
    g = torch.randn_like(out)
    out.backward(g), ref.backward(g)
    assert_close(layer.lora_A.grad, A.grad, **helpers.TIGHT)
    assert_close(layer.lora_B.grad, B.grad, **helpers.TIGHT)
    layer.eval()
    assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    merged = layer.weight.T if fan_in_fan_out else layer.weight
    assert torch.equal(merged[16:24], W[16:24])  # the k slice is untouched
    layer.train()
    assert_close(layer.weight.T if fan_in_fan_out else layer.weight, W, **helpers.TIGHT)
    with pytest.raises(ValueError):
        lora.MergedLinear(8, 32, r=2, enable_lora=[True, False, True], split_sizes=[16, 8, 4])


def test_merged_linear_with_no_enabled_slice_is_plain_linear():
    layer = lora.MergedLinear(8, 12, r=2, enable_lora=[False, False, False])
    x = torch.randn(3, 8)
    assert not hasattr(layer, "lora_A") and layer.weight.requires_grad
    W0 = layer.weight.detach().clone()
    assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=0, atol=0)
    layer.eval()
    assert torch.equal(layer.weight, W0)
    assert_close(layer(x), F.linear(x, W0, layer.bias), rtol=0, atol=0)
    with pytest.raises(AttributeError):  # loralib: forward reaches for the missing lora_A
        loralib.MergedLinear(8, 12, r=2, enable_lora=[False, False, False])(x)


class _BigTensors(TorchDispatchMode):
    """Records every op output with at least `limit` elements that is not a view of `weight`."""

    def __init__(self, limit, weight):
        super().__init__()
        self.limit, self.ptr, self.seen = limit, weight.untyped_storage().data_ptr(), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if (isinstance(t, torch.Tensor) and t.numel() >= self.limit
                    and t.untyped_storage().data_ptr() != self.ptr):
                self.seen.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("enable", [[True, True, True], [True, False, True]])
def test_merged_linear_forward_never_builds_delta(enable, monkeypatch, helpers):
    x = torch.randn(2, 3, 24)
    torch.manual_seed(1)
    theirs = helpers.randomize_lora(loralib.MergedLinear(24, 48, r=2, lora_alpha=4, enable_lora=enable))
    ours = lora.MergedLinear(24, 48, r=2, lora_alpha=4, enable_lora=enable)
    ours.load_state_dict(theirs.state_dict())
    g = torch.randn(2, 3, 48)
    # (out x in) = 1152 elements; every activation here has at most 2*3*48 = 288.
    for layer in (theirs, ours):
        with _BigTensors(48 * 24, layer.weight) as mode:
            layer(x).backward(g)
        assert bool(mode.seen) == (layer is theirs), mode.seen

    def boom(*a, **k):
        raise AssertionError("built the full delta in forward")
    monkeypatch.setattr(lora.MergedLinear, "delta_weight", boom)
    monkeypatch.setattr(lora.MergedLinear, "_merge_delta", boom)
    grads = (ours.lora_A.grad.clone(), ours.lora_B.grad.clone())
    ours.zero_grad()
    out = ours(x)
    out.backward(g)
    assert_close(out, theirs(x), **helpers.TIGHT)
    assert_close(ours.lora_A.grad, theirs.lora_A.grad, **helpers.TIGHT)
    assert_close(ours.lora_B.grad, theirs.lora_B.grad, **helpers.TIGHT)
    assert_close(grads[0], ours.lora_A.grad, rtol=0, atol=0)
