"""``philora merge``: an adapter folded into its base model, saved as a plain Hugging Face model.

The output directory (safetensors, sharded when large; config; tokenizer; a generation config
that stops on the model's end-of-turn tokens) loads with ``AutoModelForCausalLM.from_pretrained``
and no philora or peft, and its logits are those of base + adapter.

Each update ``B @ A * scaling`` is added in float32 and the sum cast once to the output dtype
(the base's own, unless ``dtype`` says otherwise), so a bf16 model loses one rounding, not two.
The deltas are computed from the adapter file directly (no LoRA layers are built), so this works
for philora runs and for any PEFT LoRA adapter alike. A QLoRA run merges into its base as it was
trained: quantized to 4 bits, then dequantized (``quant.load_dequantized_base``).
Hand-written (not peft's ``merge_and_unload``) to own the precision and the checks.
"""

from pathlib import Path
from typing import Optional

import torch

from .adapter import Adapter, AdapterError, load_biases, prepare_output_dir, read_adapter, target_layer
from .errors import PhiloraError
from .generate import resolve_source, stop_token_ids

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_FILES = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                "pytorch_model.bin.index.json")


def merge_adapter(model, adapter: Adapter, dtype: torch.dtype) -> int:
    """Add each module's update into its base weight, computed in float32 and cast once to
    ``dtype`` (in place; no LoRA layers involved). Returns the number of merged modules."""
    from .inject import _is_conv1d
    tied = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    with torch.no_grad():
        for name, (A, B, _) in adapter.modules.items():
            layer = target_layer(model, name, A, B, adapter.path)
            if tied is not None and layer.weight is tied:
                raise AdapterError(f"{adapter.path}: '{name}' shares its weight with the input "
                                   f"embeddings (tied); merging would change both")
            delta = adapter.delta(name)
            delta = delta.T if _is_conv1d(layer) else delta  # Conv1D stores (in, out)
            layer.weight.data = (layer.weight.float() + delta).to(dtype)
        load_biases(model, adapter, dtype)
    return len(adapter.modules)


def stored_dtype(path: str, model_cfg) -> torch.dtype:
    """The dtype the model's weights are saved in (config.json), float32 if it does not say."""
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code,
                                            revision=model_cfg.revision)
    except (OSError, ValueError) as e:
        raise PhiloraError(f"cannot load model config '{path}': {str(e).splitlines()[0]}") from None
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def load_base(model_cfg, path: str, dtype: torch.dtype):
    """The base model on CPU: as stored, or (QLoRA) 4-bit quantized and dequantized to ``dtype``."""
    if model_cfg.quantization:
        from .quant import load_dequantized_base
        print(f"merge: the run trained on a {model_cfg.quantization} 4-bit base: merging into its "
              f"dequantized 4-bit weights ({str(dtype).replace('torch.', '')})")
        return load_dequantized_base(model_cfg, dtype)
    from transformers import AutoModelForCausalLM
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=stored_dtype(path, model_cfg), trust_remote_code=model_cfg.trust_remote_code,
            revision=model_cfg.revision)
    except (OSError, ValueError, ImportError) as e:
        raise PhiloraError(f"cannot load model '{path}': {str(e).splitlines()[0]}") from None


def _tokenizer(path: str, trust_remote_code: bool):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None


def merge(source, out, base: Optional[str] = None, dtype: Optional[str] = None, force: bool = False,
          max_shard_size: str = "5GB") -> Path:
    """Merge the adapter of ``source`` (a run or PEFT adapter directory) into its base model and
    save the result to ``out``; returns the output directory."""
    from .loading import resolve_path

    if dtype not in (None, "auto", *DTYPES):
        raise PhiloraError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    src = resolve_source(source, base)
    if src.adapter_dir is None:
        raise PhiloraError(f"{source}: nothing to merge: not a run or adapter directory (no adapter_config.json)")
    adapter = read_adapter(src.adapter_dir)  # a bad adapter fails before the base loads
    path = resolve_path(src.model_cfg.name_or_path)
    out_dir = prepare_output_dir(out, force, protect=(src.adapter_dir, path))
    out_dtype = DTYPES[dtype] if dtype in DTYPES else stored_dtype(path, src.model_cfg)
    model = load_base(src.model_cfg, path, out_dtype)
    n = merge_adapter(model, adapter, out_dtype)
    model.to(out_dtype)  # the other weights: one cast (none when already out_dtype)
    tokenizer = _tokenizer(src.tokenizer_path or path, src.model_cfg.trust_remote_code)
    if tokenizer is not None:
        model.generation_config.eos_token_id = stop_token_ids(model, tokenizer)
    for pattern in WEIGHT_FILES:  # --force: no stale shard of an older model may stay behind
        for stale in out_dir.glob(pattern):
            stale.unlink()
    model.save_pretrained(str(out_dir), max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    else:
        print(f"merge: no tokenizer found at '{path}'; the merged model has none")
    print(f"merged {n} LoRA modules of {src.adapter_dir} into {path} -> {out_dir} "
          f"({str(out_dtype).replace('torch.', '')})")
    return out_dir

