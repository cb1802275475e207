"""Find LoRA targets in a transformers model and swap them for philora.lora layers in place.

The new layers reuse the model's own weight and bias tensors (no copy: the swap costs only the
LoRA factors). Target rules follow PEFT so configs carry over: a list of names matches modules
whose dotted name equals or ends with ``.name``; another string is a regex that must match the
whole name; ``"all-linear"`` is every linear layer but the output embedding (lm_head).

Phi-3's fused ``qkv_proj`` / ``gate_up_proj`` are targets like any other (one LoRA on the whole
fused output), or per slice (``fused_slices: {qkv_proj: [q, v]}``, or the cookbook's
``q_proj``/``v_proj`` names) through ``lora.MergedLinear`` with the config's ``split_sizes``.
"""

import math
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from . import lora
from .dropout import Dropout
from .errors import PhiloraError
from .models import fused_slices as model_fused_slices
from .models import slice_aliases


class InjectError(PhiloraError):
    """A target configuration that does not fit the model; the message is one line."""


@dataclass(frozen=True)
class Target:
    """Where LoRA goes: a whole module (``slices`` None) or some slices of a fused one."""
    name: str
    slices: Optional[tuple] = None  # enabled slice names, in the module's order
    slice_names: Optional[tuple] = None  # all slice names of the fused module
    split_sizes: Optional[tuple] = None


def _is_conv1d(m: nn.Module) -> bool:
    # transformers' GPT-2-style Conv1D: a linear layer with weight stored (in, out).
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or _is_conv1d(m)


def linear_names(model: nn.Module) -> List[str]:
    """Dotted names of the model's linear layers, output embedding (lm_head) excluded."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [n for n, m in model.named_modules() if _is_linear(m) and m is not out_emb]


def _short_names(names: Sequence[str]) -> str:
    # "model.layers.0.self_attn.qkv_proj" -> "self_attn.qkv_proj"; one entry per distinct suffix.
    short = sorted({re.sub(r"^.*?\.\d+\.", "", n) for n in names})
    return ", ".join(short)


def find_targets(model: nn.Module, target_modules: Union[str, List[str]],
                 fused_slices: Optional[Dict[str, List[str]]] = None) -> Dict[str, Target]:
    """Resolve the config's targets to {module name: Target}. Raises InjectError."""
    config = getattr(model, "config", None)
    names = linear_names(model)
    whole: set = set()
    per_slice: Dict[str, set] = {}

    def slice_target(fused: str, slice_name: str, from_key: str) -> bool:
        hits = [n for n in names if n == fused or n.endswith("." + fused)]
        for n in hits:
            info = model_fused_slices(config, n)
            if info is None or slice_name not in info[0]:
                valid = list(info[0]) if info else []
                raise InjectError(f"peft_config: '{from_key}': module '{fused}' has no slice "
                                  f"'{slice_name}' (slices: {valid})")
            per_slice.setdefault(n, set()).add(slice_name)
        return bool(hits)

    if isinstance(target_modules, str) and target_modules != "all-linear":
        whole.update(n for n in names if re.fullmatch(target_modules, n))
        if not whole:
            raise InjectError(f"peft_config.target_modules: regex '{target_modules}' matches no "
                              f"linear module (the model has: {_short_names(names)})")
    elif target_modules == "all-linear":
        whole.update(names)
    else:
        aliases = slice_aliases(config)
        for key in target_modules:
            hits = [n for n in names if n == key or n.endswith("." + key)]
            if not hits and key in aliases:
                fused, slice_name = aliases[key]
                if slice_target(fused, slice_name, key):
                    continue
            if not hits:
                raise InjectError(f"peft_config.target_modules: '{key}' matches no linear module "
                                  f"(the model has: {_short_names(names)})")
            whole.update(hits)
    for fused, wanted in (fused_slices or {}).items():
        if not wanted:
            continue
        hit = False
        for s in wanted:
            hit = slice_target(fused, s, f"fused_slices.{fused}") or hit
        if not hit:
            raise InjectError(f"peft_config.fused_slices: '{fused}' matches no linear module "
                              f"(the model has: {_short_names(names)})")

    if not whole and not per_slice:  # e.g. target_modules: [] and no fused_slices
        raise InjectError(f"peft_config.target_modules: selects no module; name some, or use "
                          f"'all-linear' (the model has: {_short_names(names)})")
    targets = {n: Target(n) for n in sorted(whole)}
    for n, wanted in per_slice.items():  # per-slice requests override a whole-module target
        slice_names, sizes = model_fused_slices(config, n)
        enabled = tuple(s for s in slice_names if s in wanted)
        targets[n] = Target(n, enabled, tuple(slice_names), tuple(sizes))
    return dict(sorted(targets.items()))


def _make_layer(base: nn.Module, target: Target, r: int, alpha: float, dropout: float,
                use_rslora: bool, lora_dtype: torch.dtype) -> nn.Module:
    """A philora.lora layer around ``base``'s own weight and bias tensors."""
    if type(base).__name__ in ("Linear4bit", "Linear8bitLt"):  # QLoRA: quantized base layer
        from .quant import make_lora_quantized
        return make_lora_quantized(base, target, r, alpha, dropout, use_rslora, lora_dtype)
    fifo = _is_conv1d(base)
    out_f, in_f = (base.weight.shape[1], base.weight.shape[0]) if fifo else base.weight.shape
    common = dict(r=r, lora_alpha=alpha, lora_dropout=dropout, fan_in_fan_out=fifo,
                  merge_weights=False, bias=base.bias is not None, device="meta")
    if target.slices is None:
        new = lora.Linear(in_f, out_f, **common)
    else:
        enable = [s in target.slices for s in target.slice_names]
        new = lora.MergedLinear(in_f, out_f, enable_lora=enable, split_sizes=target.split_sizes, **common)
    # Reuse the model's tensors; fan_in_fan_out layers keep the (in, out) layout as stored.
    new.weight = base.weight
    new.bias = base.bias
    new.weight.requires_grad = False
    device = base.weight.device
    new.lora_A = nn.Parameter(torch.empty(new.lora_A.shape, device=device, dtype=lora_dtype))
    new.lora_B = nn.Parameter(torch.empty(new.lora_B.shape, device=device, dtype=lora_dtype))
    if hasattr(new, "lora_ind"):
        new.lora_ind = torch.tensor([e for s, e in zip(new.split_sizes, new.enable_lora)
                                     for _ in range(s)], dtype=torch.bool, device=device)
    nn.init.kaiming_uniform_(new.lora_A, a=math.sqrt(5))  # as loralib and PEFT
    nn.init.zeros_(new.lora_B)
    if use_rslora:
        new.scaling = alpha / math.sqrt(r)
    new.use_rslora = use_rslora
    new.train(base.training)
    return new


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject_lora(model: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                target_modules: Union[str, List[str]] = "all-linear",
                fused_slices: Optional[Dict[str, List[str]]] = None, use_rslora: bool = False,
                bias: str = "none", lora_dtype: torch.dtype = torch.float32) -> Dict[str, Target]:
    """Swap the targets for LoRA layers, freeze everything else. Returns the targets."""
    if r <= 0:
        raise InjectError(f"peft_config.r must be > 0, got {r}")
    targets = find_targets(model, target_modules, fused_slices)
    for name, target in targets.items():
        base = model.get_submodule(name)
        layer = _make_layer(base, target, r, lora_alpha, lora_dropout, use_rslora, lora_dtype)
        if lora_dropout > 0:  # the same distribution with a ~2.5x cheaper mask on CPU
            layer.lora_dropout = Dropout(p=lora_dropout)
        _set_module(model, name, layer)
    lora.mark_only_lora_as_trainable(model, bias=bias)
    return targets


def lora_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """{dotted name: layer} of every philora.lora layer with LoRA factors in ``model``."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, lora.LoRALayer) and hasattr(m, "lora_A")}


def count_parameters(model: nn.Module) -> tuple:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
