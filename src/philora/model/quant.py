"""QLoRA: a frozen 4-bit base (bitsandbytes NF4/FP4) with philora's LoRA layers on top.

``model.quantization: nf4 | fp4`` loads the base through transformers' ``BitsAndBytesConfig``:
every ``nn.Linear`` but the LM head becomes a ``bnb.nn.Linear4bit`` whose matmuls run in
``compute_dtype``. LoRA targets on those layers become ``lora.LoRALinear`` layers that keep the
bitsandbytes module whole (``base_layer``, its forward used) and add the LoRA branch as on any
base, with the same ``lora_A`` / ``lora_B`` names and shapes, so checkpoints and PEFT adapters
are unchanged; DoRA's norms see the weight through :func:`dequantize_weight`, which
``inject.lora_layer`` hands the layer (``philora.lora`` never imports bitsandbytes).

A 4-bit weight cannot take a LoRA delta in place, so merging goes through
the dequantised base (``merge.load_dequantized_base``, with :func:`dequantize_weight`).
Hand-written around bitsandbytes (not PEFT's bnb layers) because the LoRA layers are philora's.
"""

from typing import Optional

import torch
import torch.nn as nn

from ..core.config import ModelConfig
from ..core.errors import PhiloraError
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


def no_cpu_repacking(m: nn.Module) -> None:
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
        no_cpu_repacking(m)
    return model


# -- the plain weight: merging, and DoRA's norms ------------------------------------------------

def dequantize_weight(weight) -> torch.Tensor:
    """A ``Params4bit`` weight as a plain (out, in) tensor in its original dtype."""
    import bitsandbytes.functional as bf
    data, state = weight.data, weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):  # undo bitsandbytes' CPU inference layout
        data, state = bf._convert_weight_packed_for_cpu_inverse(data, state)
    return bf.dequantize_4bit(data, state)
