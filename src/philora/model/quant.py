"""QLoRA: a frozen 4-bit base (bitsandbytes NF4/FP4) with philora's LoRA layers on top.

``model.quantization: nf4 | fp4`` loads the base through transformers' ``BitsAndBytesConfig``:
every ``nn.Linear`` but the LM head becomes a ``bnb.nn.Linear4bit`` whose matmuls run in
``compute_dtype``. LoRA targets on those layers become :class:`Linear4bitLoRA` /
:class:`MergedLinear4bitLoRA`: they keep the bitsandbytes module whole (``base_layer``) and add
the LoRA branch exactly as ``philora.lora.Linear`` / ``MergedLinear`` do, with the same
``lora_A`` / ``lora_B`` names and shapes, so checkpoints and PEFT adapters are unchanged.

A 4-bit weight cannot take a LoRA delta in place, so merging goes through
the dequantised base (``merge.load_dequantized_base``, with :func:`dequantize_weight`).
Hand-written around bitsandbytes (not PEFT's bnb layers) because the LoRA layers are philora's.
"""

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn

from .. import lora
from ..core.config import ModelConfig
from ..core.errors import PhiloraError
from . import fused
from .devices import resolve_dtype
from .families import is_4bit

BNB_DEVICES = ("cuda", "cpu", "xpu")


def _bnb():
    try:
        import bitsandbytes
    except ImportError:
        raise PhiloraError("model.quantization needs bitsandbytes: pip install bitsandbytes "
                           "(or set model.quantization: null)") from None
    return bitsandbytes


def _check_quantizable(cfg: ModelConfig, path: str) -> None:
    """Fail before a long load when transformers would find nothing to quantise."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    try:
        config = AutoConfig.from_pretrained(path, revision=cfg.revision,
                                            trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError):
        return  # the loader reports an unloadable model in its own words
    existing = getattr(config, "quantization_config", None)
    if existing is not None:
        get = existing.get if isinstance(existing, dict) else lambda k: getattr(existing, k, "?")
        method = str(getattr(get("quant_method"), "value", get("quant_method")))
        if method != "bitsandbytes":
            raise PhiloraError(f"model.quantization: '{cfg.name_or_path}' is already quantised "
                               f"({method}); use its unquantised base model or set model.quantization: null")
        return
    try:  # the architecture on the meta device: free, and exactly what transformers will convert
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, ImportError):
        return
    head = model.get_output_embeddings()
    if not any((type(m) is nn.Linear or isinstance(m, Conv1D)) and m is not head for m in model.modules()):
        raise PhiloraError(f"model.quantization: bitsandbytes finds no nn.Linear layer to quantise in "
                           f"model type '{config.model_type}'; set model.quantization: null")


def quantization_kwargs(cfg: ModelConfig, device: torch.device, path: Optional[str] = None) -> dict:
    """``from_pretrained`` keyword arguments that load the base (at ``path``, default
    ``cfg.name_or_path``) in 4 bits on ``device``."""
    if not cfg.quantization:
        return {}
    if cfg.quantization not in ("nf4", "fp4"):
        raise PhiloraError(f"model.quantization must be nf4, fp4 or null, got {cfg.quantization!r}")
    _bnb()
    if device.type not in BNB_DEVICES:
        raise PhiloraError(f"model.quantization: bitsandbytes 4-bit does not run on '{device.type}'; "
                           f"use a CUDA GPU or the CPU, or set model.quantization: null")
    _check_quantizable(cfg, path or cfg.name_or_path)
    from transformers import BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quantization,
                           bnb_4bit_use_double_quant=cfg.double_quant,
                           bnb_4bit_compute_dtype=resolve_dtype(cfg.compute_dtype, device))
    return {"quantization_config": q, "device_map": {"": str(device)}}


def _no_cpu_repacking(m: nn.Module) -> None:
    # bitsandbytes repacks a CPU Linear4bit's weight in place for AVX512-BF16 the first time it
    # runs in eval mode without grad, and from then on multiplies through a kernel with no
    # autograd: training after an eval would silently lose the base layer's input gradient.
    if hasattr(m, "support_avx512bf16_for_cpu"):
        m.support_avx512bf16_for_cpu = False


def prepare_quantized(model: nn.Module) -> nn.Module:
    """Check a 4-bit-loaded model really has 4-bit layers; keep them trainable on CPU."""
    layers = [m for m in model.modules() if is_4bit(m)]
    if not layers:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise PhiloraError(f"model.quantization: no layer of model type '{model_type}' was "
                           f"quantised to 4 bits; set model.quantization: null")
    for m in layers:
        _no_cpu_repacking(m)
    return model


# -- LoRA on a quantized base ------------------------------------------------------------------

class _QuantBase:
    """Mixin: the frozen base is a bitsandbytes module kept whole as ``base_layer``. The LoRA
    factors are made here with their shapes only (on the meta device): ``inject.lora_layer``
    gives them their device, dtype, init and scaling, as for every other LoRA layer."""

    weight = property(lambda self: self.base_layer.weight)
    bias = property(lambda self: self.base_layer.bias)

    def _setup(self, base: nn.Module, shape_A: tuple, shape_B: tuple) -> None:
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.fan_in_fan_out = False
        self.lora_A = nn.Parameter(torch.empty(shape_A, device="meta"))
        self.lora_B = nn.Parameter(torch.empty(shape_B, device="meta"))
        self.scaling = self.lora_alpha / self.r
        _no_cpu_repacking(base)
        self.train(base.training)

    def reset_parameters(self):  # only the LoRA factors: the 4-bit base is data, not init
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def _frozen_weight(self):
        raise PhiloraError("cannot merge LoRA into a 4-bit base layer in place; merge with "
                           "`philora merge` (it dequantises the base first)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The 4-bit base runs as bitsandbytes' module; the LoRA branch is lora.Linear's /
        # lora.MergedLinear's own (the other base of each class below).
        result = self.base_layer(x)
        cdt = fused.compute_dtype(self, x)
        if cdt is not None:  # training: the LoRA half of fused.py's one autograd function
            return fused.lora_linear(self, x, result, cdt)
        return result + self.lora_forward(x).to(result.dtype)


class Linear4bitLoRA(_QuantBase, lora.Linear):
    """``base_layer(x) + (dropout(x) A.T B.T) * scaling``; lora_A (r, in), lora_B (out, r)."""

    def __init__(self, base: nn.Module, r: int, lora_alpha: float):
        nn.Module.__init__(self)
        lora.LoRALayer.__init__(self, r, lora_alpha, 0.0, merge_weights=False)
        self._setup(base, (r, base.in_features), (base.out_features, r))


class MergedLinear4bitLoRA(_QuantBase, lora.MergedLinear):
    """A fused 4-bit projection with LoRA on some slices; factors as ``lora.MergedLinear``."""

    def __init__(self, base: nn.Module, r: int, lora_alpha: float, enable_lora: Sequence[bool],
                 split_sizes: Sequence[int]):
        nn.Module.__init__(self)
        lora.LoRALayer.__init__(self, r, lora_alpha, 0.0, merge_weights=False)
        self.enable_lora = [bool(e) for e in enable_lora]
        self.split_sizes = [int(s) for s in split_sizes]
        if sum(self.split_sizes) != base.out_features or not any(self.enable_lora):
            raise ValueError(f"split_sizes {self.split_sizes} must sum to {base.out_features} "
                             f"with at least one slice enabled")
        rows = sum(s for s, e in zip(self.split_sizes, self.enable_lora) if e)
        self._setup(base, (r * sum(self.enable_lora), base.in_features), (rows, r))


# -- merging: dequantise the base first --------------------------------------------------------

def dequantize_weight(weight) -> torch.Tensor:
    """A ``Params4bit`` weight as a plain (out, in) tensor in its original dtype."""
    import bitsandbytes.functional as bf
    data, state = weight.data, weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):  # undo bitsandbytes' CPU inference layout
        data, state = bf._convert_weight_packed_for_cpu_inverse(data, state)
    return bf.dequantize_4bit(data, state)
