"""Find LoRA targets in a transformers model and swap them for philora.lora layers in place.

The new layers reuse the model's own weight and bias tensors (no copy: the swap costs only the
LoRA factors). Target rules follow PEFT so configs carry over: a list of names matches modules
whose dotted name equals or ends with ``.name``; another string is a regex that must match the
whole name; ``"all-linear"`` is every linear layer but the output embedding (lm_head).

Phi-3's fused ``qkv_proj`` / ``gate_up_proj`` are targets like any other (one LoRA on the whole
fused output), or per slice (``fused_slices: {qkv_proj: [q, v]}``, or the cookbook's
``q_proj``/``v_proj`` names) through ``lora.LoRALinear``'s ``enable_lora`` and the config's
``split_sizes``.
"""

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from .. import lora
from ..core.config import PeftConfig
from ..core.errors import PhiloraError
from . import fused, quant
from .adapter import Adapter, AdapterError, read_adapter
from .dropout import Dropout
from .families import fused_slices as model_fused_slices
from .families import is_4bit, is_conv1d, is_linear, linear_shape, short_names, slice_aliases

# LoRA factors train in float32 on any base dtype: Adam's updates to small factors vanish in bf16.
LORA_DTYPE = torch.float32


class InjectError(PhiloraError):
    """A target configuration that does not fit the model; the message is one line."""


@dataclass(frozen=True)
class Target:
    """Where LoRA goes: a whole module (``slices`` None) or some slices of a fused one."""
    name: str
    slices: Optional[tuple] = None  # enabled slice names, in the module's order
    slice_names: Optional[tuple] = None  # all slice names of the fused module
    split_sizes: Optional[tuple] = None


def linear_names(model: nn.Module) -> List[str]:
    """Dotted names of the model's linear layers, output embedding (lm_head) excluded."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [n for n, m in model.named_modules() if is_linear(m) and m is not out_emb]


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
                              f"linear module (the model has: {short_names(names)})")
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
                                  f"(the model has: {short_names(names)})")
            whole.update(hits)
    for fused, wanted in (fused_slices or {}).items():
        if not wanted:
            continue
        hit = False
        for s in wanted:
            hit = slice_target(fused, s, f"fused_slices.{fused}") or hit
        if not hit:
            raise InjectError(f"peft_config.fused_slices: '{fused}' matches no linear module "
                              f"(the model has: {short_names(names)})")

    if not whole and not per_slice:  # e.g. target_modules: [] and no fused_slices
        raise InjectError(f"peft_config.target_modules: selects no module; name some, or use "
                          f"'all-linear' (the model has: {short_names(names)})")
    targets = {n: Target(n) for n in sorted(whole)}
    for n, wanted in per_slice.items():  # per-slice requests override a whole-module target
        slice_names, sizes = model_fused_slices(config, n)
        enabled = tuple(s for s in slice_names if s in wanted)
        targets[n] = Target(n, enabled, tuple(slice_names), tuple(sizes))
    return dict(sorted(targets.items()))


def lora_layer(base: nn.Module, target: Target, pc: PeftConfig) -> lora.LoRALinear:
    """The LoRA layer that replaces ``base``: rank ``pc.r`` on the whole output or on the
    target's slices, around ``base``'s own weight and bias tensors (not copied), or around the
    whole bitsandbytes module on a 4-bit base (QLoRA).

    The one place that decides how a LoRA layer starts: factors in LORA_DTYPE on the base's
    device, A kaiming-uniform and B zero (as loralib and PEFT), scaling alpha/r or, with
    rsLoRA, alpha/sqrt(r), the slice mask, the dropout, with DoRA (``pc.use_dora``) its
    magnitude ||W|| per output row, and without it fused.py's training path.
    """
    enable = None if target.slices is None else [s in target.slices for s in target.slice_names]
    quantized = is_4bit(base)
    if quantized:
        quant.no_cpu_repacking(base)
    new = lora.LoRALinear(base, r=pc.r, lora_alpha=pc.lora_alpha, fan_in_fan_out=is_conv1d(base),
                          merge_weights=False, enable_lora=enable, split_sizes=target.split_sizes,
                          use_rslora=pc.use_rslora, use_dora=pc.use_dora, lora_dtype=LORA_DTYPE,
                          dequantize=quant.dequantize_weight if quantized else None)
    # The same distribution as nn.Dropout with a ~2.5x cheaper mask on CPU (dropout.py).
    new.lora_dropout = Dropout(p=pc.lora_dropout) if pc.lora_dropout > 0 else nn.Identity()
    if not pc.use_dora:  # training runs through fused.py's one autograd function per layer
        fused.fast(new)
    new.train(base.training)
    return new


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` with ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject_lora(model: nn.Module, pc: PeftConfig) -> Dict[str, Target]:
    """Swap the targets of ``pc`` for LoRA layers, freeze everything else. Returns the targets."""
    if pc.r <= 0:
        raise InjectError(f"peft_config.r must be > 0, got {pc.r}")
    targets = find_targets(model, pc.target_modules, pc.fused_slices)
    for name, target in targets.items():
        set_module(model, name, lora_layer(model.get_submodule(name), target, pc))
    lora.mark_only_lora_as_trainable(model, bias=pc.bias)
    return targets


def count_parameters(model: nn.Module) -> Tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# -- a saved adapter on a model ---------------------------------------------------------------

def target_layer(model: nn.Module, name: str, A: torch.Tensor, B: torch.Tensor, where) -> nn.Module:
    """The base layer an adapter module names, checked to exist, be linear and fit A and B."""
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        raise AdapterError(f"{where}: module '{name}' is not in the base model (a different base? "
                           f"the model has: {short_names(linear_names(model))})") from None
    shape = linear_shape(layer)
    if shape is None:
        raise AdapterError(f"{where}: module '{name}' is a {type(layer).__name__}; philora applies "
                           f"LoRA to linear layers only")
    (fan_in, fan_out), r = shape, A.shape[0]
    if A.shape[1] != fan_in or B.shape[0] != fan_out:
        raise AdapterError(f"{where}: '{name}' has lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)}, "
                           f"the base model's layer needs ({r}, {fan_in}) / ({fan_out}, {r}) "
                           f"(a different base model?)")
    return layer


def load_biases(model: nn.Module, adapter: Adapter, dtype: Optional[torch.dtype] = None) -> None:
    """Copy the adapter's bias tensors into the model (as ``dtype``, when given)."""
    for name, value in adapter.biases.items():
        try:
            param = model.get_parameter(name)
        except AttributeError:
            raise AdapterError(f"{adapter.path}: bias '{name}' is not a parameter of the base model") from None
        if param.shape != value.shape:
            raise AdapterError(f"{adapter.path}: bias '{name}' has shape {tuple(value.shape)}, the "
                               f"base model's is {tuple(param.shape)}")
        with torch.no_grad():
            if dtype is None:
                param.copy_(value)
            else:
                param.data = value.to(dtype)


def apply_adapter(model: nn.Module, adapter: Union[str, Path, Adapter]) -> dict:
    """Inject and load a PEFT-format LoRA adapter into ``model`` (in place); returns its config.
    Each module gets its own rank and alpha (PEFT's rank_pattern / alpha_pattern), and a DoRA
    layer when the adapter has its magnitude vector."""
    adapter = adapter if isinstance(adapter, Adapter) else read_adapter(adapter, dora=True)
    spec = PeftConfig(lora_dropout=0.0, use_rslora=adapter.use_rslora)
    for name, (A, B, alpha) in adapter.modules.items():
        base = target_layer(model, name, A, B, adapter.path)
        magnitude = adapter.magnitudes.get(name)
        layer = lora_layer(base, Target(name), replace(spec, r=A.shape[0], lora_alpha=alpha,
                                                       use_dora=magnitude is not None))
        with torch.no_grad():
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
            if magnitude is not None:
                layer.lora_magnitude_vector.copy_(magnitude)
        set_module(model, name, layer)
    load_biases(model, adapter)
    lora.mark_only_lora_as_trainable(model)
    return adapter.config
