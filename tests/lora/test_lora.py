"""philora.lora is a drop-in for loralib 0.1.2, with loralib's bugs fixed: (1) the drop-in contract,
(2) cross-loading with the real loralib, (3) the loralib bugs every layer type had (running loralib
too where it can, so each test documents the bug). CPU, fp32, a few seconds in all.

The layer types one by one: test_lora_linear.py (Linear and Embedding, fp32 LoRA on a bf16 base),
test_lora_merged.py (MergedLinear: unequal slices, no delta in forward), test_lora_conv.py (ConvLoRA).
"""

import copy
import inspect
import math
import pickle

import loralib
import pytest
import torch
import torch.nn as nn
from torch.testing import assert_close

import philora.lora as lora

pytestmark = pytest.mark.usefixtures("torch_seed")


def base_weight(layer):
    return layer.conv.weight if hasattr(layer, "conv") else layer.weight


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


@pytest.fixture
def build_pair(helpers):
    """build_pair(name): the same layer from loralib and philora (same seed), with random, equal
    LoRA factors, and an input."""
    def build(name):
        make, spec = CASES[name]
        torch.manual_seed(1)
        theirs = make(loralib)
        torch.manual_seed(1)
        ours = make(lora)
        helpers.randomize_lora(theirs)
        ours.load_state_dict(theirs.state_dict())
        return theirs, ours, make_input(spec)
    return build


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
def test_merge_on_eval_unmerge_on_train(name, helpers, build_pair):
    _, layer, x = build_pair(name)
    W0 = base_weight(layer).detach().clone()
    out_train = layer(x)
    assert layer.eval() is layer and layer.merged
    assert_close(base_weight(layer), W0 + helpers.expected_delta(layer), **helpers.TIGHT)
    assert_close(layer(x), out_train, rtol=1e-5, atol=1e-5)
    layer.eval()  # idempotent: no second merge
    assert_close(base_weight(layer), W0 + helpers.expected_delta(layer), **helpers.TIGHT)
    assert layer.train() is layer and not layer.merged
    assert_close(base_weight(layer), W0, **helpers.TIGHT)
    assert_close(layer(x), out_train, **helpers.TIGHT)


def test_merge_weights_false_never_touches_the_weight(helpers):
    layer = helpers.randomize_lora(lora.Linear(8, 6, r=2, merge_weights=False))
    x, W0 = torch.randn(3, 8), layer.weight.detach().clone()
    out = layer(x)
    layer.eval()
    assert not layer.merged and torch.equal(layer.weight, W0)
    assert_close(layer(x), out, **helpers.TIGHT)


@pytest.mark.parametrize("name", ["merged", "merged_all", "merged_fifo"])
def test_merged_linear_equal_splits_match_loralib(name, helpers, build_pair):
    theirs, ours, x = build_pair(name)
    out_t, out_o = theirs(x), ours(x)
    assert_close(out_o, out_t, **helpers.TIGHT)
    g = torch.randn_like(out_t)
    out_t.backward(g), out_o.backward(g)
    assert_close(ours.lora_A.grad, theirs.lora_A.grad, **helpers.TIGHT)
    assert_close(ours.lora_B.grad, theirs.lora_B.grad, **helpers.TIGHT)
    theirs.eval(), ours.eval()
    assert_close(ours.weight, theirs.weight, **helpers.TIGHT)
    assert_close(ours(x), theirs(x), **helpers.TIGHT)


# ------------------------------------------------------ (2) cross-loading with loralib ---------

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
def test_cross_load_gives_equal_outputs(src_lib, dst_lib, helpers):
    torch.manual_seed(0)
    src = helpers.randomize_lora(Net(src_lib), std=0.2)
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


def test_cross_load_into_philora_model_already_in_eval_mode(helpers):
    torch.manual_seed(0)
    theirs = helpers.randomize_lora(Net(loralib), std=0.2)
    ours = Net(lora).eval()
    transfer(theirs, loralib, ours)
    ids = torch.randint(0, 20, (2, 6))
    expected = theirs(ids)
    assert_close(ours(ids), expected, rtol=1e-5, atol=1e-5)
    assert_close(ours.train()(ids), expected, rtol=1e-5, atol=1e-5)
    assert_close(ours.lin.weight, theirs.lin.weight, **helpers.TIGHT)


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_mark_only_lora_as_trainable_and_lora_state_dict_match_loralib(bias, helpers):
    torch.manual_seed(0)
    theirs = helpers.randomize_lora(Net(loralib))
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


# ----------------------------------------------- (3) loralib bugs every layer type had ---------

@pytest.mark.parametrize("name", ["linear", "embedding", "merged_fifo", "conv2d"])
def test_zero_dropout_layers_pickle_and_deepcopy(name, build_pair):
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
def test_loading_lora_into_merged_layer(name, helpers):
    """loralib#190: new lora_A/lora_B loaded into an eval-mode layer left the old delta merged."""
    make, spec = CASES[name]
    x = make_input(spec)
    source = helpers.randomize_lora(make(lora))  # base W0 + new factors
    new = lora.lora_state_dict(source)
    W0 = base_weight(source).detach().clone()
    expected = source(x)
    for L in (lora, loralib):
        layer = make(L)
        layer.load_state_dict(source.state_dict())
        helpers.randomize_lora(layer)  # old factors
        layer.eval()
        layer.load_state_dict(new, strict=False)
        ok = torch.allclose(layer(x), expected, rtol=1e-5, atol=1e-5)
        layer.train()
        ok = ok and torch.allclose(base_weight(layer), W0, rtol=1e-5, atol=1e-6)
        ok = ok and torch.allclose(layer(x), expected, rtol=1e-5, atol=1e-5)
        assert ok == (L is lora), L.__name__
