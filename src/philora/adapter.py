"""LoRA adapters in the PEFT format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Written so that ``peft.AutoPeftModelForCausalLM.from_pretrained(dir)``, ``transformers``
(``model.load_adapter``) and vLLM load them unaided: keys are
``base_model.model.<module>.lora_A.weight`` (r, in) and ``...lora_B.weight`` (out, r), fused
module names (Phi-3's ``qkv_proj``) kept as they are.

PEFT has no per-slice LoRA, so a ``MergedLinear`` with k enabled slices is exported as one LoRA
on the fused module of rank r*k: the same ``lora_A`` and a block-diagonal ``lora_B`` (zero rows
for disabled slices), with ``rank_pattern`` / ``alpha_pattern`` making PEFT's scaling equal ours
(alpha*k / (r*k) = alpha / r; with rsLoRA alpha*sqrt(k) / sqrt(r*k) = alpha / sqrt(r)).
Hand-written (not peft's ``save_pretrained``) because the layers are philora's own.
"""

import json
import math
import re
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

from . import lora
from .errors import PhiloraError
from .inject import lora_layers

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


class AdapterError(PhiloraError):
    """An adapter that cannot be read or does not fit the model; the message is one line."""


def _peft_factors(layer) -> Tuple[torch.Tensor, torch.Tensor]:
    """(lora_A (R, in), lora_B (out, R)) of a layer as one plain LoRA of rank R."""
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    if not isinstance(layer, lora.MergedLinear):
        return A.contiguous(), B.contiguous()
    k = sum(layer.enable_lora)
    full_B = B.new_zeros((layer.out_features, layer.r * k))
    for i, (out0, size, a, b) in enumerate(layer._slices()):
        full_B[out0:out0 + size, a] = B[b]
    return A.contiguous(), full_B


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def adapter_state(model) -> Tuple[Dict[str, torch.Tensor], Dict[str, int], Dict[str, float]]:
    """PEFT tensors plus {module: rank}, {module: alpha} for every LoRA layer of ``model``."""
    tensors, ranks, alphas = {}, {}, {}
    for name, layer in lora_layers(model).items():
        A, B = _peft_factors(layer)
        tensors[f"{PREFIX}{name}.lora_A.weight"] = A
        tensors[f"{PREFIX}{name}.lora_B.weight"] = B
        k = A.shape[0] // layer.r
        ranks[name] = A.shape[0]
        rs = getattr(layer, "use_rslora", False)
        alphas[name] = layer.lora_alpha * (math.sqrt(k) if rs else k)
    return tensors, ranks, alphas


def save_adapter(model, out_dir, base_model_name_or_path: str, r: int, lora_alpha: float,
                 lora_dropout: float = 0.0, bias: str = "none", use_rslora: bool = False) -> Path:
    """Write the PEFT adapter of ``model`` into ``out_dir``; returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors, ranks, alphas = adapter_state(model)
    if not tensors:
        raise AdapterError("the model has no LoRA layers to save")
    if bias != "none":
        for n, p in model.named_parameters():
            if p.requires_grad and n.endswith("bias") and "lora_" not in n:
                tensors[f"{PREFIX}{n}"] = p.detach()
    # Short names when they select exactly our layers (what vLLM and peft expect), else full names.
    names = list(ranks)
    shorts = sorted({_short(n) for n in names})
    all_linear = {n for n, m in model.named_modules() if _short(n) in shorts and hasattr(m, "weight")}
    target_modules = shorts if all_linear == set(names) else sorted(names)
    rank_pattern = {n: v for n, v in ranks.items() if v != r}
    alpha_pattern = {n: alphas[n] for n in rank_pattern}
    # Collapse per-layer patterns to the short name when every layer of that name agrees.
    for short in shorts:
        group = [n for n in rank_pattern if _short(n) == short]
        members = [n for n in names if _short(n) == short]
        if group and len(group) == len(members) and len({(rank_pattern[n], alpha_pattern[n]) for n in group}) == 1:
            rk, al = rank_pattern[group[0]], alpha_pattern[group[0]]
            for n in group:
                del rank_pattern[n], alpha_pattern[n]
            rank_pattern[short], alpha_pattern[short] = rk, al
    fifo = any(getattr(m, "fan_in_fan_out", False) for m in lora_layers(model).values())
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout,
        "target_modules": target_modules, "bias": bias, "fan_in_fan_out": fifo,
        "use_rslora": use_rslora, "use_dora": False, "modules_to_save": None,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "init_lora_weights": True, "inference_mode": True,
        "layers_to_transform": None, "layers_pattern": None, "revision": None,
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / WEIGHTS_NAME),
              metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out


def read_adapter_config(adapter_dir) -> dict:
    path = Path(adapter_dir) / CONFIG_NAME
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterError(f"{path}: no adapter_config.json (not a PEFT adapter directory)") from None
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None


def _pattern_value(patterns: dict, name: str, default):
    # PEFT's rule: a key matches a module whose name ends with it (as a regex).
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def load_adapter_weights(adapter_dir) -> Dict[str, torch.Tensor]:
    path = Path(adapter_dir) / WEIGHTS_NAME
    if not path.exists():
        raise AdapterError(f"{path}: missing adapter weights")
    return load_file(str(path))


def module_specs(config: dict, tensors: Dict[str, torch.Tensor]) -> Dict[str, Tuple[int, float]]:
    """{module name: (rank, alpha)} for every LoRA module in a PEFT adapter's tensors."""
    specs = {}
    for key, value in tensors.items():
        m = re.match(rf"^{re.escape(PREFIX)}(.+)\.lora_A(?:\.[^.]+)?\.weight$", key)
        if m:
            name = m.group(1)
            r = _pattern_value(config.get("rank_pattern") or {}, name, config["r"])
            alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"])
            if value.shape[0] != r:
                raise AdapterError(f"{key}: rank {value.shape[0]} but adapter_config says {r}")
            specs[name] = (r, alpha)
    return specs


def apply_adapter(model, adapter_dir, lora_dtype: torch.dtype = torch.float32) -> dict:
    """Inject and load a PEFT-format LoRA adapter into ``model`` (in place); returns its config."""
    from .inject import Target, _make_layer, _set_module

    config = read_adapter_config(adapter_dir)
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{adapter_dir}: peft_type {config.get('peft_type')!r} is not LORA")
    tensors = load_adapter_weights(adapter_dir)
    # Drop the adapter name PEFT may put in keys ("lora_A.default.weight").
    tensors = {re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", k): v for k, v in tensors.items()}
    rs = bool(config.get("use_rslora", False))
    for name, (r, alpha) in module_specs(config, tensors).items():
        try:
            base = model.get_submodule(name)
        except AttributeError:
            raise AdapterError(f"{adapter_dir}: module '{name}' is not in the base model") from None
        layer = _make_layer(base, Target(name), r, alpha, 0.0, rs, lora_dtype)
        A, B = tensors[f"{PREFIX}{name}.lora_A.weight"], tensors[f"{PREFIX}{name}.lora_B.weight"]
        if A.shape != layer.lora_A.shape or B.shape != layer.lora_B.shape:
            raise AdapterError(f"{adapter_dir}: '{name}' has lora_A {tuple(A.shape)} / lora_B "
                               f"{tuple(B.shape)}, the model needs {tuple(layer.lora_A.shape)} / "
                               f"{tuple(layer.lora_B.shape)}")
        with torch.no_grad():
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
        _set_module(model, name, layer)
    lora.mark_only_lora_as_trainable(model)
    return config
