"""Load a causal LM and its tokenizer with transformers, ready for LoRA training or inference.

``name_or_path`` is a hub id (e.g. ``microsoft/Phi-3-mini-4k-instruct``), a local directory,
or ``tiny`` (the built-in tiny Phi-3, built offline on first use). ``trust_remote_code`` stays
off unless the config turns it on.
"""

from typing import Optional, Tuple

import torch

from .config import ModelConfig
from .errors import PhiloraError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a CUDA device that supports it, else fp32 (CPU, old GPUs)."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return DTYPES[name]


def resolve_path(name_or_path: str) -> str:
    from .tiny import resolve_model
    return resolve_model(name_or_path)


def load_tokenizer(path: str, trust_remote_code: bool = False, revision: Optional[str] = None):
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    except OSError as e:
        raise PhiloraError(f"cannot load tokenizer '{path}': {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:
        # Padding is never a label here (labels come from the chat template, -100 elsewhere),
        # so any existing token works as pad; eos is the conventional choice.
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        raise PhiloraError(f"tokenizer '{path}' has no chat template; use an instruct/chat model")
    return tok


def load_model_and_tokenizer(cfg: ModelConfig, device: Optional[torch.device] = None,
                             training: bool = True) -> Tuple[torch.nn.Module, object, str]:
    """(model on ``device``, tokenizer, resolved path). The model's weights are frozen."""
    from transformers import AutoModelForCausalLM

    device = device or pick_device()
    path = resolve_path(cfg.name_or_path)
    dtype = resolve_dtype(cfg.dtype, device)
    attn = cfg.attn_implementation
    # Training with sdpa: the same attention run per packed conversation, without transformers'
    # block-diagonal mask over the whole row (attention.py; plain sdpa whenever a mask is given).
    if attn == "philora_sdpa" or (attn == "sdpa" and training):
        from .attention import register
        attn = register()
    kwargs = dict(dtype=dtype, attn_implementation=attn,
                  trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    if cfg.quantization:
        from .quant import quantization_kwargs
        kwargs.update(quantization_kwargs(cfg, device))
    tokenizer = load_tokenizer(path, cfg.trust_remote_code, cfg.revision)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        raise PhiloraError(f"cannot load model '{path}': {str(e).splitlines()[0]}") from None
    if cfg.quantization:
        # bitsandbytes repacks 4-bit weights on some CPUs at the first no-grad call, after which
        # the layer has no backward; prepare_quantized turns that off (and checks 4-bit happened).
        from .quant import prepare_quantized
        prepare_quantized(model)
    else:
        model.to(device)
    model.requires_grad_(False)
    model.config.use_cache = not training
    if training and cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer, path
