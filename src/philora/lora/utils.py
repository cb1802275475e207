"""``mark_only_lora_as_trainable`` and ``lora_state_dict``, as in loralib.utils.

Same selection rules as loralib (parameter names containing ``lora_``, and for ``bias``:
``'none'``, ``'all'``, ``'lora_only'``), with one fix: ``bias='all'`` returns parameters whose
name contains ``bias``, never buffers that happen to (GPT-2's causal-mask ``attn.bias``).
"""

from typing import Dict

import torch
import torch.nn as nn

from .layers import LoRALayer


def _check_bias(bias: str) -> None:
    if bias not in ("none", "all", "lora_only"):
        raise NotImplementedError(f"bias must be 'none', 'all' or 'lora_only', got {bias!r}")


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """Freeze every parameter except LoRA factors (and biases, per ``bias``). In place."""
    _check_bias(bias)
    for n, p in model.named_parameters():
        if "lora_" not in n:
            p.requires_grad = False
    if bias == "all":
        for n, p in model.named_parameters():
            if "bias" in n:
                p.requires_grad = True
    elif bias == "lora_only":
        for m in model.modules():
            if isinstance(m, LoRALayer) and getattr(m, "bias", None) is not None:
                m.bias.requires_grad = True


def lora_state_dict(model: nn.Module, bias: str = "none") -> Dict[str, torch.Tensor]:
    """The LoRA part of ``model.state_dict()`` (keys unchanged), per ``bias`` as in loralib."""
    _check_bias(bias)
    state = model.state_dict()
    if bias == "none":
        return {k: v for k, v in state.items() if "lora_" in k}
    if bias == "all":
        params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        return {k: v for k, v in state.items() if "lora_" in k or ("bias" in k and k in params)}
    out = {}
    for k, v in state.items():
        if "lora_" in k:
            out[k] = v
            bias_name = k.split("lora_")[0] + "bias"
            if bias_name in state:
                out[bias_name] = state[bias_name]
    return out


def lora_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """{dotted name: layer} of every LoRA layer in ``model`` that has LoRA factors (r > 0).
    Not in loralib; the one way the rest of philora finds its adapted layers."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALayer) and hasattr(m, "lora_A")}
