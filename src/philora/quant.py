"""QLoRA: a frozen 4-bit base (bitsandbytes NF4/FP4) with philora's LoRA layers on top.

``model.quantization: nf4 | fp4`` loads the base through transformers' ``BitsAndBytesConfig``:
every ``nn.Linear`` but the LM head becomes a ``bnb.nn.Linear4bit`` whose matmuls run in
``compute_dtype``. LoRA targets on those layers become :class:`Linear4bitLoRA` /
:class:`MergedLinear4bitLoRA`: they keep the bitsandbytes module whole (``base_layer``) and add
the LoRA branch exactly as ``philora.lora.Linear`` / ``MergedLinear`` do, with the same
``lora_A`` / ``lora_B`` names and shapes, so checkpoints and PEFT adapters are unchanged.

A 4-bit weight cannot take a LoRA delta in place, so merging goes through
:func:`load_dequantized_base`: the 4-bit base, dequantised to a plain model in the output dtype.
Hand-written around bitsandbytes (not PEFT's bnb layers) because the LoRA layers are philora's.
"""

import math

import torch
import torch.nn as nn

from . import lora
from .config import ModelConfig
from .errors import PhiloraError
from .lora.layers import _lora_branch

BNB_DEVICES = ("cuda", "cpu", "xpu")


def _bnb():
    try:
        import bitsandbytes
    except ImportError:
        raise PhiloraError("model.quantization needs bitsandbytes: pip install bitsandbytes "
                           "(or set model.quantization: null)") from None
    return bitsandbytes


def _check_quantizable(cfg: ModelConfig) -> None:
    """Fail before a long load when transformers would find nothing to quantise."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from .loading import resolve_path
    try:
        config = AutoConfig.from_pretrained(resolve_path(cfg.name_or_path), revision=cfg.revision,
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


def quantization_kwargs(cfg: ModelConfig, device: torch.device) -> dict:
    """``from_pretrained`` keyword arguments that load the base in 4 bits on ``device``."""
    if not cfg.quantization:
        return {}
    if cfg.quantization not in ("nf4", "fp4"):
        raise PhiloraError(f"model.quantization must be nf4, fp4 or null, got {cfg.quantization!r}")
    _bnb()
    if device.type not in BNB_DEVICES:
        raise PhiloraError(f"model.quantization: bitsandbytes 4-bit does not run on '{device.type}'; "
                           f"use a CUDA GPU or the CPU, or set model.quantization: null")
    _check_quantizable(cfg)
    from transformers import BitsAndBytesConfig

    from .loading import resolve_dtype
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quantization,
                           bnb_4bit_use_double_quant=cfg.double_quant,
                           bnb_4bit_compute_dtype=resolve_dtype(cfg.compute_dtype, device))
    return {"quantization_config": q, "device_map": {"": str(device)}}


def _is_4bit(m: nn.Module) -> bool:
    return type(m).__name__ == "Linear4bit"


def _no_cpu_repacking(m: nn.Module) -> None:
    # bitsandbytes repacks a CPU Linear4bit's weight in place for AVX512-BF16 the first time it
    # runs in eval mode without grad, and from then on multiplies through a kernel with no
    # autograd: training after an eval would silently lose the base layer's input gradient.
    if hasattr(m, "support_avx512bf16_for_cpu"):
        m.support_avx512bf16_for_cpu = False


def prepare_quantized(model: nn.Module) -> nn.Module:
    """Check a 4-bit-loaded model really has 4-bit layers; keep them trainable on CPU."""
    layers = [m for m in model.modules() if _is_4bit(m)]
    if not layers:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise PhiloraError(f"model.quantization: no layer of model type '{model_type}' was "
                           f"quantised to 4 bits; set model.quantization: null")
    for m in layers:
        _no_cpu_repacking(m)
    return model


# -- LoRA on a quantized base ------------------------------------------------------------------

class _QuantBase:
    """Mixin: the frozen base is a bitsandbytes module kept whole as ``base_layer``."""

    weight = property(lambda self: self.base_layer.weight)
    bias = property(lambda self: self.base_layer.bias)

    def _setup(self, base: nn.Module, shape_A: tuple, shape_B: tuple, use_rslora: bool,
               dtype: torch.dtype) -> None:
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.fan_in_fan_out = False
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(shape_A, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(shape_B, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as loralib and PEFT
        nn.init.zeros_(self.lora_B)
        self.scaling = self.lora_alpha / (math.sqrt(self.r) if use_rslora else self.r)
        self.use_rslora = use_rslora
        _no_cpu_repacking(base)
        self.train(base.training)

    def reset_parameters(self):  # only the LoRA factors: the 4-bit base is data, not init
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def _frozen_weight(self):
        raise PhiloraError("cannot merge LoRA into a 4-bit base layer in place; merge with "
                           "`philora merge` (it dequantises the base first)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The 4-bit base runs as bitsandbytes' module; the LoRA half is lora.Linear's /
        # lora.MergedLinear's own _lora_out (the other base of each class below).
        result = self.base_layer(x)
        h = _lora_branch(x, self.lora_dropout, self.lora_A) * self.scaling
        return result + self._lora_out(h).to(result.dtype)


class Linear4bitLoRA(_QuantBase, lora.Linear):
    """``base_layer(x) + (dropout(x) A.T B.T) * scaling``; lora_A (r, in), lora_B (out, r)."""

    def __init__(self, base: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False, lora_dtype: torch.dtype = torch.float32):
        nn.Module.__init__(self)
        lora.LoRALayer.__init__(self, r, lora_alpha, lora_dropout, merge_weights=False)
        self._setup(base, (r, base.in_features), (base.out_features, r), use_rslora, lora_dtype)


class MergedLinear4bitLoRA(_QuantBase, lora.MergedLinear):
    """A fused 4-bit projection with LoRA on some slices; factors as ``lora.MergedLinear``."""

    def __init__(self, base: nn.Module, r: int, lora_alpha: float, enable_lora, split_sizes,
                 lora_dropout: float = 0.0, use_rslora: bool = False,
                 lora_dtype: torch.dtype = torch.float32):
        nn.Module.__init__(self)
        lora.LoRALayer.__init__(self, r, lora_alpha, lora_dropout, merge_weights=False)
        self.enable_lora = [bool(e) for e in enable_lora]
        self.split_sizes = [int(s) for s in split_sizes]
        if sum(self.split_sizes) != base.out_features or not any(self.enable_lora):
            raise ValueError(f"split_sizes {self.split_sizes} must sum to {base.out_features} "
                             f"with at least one slice enabled")
        rows = sum(s for s, e in zip(self.split_sizes, self.enable_lora) if e)
        self._setup(base, (r * sum(self.enable_lora), base.in_features), (rows, r), use_rslora,
                    lora_dtype)


def make_lora_quantized(base: nn.Module, target, r: int, alpha: float, dropout: float,
                        use_rslora: bool, lora_dtype: torch.dtype) -> nn.Module:
    """The LoRA layer for a bitsandbytes base (``inject.Target``: whole module or slices)."""
    if target.slices is None:
        return Linear4bitLoRA(base, r, alpha, dropout, use_rslora, lora_dtype)
    enable = [s in target.slices for s in target.slice_names]
    return MergedLinear4bitLoRA(base, r, alpha, enable, target.split_sizes, dropout, use_rslora,
                                lora_dtype)


# -- merging: dequantise the base first --------------------------------------------------------

def dequantize_weight(weight) -> torch.Tensor:
    """A ``Params4bit`` weight as a plain (out, in) tensor in its original dtype."""
    import bitsandbytes.functional as bf
    data, state = weight.data, weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):  # undo bitsandbytes' CPU inference layout
        data, state = bf._convert_weight_packed_for_cpu_inverse(data, state)
    return bf.dequantize_4bit(data, state)


def load_dequantized_base(model_cfg: ModelConfig, dtype: torch.dtype) -> nn.Module:
    """The 4-bit base of ``model_cfg`` as a plain model in ``dtype`` on the CPU.

    Each Linear4bit becomes an ``nn.Linear`` holding its dequantised weight, layer by layer (on
    a GPU the peak is the 4-bit model plus one layer), so base + adapter merged from it computes
    what training saw. The result has no quantization config: ``save_pretrained`` writes it plain.
    """
    from .loading import load_model_and_tokenizer
    if not model_cfg.quantization:
        raise PhiloraError("load_dequantized_base needs model.quantization (nf4 or fp4)")
    model, _, _ = load_model_and_tokenizer(model_cfg, training=False)
    prepare_quantized(model)
    for name, m in list(model.named_modules()):
        if not _is_4bit(m):
            continue
        new = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        new.weight = nn.Parameter(dequantize_weight(m.weight).to("cpu", dtype), requires_grad=False)
        if m.bias is not None:
            new.bias = nn.Parameter(m.bias.detach().to("cpu", dtype), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    elif hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model.to("cpu", dtype)
