"""philora.lora is a drop-in for loralib 0.1.2, with loralib's bugs fixed.

Sections: (1) drop-in contract, (2) cross-loading with the real loralib, (3) the LoRA formula,
(4) one test per loralib bug (running loralib too where it can, so each test documents the bug),
(5) fp32 adapters on a bf16 base. CPU, fp32 unless stated, a few seconds in all.
"""

import copy
import inspect
import math
import pickle

import loralib
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import philora.lora as lora

TIGHT = dict(rtol=1e-5, atol=1e-5)  # fp32: only the order of summation may differ
BF16 = dict(rtol=1.6e-2, atol=1e-2)  # bf16 has an 8-bit mantissa
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randomize_lora(model, std=0.5):
    """Non-zero LoRA factors (B starts at zero, which would hide every bug in the update)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0.0, std)
    return model


def base_weight(layer):
    return layer.conv.weight if hasattr(layer, "conv") else layer.weight


def expected_delta(layer):
    """The update to the base weight, computed here from A, B and alpha/r, in its layout."""
    A, B, s = layer.lora_A.detach(), layer.lora_B.detach(), layer.lora_alpha / layer.r
    if isinstance(layer, lora.Embedding):
        return (B @ A).T * s
    if isinstance(layer, lora.ConvLoRA):
        return (B @ A).reshape(layer.conv.weight.shape) * s
    if isinstance(layer, lora.MergedLinear):
        delta, a, b, out0 = torch.zeros(layer.out_features, layer.in_features), 0, 0, 0
        for size, on in zip(layer.split_sizes, layer.enable_lora):
            if on:
                delta[out0:out0 + size] = B[b:b + size] @ A[a:a + layer.r]
                a, b = a + layer.r, b + size
            out0 += size
        return (delta.T if layer.fan_in_fan_out else delta) * s
    return (B @ A).T * s if layer.fan_in_fan_out else (B @ A) * s


def conv_reference(layer, x, x_lora=None):
    """conv(x, W) + conv(x_lora, delta) with torch's functional conv, delta from expected_delta."""
    c = layer.conv
    kw = dict(stride=c.stride, padding=c.padding, dilation=c.dilation, groups=c.groups)
    fn = CONV[c.weight.dim() - 2]
    if x_lora is None:
        return fn(x, c.weight + expected_delta(layer), c.bias, **kw)
    return fn(x, c.weight, c.bias, **kw) + fn(x_lora, expected_delta(layer), None, **kw)


# Layers built identically by both libraries (L is loralib or philora.lora), with an input each.
CASES = {
    "linear": (lambda L: L.Linear(8, 6, r=2, lora_alpha=4), (2, 5, 8)),
    "linear_fifo": (lambda L: L.Linear(8, 6, r=2, lora_alpha=3, fan_in_fan_out=True), (2, 5, 8)),
    "linear_r0": (lambda L: L.Linear(8, 6), (2, 5, 8)),
    "embedding": (lambda L: L.Embedding(10, 6, r=3, lora_alpha=6, padding_idx=0), "ids"),
    "merged": (lambda L: L.MergedLinear(8, 12, r=2, lora_alpha=4,
                                        enable_lora=[True, False, True]), (2, 5, 8)),
    "merged_all": (lambda L: L.MergedLinear(8, 12, r=2, enable_lora=[True] * 3), (2, 5, 8)),
    "merged_fifo": (lambda L: L.MergedLinear(8, 12, r=2, lora_alpha=2, fan_in_fan_out=True,
                                             enable_lora=[False, True, True]), (2, 5, 8)),
    "conv2d": (lambda L: L.Conv2d(4, 6, 3, r=2, lora_alpha=4, padding=1), (2, 4, 7, 7)),
    "conv2d_groups": (lambda L: L.Conv2d(4, 6, 3, r=2, groups=2), (2, 4, 6, 6)),
    "conv1d_k1": (lambda L: L.Conv1d(4, 6, 1, r=2, lora_alpha=8), (2, 4, 9)),
    "conv3d_k1": (lambda L: L.Conv3d(4, 6, 1, r=2), (2, 4, 3, 4, 5)),
}
LORA_CASES = [k for k in CASES if k != "linear_r0"]


def make_input(spec):
    return torch.randint(0, 10, (2, 5)) if spec == "ids" else torch.randn(spec)


def build_pair(name):
    """The same layer from loralib and philora (same seed), with random, equal LoRA factors."""
    make, spec = CASES[name]
    torch.manual_seed(1)
    theirs = make(loralib)
    torch.manual_seed(1)
    ours = make(lora)
    randomize_lora(theirs)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours, make_input(spec)


# ---------------------------------------------------------------- (1) drop-in contract ---------

@pytest.mark.parametrize("name", ["Linear", "Embedding", "MergedLinear", "ConvLoRA"])
def test_constructor_signature_and_defaults_match_loralib(name):
    theirs = inspect.signature(getattr(loralib, name).__init__).parameters
    ours = inspect.signature(getattr(lora, name).__init__).parameters
    # Same positional order, kinds and defaults (a tuple default stands for loralib's list).
    assert [p for p in ours if p in theirs] == list(theirs)
    for pname, p in theirs.items():
        q = ours[pname]
        assert q.kind == p.kind, pname
        norm = lambda d: list(d) if isinstance(d, (list, tuple)) else d  # noqa: E731
        assert norm(q.default) == norm(p.default), pname
    # The only addition is MergedLinear's optional split_sizes.
    assert {p: ours[p].default for p in ours if p not in theirs} == (
        {"split_sizes": None} if name == "MergedLinear" else {})
    if name != "ConvLoRA":
        assert theirs["r"].default == 0 and theirs["lora_alpha"].default == 1


@pytest.mark.parametrize("name", list(CASES))
def test_same_init_names_shapes_and_frozen_flags_as_loralib(name):
    make, _ = CASES[name]
    torch.manual_seed(3)
    theirs = make(loralib)
    torch.manual_seed(3)
    ours = make(lora)
    # Same state-dict keys, shapes and, as both draw from the RNG in the same order, values.
    t_sd, o_sd = theirs.state_dict(), ours.state_dict()
    assert list(o_sd) == list(t_sd)
    for k in t_sd:
        assert torch.equal(o_sd[k], t_sd[k]), k
    assert ({n: p.requires_grad for n, p in ours.named_parameters()}
            == {n: p.requires_grad for n, p in theirs.named_parameters()})
    assert (ours.r, ours.lora_alpha, ours.merge_weights, ours.merged) == (
        theirs.r, theirs.lora_alpha, theirs.merge_weights, theirs.merged)
    if ours.r > 0:
        assert ours.scaling == theirs.scaling == ours.lora_alpha / ours.r
        assert not base_weight(ours).requires_grad
        assert ours.lora_A.requires_grad and ours.lora_B.requires_grad
    else:
        assert base_weight(ours).requires_grad and not hasattr(ours, "lora_A")


@pytest.mark.parametrize("make", [
    lambda: lora.Linear(64, 32, r=8), lambda: lora.MergedLinear(64, 48, r=4, enable_lora=[1, 0, 1]),
    lambda: lora.Conv2d(8, 8, 3, r=4)])
def test_init_B_zero_A_kaiming(make):
    layer = make()
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(layer.lora_A.shape[1])  # kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), .)
    A = layer.lora_A.detach()
    assert A.abs().max() <= bound and A.abs().max() > 0.9 * bound
    assert abs(A.std().item() - bound / math.sqrt(3)) < 0.1 * bound


def test_init_embedding_A_zero_B_normal():
    layer = lora.Embedding(100, 64, r=8)
    assert torch.count_nonzero(layer.lora_A) == 0
    B = layer.lora_B.detach()
    assert abs(B.mean().item()) < 0.15 and abs(B.std().item() - 1.0) < 0.1


@pytest.mark.parametrize("name", LORA_CASES)
def test_merge_on_eval_unmerge_on_train(name):
    _, layer, x = build_pair(name)
    W0 = base_weight(layer).detach().clone()
    out_train = layer(x)
    assert layer.eval() is layer and layer.merged
    assert_close(base_weight(layer), W0 + expected_delta(layer), **TIGHT)
    assert_close(layer(x), out_train, rtol=1e-5, atol=1e-5)
    layer.eval()  # idempotent: no second merge
    assert_close(base_weight(layer), W0 + expected_delta(layer), **TIGHT)
    assert layer.train() is layer and not layer.merged
    assert_close(base_weight(layer), W0, **TIGHT)
    assert_close(layer(x), out_train, **TIGHT)


def test_merge_weights_false_never_touches_the_weight():
    layer = randomize_lora(lora.Linear(8, 6, r=2, merge_weights=False))
    x, W0 = torch.randn(3, 8), layer.weight.detach().clone()
    out = layer(x)
    layer.eval()
    assert not layer.merged and torch.equal(layer.weight, W0)
    assert_close(layer(x), out, **TIGHT)


# ------------------------------------------------------- (2) cross-loading with loralib ---------

class Net(nn.Module):
    """A small model using every loralib layer type, built from library L."""

    def __init__(self, L):
        super().__init__()
        self.emb = L.Embedding(20, 16, r=4, lora_alpha=8)
        self.lin = L.Linear(16, 16, r=4, lora_alpha=8)
        self.qkv = L.MergedLinear(16, 48, r=2, lora_alpha=4, enable_lora=[True, False, True])
        self.proj = L.Linear(16, 16, r=2, lora_alpha=2, fan_in_fan_out=True)
        self.conv = L.Conv2d(16, 8, 3, r=2, lora_alpha=4, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, ids):
        """ids (batch, T) -> (batch, T, 5)."""
        h = self.lin(self.emb(ids))
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        h = self.proj(q * torch.sigmoid(k) + v)
        h = self.conv(h.transpose(1, 2).unsqueeze(-1))  # (batch, 16, T, 1) -> (batch, 8, T, 1)
        return self.head(h.squeeze(-1).transpose(1, 2))


def transfer(src, src_lib, dst):
    """The two-stage load: pretrained weights, then the LoRA state dict, both strict=False."""
    sd = src.state_dict()
    pretrained = {k: v for k, v in sd.items() if "lora_" not in k}
    lora_sd = src_lib.lora_state_dict(src)
    assert lora_sd and set(lora_sd) | set(pretrained) == set(sd)
    res = dst.load_state_dict(pretrained, strict=False)
    assert res.unexpected_keys == [] and set(res.missing_keys) == set(lora_sd)
    res = dst.load_state_dict(lora_sd, strict=False)
    assert res.unexpected_keys == [] and set(res.missing_keys) == set(pretrained)


@pytest.mark.parametrize("src_lib,dst_lib", [(loralib, lora), (lora, loralib)],
                         ids=["loralib->philora", "philora->loralib"])
def test_cross_load_gives_equal_outputs(src_lib, dst_lib):
    torch.manual_seed(0)
    src = randomize_lora(Net(src_lib), std=0.2)
    torch.manual_seed(1)
    dst = Net(dst_lib)
    assert ({k: v.shape for k, v in dst.state_dict().items()}
            == {k: v.shape for k, v in src.state_dict().items()})
    transfer(src, src_lib, dst)
    ids = torch.randint(0, 20, (2, 6))
    expected = src(ids)
    assert_close(dst(ids), expected, rtol=1e-5, atol=1e-6)
    src.eval(), dst.eval()
    assert_close(dst(ids), src(ids), rtol=1e-5, atol=1e-6)
    assert_close(dst(ids), expected, rtol=1e-4, atol=1e-4)  # merged: fp32 rounding, O(10) outputs
    src.train(), dst.train()
    assert_close(dst(ids), expected, rtol=1e-5, atol=1e-6)


def test_cross_load_into_philora_model_already_in_eval_mode():
    torch.manual_seed(0)
    theirs = randomize_lora(Net(loralib), std=0.2)
    ours = Net(lora).eval()
    transfer(theirs, loralib, ours)
    ids = torch.randint(0, 20, (2, 6))
    expected = theirs(ids)
    assert_close(ours(ids), expected, rtol=1e-5, atol=1e-5)
    assert_close(ours.train()(ids), expected, rtol=1e-5, atol=1e-5)
    assert_close(ours.lin.weight, theirs.lin.weight, **TIGHT)


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_mark_only_lora_as_trainable_and_lora_state_dict_match_loralib(bias):
    torch.manual_seed(0)
    theirs = randomize_lora(Net(loralib))
    ours = Net(lora)
    transfer(theirs, loralib, ours)
    loralib.mark_only_lora_as_trainable(theirs, bias=bias)
    lora.mark_only_lora_as_trainable(ours, bias=bias)
    trainable = lambda m: [n for n, p in m.named_parameters() if p.requires_grad]  # noqa: E731
    assert trainable(ours) == trainable(theirs)
    assert ("head.bias" in trainable(ours)) == (bias == "all")
    assert ("lin.bias" in trainable(ours)) == (bias != "none")
    t_sd, o_sd = loralib.lora_state_dict(theirs, bias=bias), lora.lora_state_dict(ours, bias=bias)
    assert list(o_sd) == list(t_sd)
    for k in t_sd:
        assert torch.equal(o_sd[k], t_sd[k]), k
    with pytest.raises(NotImplementedError):
        lora.lora_state_dict(ours, bias="some")


# ------------------------------------------------------------------------- (3) formula ---------

@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_linear_formula(fan_in_fan_out):
    layer = randomize_lora(lora.Linear(8, 6, r=2, lora_alpha=5, fan_in_fan_out=fan_in_fan_out))
    x = torch.randn(2, 3, 8)
    W = layer.weight.T if fan_in_fan_out else layer.weight  # (out, in)
    ref = x @ W.T + layer.bias + (x @ layer.lora_A.T @ layer.lora_B.T) * 2.5
    assert_close(layer(x), ref, **TIGHT)


def test_linear_formula_with_dropout_reproduced_mask():
    layer = randomize_lora(lora.Linear(8, 6, r=2, lora_alpha=6, lora_dropout=0.3))
    x = torch.randn(4, 8)
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)
    x_drop = F.dropout(x, 0.3, training=True)
    assert not torch.equal(x_drop, x)
    A, B = layer.lora_A, layer.lora_B
    assert_close(out, x @ layer.weight.T + layer.bias + (x_drop @ A.T @ B.T) * 3, **TIGHT)
    # The mask is on the LoRA branch only; eval (merged) has no dropout at all.
    assert not torch.allclose(out, x @ layer.weight.T + layer.bias + (x @ A.T @ B.T) * 3)
    layer.eval()
    assert_close(layer(x), x @ layer.weight.T + layer.bias, **TIGHT)


def test_embedding_formula():
    layer = randomize_lora(lora.Embedding(10, 6, r=3, lora_alpha=6))
    ids = torch.randint(0, 10, (2, 5))
    ref = layer.weight[ids] + (layer.lora_A.T[ids] @ layer.lora_B.T) * 2
    assert_close(layer(ids), ref, **TIGHT)


# ----------------------------------------------------------- (4) loralib bugs, one each ---------

@pytest.mark.parametrize("make,shape,loralib_error", [
    (lambda L: L.Conv1d(4, 6, 3, r=2, lora_alpha=4, padding=1), (2, 4, 9), RuntimeError),
    (lambda L: L.Conv1d(4, 6, 3, r=2, groups=2, stride=2), (2, 4, 9), RuntimeError),
    (lambda L: L.Conv3d(2, 4, 3, r=2, padding=1), (2, 2, 4, 5, 3), RuntimeError),
    (lambda L: L.Conv3d(2, 4, (1, 3, 2), r=2), (2, 2, 4, 5, 3), AssertionError),
    (lambda L: L.Conv2d(4, 6, (3, 5), r=2, padding=(1, 2)), (2, 4, 7, 8), AssertionError),
    (lambda L: L.Conv2d(4, 6, 3, r=2, lora_alpha=8, groups=2), (2, 4, 6, 6), None),
], ids=["conv1d_k3", "conv1d_k3_groups", "conv3d_k3", "conv3d_tuple", "conv2d_tuple",
        "conv2d_groups"])
def test_conv_any_kernel_and_groups(make, shape, loralib_error):
    layer = randomize_lora(make(lora))
    x = torch.randn(shape)
    kernel = layer.conv.kernel_size
    assert layer.lora_A.shape == (2 * kernel[0], layer.conv.in_channels * math.prod(kernel[1:]))
    ref = conv_reference(layer, x)
    out = layer(x)
    assert_close(out, ref, **TIGHT)
    out.square().sum().backward()
    assert layer.lora_A.grad.abs().sum() > 0 and layer.conv.weight.grad is None
    assert_close(layer.eval()(x), ref, rtol=1e-5, atol=1e-5)
    if loralib_error is None:  # loralib gets this one right: same numbers.
        theirs = make(loralib)
        theirs.load_state_dict(layer.train().state_dict())
        assert_close(theirs(x), ref, **TIGHT)
    else:
        with pytest.raises(loralib_error):
            make(loralib)(x)


def test_conv_applies_lora_dropout():
    make = lambda L, p: L.Conv2d(4, 6, 3, r=2, lora_alpha=4, lora_dropout=p, padding=1)  # noqa
    layer = randomize_lora(make(lora, 0.5))
    no_drop = make(lora, 0.0)
    no_drop.load_state_dict(layer.state_dict())
    x = torch.randn(2, 4, 6, 6)
    torch.manual_seed(5)
    out = layer(x)
    torch.manual_seed(5)
    x_drop = F.dropout(x, 0.5, training=True)
    assert_close(out, conv_reference(layer, x, x_lora=x_drop), **TIGHT)
    assert not torch.allclose(out, no_drop(x), atol=1e-3)
    assert_close(layer.eval()(x), no_drop(x), rtol=1e-5, atol=1e-5)  # no dropout in eval
    # loralib ignores lora_dropout on convs: its train output is the no-dropout one.
    theirs = make(loralib, 0.5)
    theirs.load_state_dict(no_drop.state_dict())
    assert_close(theirs(x), no_drop(x), **TIGHT)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_merged_linear_unequal_splits_gqa(fan_in_fan_out):
    with pytest.raises(AssertionError):  # loralib: only equal slices
        loralib.MergedLinear(8, 32, r=2, enable_lora=[True, False, True])
    layer = randomize_lora(lora.MergedLinear(
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
    assert_close(out, ref, **TIGHT)
    g = torch.randn_like(out)
    out.backward(g), ref.backward(g)
    assert_close(layer.lora_A.grad, A.grad, **TIGHT)
    assert_close(layer.lora_B.grad, B.grad, **TIGHT)
    layer.eval()
    assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    merged = layer.weight.T if fan_in_fan_out else layer.weight
    assert torch.equal(merged[16:24], W[16:24])  # the k slice is untouched
    layer.train()
    assert_close(layer.weight.T if fan_in_fan_out else layer.weight, W, **TIGHT)
    with pytest.raises(ValueError):
        lora.MergedLinear(8, 32, r=2, enable_lora=[True, False, True], split_sizes=[16, 8, 4])


@pytest.mark.parametrize("name", ["merged", "merged_all", "merged_fifo"])
def test_merged_linear_equal_splits_match_loralib(name):
    theirs, ours, x = build_pair(name)
    out_t, out_o = theirs(x), ours(x)
    assert_close(out_o, out_t, **TIGHT)
    g = torch.randn_like(out_t)
    out_t.backward(g), out_o.backward(g)
    assert_close(ours.lora_A.grad, theirs.lora_A.grad, **TIGHT)
    assert_close(ours.lora_B.grad, theirs.lora_B.grad, **TIGHT)
    theirs.eval(), ours.eval()
    assert_close(ours.weight, theirs.weight, **TIGHT)
    assert_close(ours(x), theirs(x), **TIGHT)


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


@pytest.mark.parametrize("name", ["linear", "embedding", "merged_fifo", "conv2d"])
def test_zero_dropout_layers_pickle_and_deepcopy(name):
    theirs, ours, x = build_pair(name)
    if name != "embedding":  # Embedding has no dropout, so loralib's pickles too
        with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
            pickle.dumps(theirs)  # loralib's p=0 dropout is a lambda
    expected = ours(x)
    for clone in (pickle.loads(pickle.dumps(ours)), copy.deepcopy(ours)):
        assert_close(clone(x), expected, rtol=0, atol=0)
        clone.eval()  # the clone merges into its own weight, not the original's
        assert_close(clone(x), expected, rtol=1e-5, atol=1e-5)
    assert not ours.merged
    assert_close(ours(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["linear", "linear_fifo", "embedding", "merged", "conv2d"])
def test_loading_lora_into_merged_layer(name):
    """loralib#190: new lora_A/lora_B loaded into an eval-mode layer left the old delta merged."""
    make, spec = CASES[name]
    x = make_input(spec)
    source = randomize_lora(make(lora))  # base W0 + new factors
    new = lora.lora_state_dict(source)
    W0 = base_weight(source).detach().clone()
    expected = source(x)
    for L in (lora, loralib):
        layer = make(L)
        layer.load_state_dict(source.state_dict())
        randomize_lora(layer)  # old factors
        layer.eval()
        layer.load_state_dict(new, strict=False)
        ok = torch.allclose(layer(x), expected, rtol=1e-5, atol=1e-5)
        layer.train()
        ok = ok and torch.allclose(base_weight(layer), W0, rtol=1e-5, atol=1e-6)
        ok = ok and torch.allclose(layer(x), expected, rtol=1e-5, atol=1e-5)
        assert ok == (L is lora), L.__name__


def test_embedding_max_norm_does_not_touch_lora_A():
    ids = torch.tensor([[1, 2, 3, 2]])
    for L in (lora, loralib):
        torch.manual_seed(0)
        layer = randomize_lora(L.Embedding(10, 4, r=2, lora_alpha=2, max_norm=1.0), std=3.0)
        A0, W0 = layer.lora_A.detach().clone(), layer.weight.detach().clone()
        out = layer(ids)
        if L is loralib:  # renormalised columns of lora_A in place
            assert not torch.equal(layer.lora_A, A0)
            continue
        assert torch.equal(layer.lora_A, A0)
        ref = F.embedding(ids, W0, max_norm=1.0) + A0.T[ids] @ layer.lora_B.T
        assert_close(out, ref, **TIGHT)
        assert_close(layer(ids), ref, **TIGHT)  # and again: nothing drifted


def test_lora_state_dict_bias_all_skips_bias_buffers():
    def gpt2_like(L):
        m = nn.Module()
        m.attn = nn.Module()
        m.attn.register_buffer("bias", torch.tril(torch.ones(4, 4)))  # GPT-2's causal mask
        m.attn.c_attn = L.MergedLinear(8, 24, r=2, enable_lora=[True, False, True],
                                       fan_in_fan_out=True)
        m.ln = nn.LayerNorm(8)
        return m
    theirs, ours = gpt2_like(loralib), gpt2_like(lora)
    assert "attn.bias" in loralib.lora_state_dict(theirs, bias="all")
    assert set(lora.lora_state_dict(ours, bias="all")) == {
        "attn.c_attn.lora_A", "attn.c_attn.lora_B", "attn.c_attn.bias", "ln.bias"}


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
def test_merged_linear_forward_never_builds_delta(enable, monkeypatch):
    x = torch.randn(2, 3, 24)
    torch.manual_seed(1)
    theirs = randomize_lora(loralib.MergedLinear(24, 48, r=2, lora_alpha=4, enable_lora=enable))
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
    assert_close(out, theirs(x), **TIGHT)
    assert_close(ours.lora_A.grad, theirs.lora_A.grad, **TIGHT)
    assert_close(ours.lora_B.grad, theirs.lora_B.grad, **TIGHT)
    assert_close(grads[0], ours.lora_A.grad, rtol=0, atol=0)


# ----------------------------------------------------------- (5) fp32 LoRA on a bf16 base ---------

def test_fp32_lora_on_bf16_base_linear():
    def make(L):
        torch.manual_seed(2)
        layer = randomize_lora(L.Linear(32, 16, r=4, lora_alpha=8))
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
