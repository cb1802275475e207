"""The training pipeline's LoRA forward: base + dropout + A + B as one autograd function.

Why hand-written: autograd through ``lora.Linear``'s forward records six ops per adapted layer
(base matmul, dropout, A, scaling, B, add) and keeps the dropped copy of the input alive for
backward. :class:`_LoRALinear` computes the same thing as

    y = x W.T + b + ((x * keep * s) A.T * scaling) B.T          (keep: the dropout mask)

with the base output accumulating B's product in place (``addmm_``), the dropout scale folded
into the rank-r side (``scaling * s`` on a (tokens, r) tensor, not on (tokens, in)), and saves
for backward only the masked input and the (tokens, r) product: the frozen weight needs no
gradient, so the input itself is never kept, and on CPU the mask is not kept either (backward
redraws it from its seed, ~0.8 ns per element; elsewhere the boolean mask is kept). Backward
accumulates the LoRA input gradient into the base one (``addmm_``) when there is no dropout.
Measured on CPU (bench shape, one thread): ~13% less time in the adapted layers with dropout,
~1-8% of a whole step (the frozen matmuls dominate). No library fuses this (PEFT runs the same
six ops). ``torch.compile`` is not used: compiling the decoder MLPs around
this function measured 4% slower per step on CPU (the numpy mask is a graph break) after ~27 s
of compilation.

:func:`forward` is what a ``lora.LoRALinear`` runs first when its ``fast_path`` is set (as
``inject.lora_layer`` sets it, :func:`fast`): in training with gradients on it takes this path;
in eval mode, under ``no_grad``, merged, or with a trainable base weight it returns None and the
layer runs its plain path. On a 4-bit base (``base_layer``) the base output is bitsandbytes' and
this function adds the LoRA half. Exact against the plain path
up to float rounding order (tests/model/test_fused.py); the dropout mask is ``dropout.keep_mask``'s
(on CPU) or ``nn.Dropout``'s own (elsewhere), the same distribution as ``nn.Dropout``.
"""

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import lora
from . import dropout
from .families import GATED_MLPS


def compute_dtype(layer: nn.Module, x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype of the LoRA matmuls on the fused path, or None when the plain path must run.

    Without autocast: the LoRA factors' dtype (fp32 factors on a bf16 base, as the plain path).
    Under autocast: its dtype, provided input and base weight already have it (a bf16 model
    under bf16 autocast, as ``train`` runs it); any other autocast mix takes the plain path."""
    d = layer.lora_dropout
    if (not layer.training or not torch.is_grad_enabled() or layer.merged or not layer.has_lora()
            or layer.weight.requires_grad or not isinstance(d, (nn.Identity, nn.Dropout))
            or getattr(d, "inplace", False) or x.shape[-1] != layer.in_features):
        return None
    if torch.is_autocast_enabled(x.device.type):
        amp = torch.get_autocast_dtype(x.device.type)
        return amp if x.dtype == amp and layer.weight.dtype == amp else None
    return layer.lora_A.dtype


class _LoRALinear(torch.autograd.Function):
    """y = base(x) + ((x * keep * s) A.T * scaling) B.T, per block; see the module docstring.

    x (..., in); base_out (..., out) or None (then base = x W.T + b, W (out, in), or (in, out)
    with ``fan_in_fan_out``); A (r*k, in); B (rows, r). Returns (..., out) in the base dtype.
    """

    @staticmethod
    def forward(ctx, x, base_out, weight, bias, A, B, scaling, p, fan_in_fan_out, blks, cdt):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        with torch.autocast(x.device.type, enabled=False):
            if base_out is None:
                out_features = weight.shape[1] if fan_in_fan_out else weight.shape[0]
                y = F.linear(x2, weight.t() if fan_in_fan_out else weight, bias)
            else:
                out_features = base_out.shape[-1]
                y = base_out.reshape(-1, out_features).clone()
            xl = x2.to(cdt)
            Ac, Bc = A.to(cdt), B.to(cdt)
            keep, seed, c = None, None, scaling
            if p > 0:
                keep, s, seed = dropout.mask(xl, p)
                xl = xl * keep  # scale s goes to the (tokens, r) side
                c = scaling * s
                if seed is not None:  # CPU: backward redraws the mask from its seed
                    keep = None
            h = (xl @ Ac.t()).mul_(c)  # (T, r*k), already scaled
            for o0, size, a, b in blks:
                if y.dtype == cdt:
                    y[:, o0:o0 + size].addmm_(h[:, a], Bc[b].t())
                else:  # fp32 LoRA on a bf16/fp16 base: the product cast once, as the plain path
                    y[:, o0:o0 + size] += (h[:, a] @ Bc[b].t()).to(y.dtype)
        ctx.save_for_backward(xl, keep, h, weight if base_out is None else None, A, B)
        ctx.opts = (shape, x.dtype, c, fan_in_fan_out, blks, cdt, base_out is None,
                    bias is not None and bias.requires_grad, p, seed)
        return y.reshape(*shape[:-1], out_features)

    @staticmethod
    def backward(ctx, grad):
        xl, keep, h, weight, A, B = ctx.saved_tensors
        shape, x_dtype, c, fan_in_fan_out, blks, cdt, own_base, bias_grad, p, seed = ctx.opts
        need_x = ctx.needs_input_grad[0]
        g = grad.reshape(-1, grad.shape[-1])
        with torch.autocast(g.device.type, enabled=False):
            gx = None
            if need_x and own_base:
                gx = g @ (weight.t() if fan_in_fan_out else weight)  # (T, in), the base's part
            gl, Ac, Bc = g.to(cdt), A.to(cdt), B.to(cdt)
            if len(blks) == 1 and blks[0][1] == g.shape[1]:
                gh, gB = gl @ Bc, gl.t() @ h
            else:
                gh = gl.new_empty(h.shape)
                gB = gl.new_empty(Bc.shape)
                for o0, size, a, b in blks:
                    gs = gl[:, o0:o0 + size]
                    gh[:, a] = gs @ Bc[b]
                    gB[b] = gs.t() @ h[:, a]
            gh.mul_(c)  # gradient of the unscaled x A.T
            gA = gh.t() @ xl
            if need_x and seed is not None:
                keep = dropout.mask(xl, p, seed)[0]
            if need_x:
                if keep is None and gx is not None and gx.dtype == cdt:
                    gx.addmm_(gh, Ac)
                else:
                    t = gh @ Ac
                    if keep is not None:
                        t.mul_(keep)
                    gx = t.to(x_dtype) if gx is None else gx.add_(t.to(gx.dtype))
        gbias = g.sum(0) if bias_grad and own_base else None
        return (None if gx is None else gx.reshape(shape), grad if not own_base else None, None, gbias,
                gA.to(A.dtype), gB.to(B.dtype), None, None, None, None, None)


def forward(layer: lora.LoRALinear, x: torch.Tensor) -> Optional[torch.Tensor]:
    """``layer(x)`` through :class:`_LoRALinear` in training, or None where the plain path must
    run (:func:`compute_dtype`). A ``LoRALinear.fast_path``: x (..., in) -> (..., out)."""
    cdt = compute_dtype(layer, x)
    if cdt is None:
        return None
    p = layer.lora_dropout.p if isinstance(layer.lora_dropout, nn.Dropout) else 0.0
    if layer.base_layer is None:  # a plain weight: the base matmul runs inside the function too
        base_out, weight, bias = None, layer.weight, layer.bias
    else:  # 4-bit: bitsandbytes computes the base output, the function adds the LoRA half
        base_out, weight, bias = layer.base_layer(x), None, None
    return _LoRALinear.apply(x, base_out, weight, bias, layer.lora_A, layer.lora_B, layer.scaling,
                             p, layer.fan_in_fan_out, layer.blocks(), cdt)


def fast(layer: lora.LoRALinear) -> lora.LoRALinear:
    """``layer``, training through :func:`forward` from now on (same parameters and keys)."""
    layer.fast_path = forward
    return layer


def Linear(*args, **kwargs) -> lora.LoRALinear:
    """``lora.Linear(...)`` on the fused path (same signature)."""
    return fast(lora.Linear(*args, **kwargs))


def MergedLinear(*args, **kwargs) -> lora.LoRALinear:
    """``lora.MergedLinear(...)`` on the fused path (same signature)."""
    return fast(lora.MergedLinear(*args, **kwargs))


class _SiluMul(torch.autograd.Function):
    """silu(gate) * up, saving only gate and up. gate, up (..., I) -> (..., I).

    Autograd through ``F.silu`` and ``*`` also keeps silu(gate) for backward (one more
    (tokens, I) tensor per layer: 12% of the saved activations on the benchmark's Phi-3 shape);
    backward recomputes it. Same kernels as autograd's (``silu``, ``silu_backward``, ``mul``),
    so forward and gradients are bitwise those of the plain path.
    """

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: through :class:`_SiluMul` when autograd records, plainly otherwise."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SiluMul.apply(gate, up)
    return F.silu(gate) * up


def _gate_up_forward(self, x: torch.Tensor) -> torch.Tensor:  # Phi3MLP's forward
    gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
    return self.down_proj(silu_mul(gate, up))


def _gate_and_up_forward(self, x: torch.Tensor) -> torch.Tensor:  # LlamaMLP's forward
    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


def fuse_mlps(model: nn.Module) -> int:
    """Give every gated SiLU MLP of ``model`` listed in ``models.GATED_MLPS`` the forward above
    (an instance attribute: parameters, state dict and class unchanged); returns how many."""
    n = 0
    for module in model.modules():
        entry = GATED_MLPS.get(type(module).__name__)
        act = getattr(module, entry[1], None) if entry else None
        if not (isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"):  # (transformers' silu)
            continue  # another activation (a config's hidden_act): the class's own forward
        fn = _gate_up_forward if entry[0] == ("gate_up_proj",) else _gate_and_up_forward
        module.forward = fn.__get__(module)
        n += 1
    return n
