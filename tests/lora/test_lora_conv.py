"""philora.lora's ConvLoRA (Conv1d, Conv2d, Conv3d): any kernel shape and groups against torch's
functional conv (loralib fails or is wrong on most), and lora_dropout, which loralib ignores on
convs. CPU, fp32.
"""

import math

import loralib
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import philora.lora as lora

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

pytestmark = pytest.mark.usefixtures("torch_seed")


def conv_reference(layer, x, delta, x_lora=None):
    """conv(x, W) + conv(x_lora, delta) with torch's functional conv (delta: helpers.expected_delta)."""
    c = layer.conv
    kw = dict(stride=c.stride, padding=c.padding, dilation=c.dilation, groups=c.groups)
    fn = CONV[c.weight.dim() - 2]
    if x_lora is None:
        return fn(x, c.weight + delta, c.bias, **kw)
    return fn(x, c.weight, c.bias, **kw) + fn(x_lora, delta, None, **kw)


@pytest.mark.parametrize("make,shape,loralib_error", [
    (lambda L: L.Conv1d(4, 6, 3, r=2, lora_alpha=4, padding=1), (2, 4, 9), RuntimeError),
    (lambda L: L.Conv1d(4, 6, 3, r=2, groups=2, stride=2), (2, 4, 9), RuntimeError),
    (lambda L: L.Conv3d(2, 4, 3, r=2, padding=1), (2, 2, 4, 5, 3), RuntimeError),
    (lambda L: L.Conv3d(2, 4, (1, 3, 2), r=2), (2, 2, 4, 5, 3), AssertionError),
    (lambda L: L.Conv2d(4, 6, (3, 5), r=2, padding=(1, 2)), (2, 4, 7, 8), AssertionError),
    (lambda L: L.Conv2d(4, 6, 3, r=2, lora_alpha=8, groups=2), (2, 4, 6, 6), None),
], ids=["conv1d_k3", "conv1d_k3_groups", "conv3d_k3", "conv3d_tuple", "conv2d_tuple",
        "conv2d_groups"])
def test_conv_any_kernel_and_groups(make, shape, loralib_error, helpers):
    layer = helpers.randomize_lora(make(lora))
    x = torch.randn(shape)
    kernel = layer.conv.kernel_size
    assert layer.lora_A.shape == (2 * kernel[0], layer.conv.in_channels * math.prod(kernel[1:]))
    ref = conv_reference(layer, x, helpers.expected_delta(layer))
    out = layer(x)
    assert_close(out, ref, **helpers.TIGHT)
    out.square().sum().backward()
    assert layer.lora_A.grad.abs().sum() > 0 and layer.conv.weight.grad is None
    assert_close(layer.eval()(x), ref, rtol=1e-5, atol=1e-5)
    if loralib_error is None:  # loralib gets this one right: same numbers.
        theirs = make(loralib)
        theirs.load_state_dict(layer.train().state_dict())
        assert_close(theirs(x), ref, **helpers.TIGHT)
    else:
        with pytest.raises(loralib_error):
            make(loralib)(x)


def test_conv_applies_lora_dropout(helpers):
    make = lambda L, p: L.Conv2d(4, 6, 3, r=2, lora_alpha=4, lora_dropout=p, padding=1)  # noqa
    layer = helpers.randomize_lora(make(lora, 0.5))
    no_drop = make(lora, 0.0)
    no_drop.load_state_dict(layer.state_dict())
    x = torch.randn(2, 4, 6, 6)
    torch.manual_seed(5)
    out = layer(x)
    torch.manual_seed(5)
    x_drop = F.dropout(x, 0.5, training=True)
    assert_close(out, conv_reference(layer, x, helpers.expected_delta(layer), x_lora=x_drop), **helpers.TIGHT)
    assert not torch.allclose(out, no_drop(x), atol=1e-3)
    assert_close(layer.eval()(x), no_drop(x), rtol=1e-5, atol=1e-5)  # no dropout in eval
    # loralib ignores lora_dropout on convs: its train output is the no-dropout one.
    theirs = make(loralib, 0.5)
    theirs.load_state_dict(no_drop.state_dict())
    assert_close(theirs(x), no_drop(x), **helpers.TIGHT)
