"""fused.fuse_mlps: each gated SiLU MLP of models.GATED_MLPS, against the class's own forward."""

import importlib

import pytest
import torch

from philora.core.config import PeftConfig
from philora.model.fused import fuse_mlps, silu_mul
from philora.model.inject import inject_lora
from philora.model.families import GATED_MLPS

MLPS = {  # class -> (transformers module, config class)
    "Phi3MLP": ("phi3", "Phi3Config"),
    "LlamaMLP": ("llama", "LlamaConfig"),
    "MistralMLP": ("mistral", "MistralConfig"),
    "Qwen2MLP": ("qwen2", "Qwen2Config"),
    "Qwen3MLP": ("qwen3", "Qwen3Config"),
}


def make_mlp(name, hidden_act="silu", seed=0):
    kind, config = MLPS[name]
    module = importlib.import_module(f"transformers.models.{kind}.modeling_{kind}")
    cfg = getattr(importlib.import_module("transformers"), config)(hidden_size=24, intermediate_size=40, num_attention_heads=4,
                                                                     hidden_act=hidden_act)
    torch.manual_seed(seed)
    return getattr(module, name)(cfg)


def forward_and_grads(mlp, x, grad):
    x = x.detach().clone().requires_grad_()
    y = mlp(x)
    y.backward(grad)
    return y.detach(), x.grad, [p.grad.clone() for p in mlp.parameters() if p.grad is not None]


def test_every_listed_class_is_tested():
    assert set(GATED_MLPS) == set(MLPS)


@pytest.mark.parametrize("name", sorted(MLPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_forward_is_bitwise_the_class_forward(name, dtype):
    plain, fused = make_mlp(name).to(dtype), make_mlp(name).to(dtype)
    assert fuse_mlps(fused) == 1
    torch.manual_seed(1)
    x, grad = torch.randn(2, 7, 24, dtype=dtype) * 3, torch.randn(2, 7, 24, dtype=dtype)
    for a, b in zip(forward_and_grads(plain, x, grad), forward_and_grads(fused, x, grad)):
        for u, v in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
            torch.testing.assert_close(u, v, rtol=0, atol=0)


def test_with_lora_and_dropout_saves_less_and_trains_the_same():
    """Phi-3's MLP with LoRA (dropout on) in train mode: same output and LoRA gradients as the
    plain forward, and one (tokens, intermediate) tensor fewer kept for backward."""
    def run(fuse):
        mlp = make_mlp("Phi3MLP")
        inject_lora(mlp, PeftConfig(target_modules=["gate_up_proj", "down_proj"], r=4, lora_alpha=8,
                                    lora_dropout=0.1))
        for p in mlp.parameters():  # LoRA B starts at zero: give it values so the gradients mean something
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.1)
        if fuse:
            fuse_mlps(mlp)
        mlp.train()
        torch.manual_seed(3)
        x = torch.randn(1, 9, 24, requires_grad=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            torch.manual_seed(4)  # the dropout masks
            y = mlp(x)
        y.backward(torch.ones_like(y))
        grads = [p.grad for p in mlp.parameters() if p.requires_grad]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved
                    if not any(t is p for p in mlp.parameters())}
        return y.detach(), x.grad, grads, sum(storages.values())

    y0, gx0, g0, kept0 = run(False)
    y1, gx1, g1, kept1 = run(True)
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    torch.testing.assert_close(gx1, gx0, rtol=0, atol=0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert kept0 - kept1 == 9 * 40 * 4  # silu(gate): 9 tokens x 40 x fp32 no longer kept


def test_other_activations_and_no_grad_take_the_plain_path():
    gelu = make_mlp("LlamaMLP", hidden_act="gelu")
    assert fuse_mlps(gelu) == 0
    assert "forward" not in vars(gelu)
    g, u = torch.randn(3, 5), torch.randn(3, 5)
    with torch.no_grad():
        torch.testing.assert_close(silu_mul(g, u), torch.nn.functional.silu(g) * u, rtol=0, atol=0)
