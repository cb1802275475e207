"""``philora merge``: an adapter folded into its base model, saved as a plain Hugging Face model.

The output directory (safetensors, sharded when large; config; tokenizer; a generation config
that stops on the model's end-of-turn tokens) loads with ``AutoModelForCausalLM.from_pretrained``
and no philora or peft, and its logits are those of base + adapter.

Each update ``B @ A * scaling`` is added in float32 and the sum cast once to the output dtype
(the base's own, unless ``dtype`` says otherwise), so a bf16 model loses one rounding, not two.
A DoRA module's sum is rescaled per output row to its magnitude (``Adapter.merged_weight``).
The deltas are computed from the adapter file directly (no LoRA layers are built), so this works
for philora runs and for any PEFT LoRA adapter alike. A QLoRA run merges into its base as it was
trained: quantized to 4 bits, then dequantized (:func:`load_dequantized_base`).
The tokenizer goes with it whole: the run's (or base's) tokenizer as transformers saves it, plus
every tokenizer file of the base that save does not write (a SentencePiece ``tokenizer.model``,
which llama.cpp's converter needs).
Hand-written (not peft's ``merge_and_unload``) to own the precision and the checks.
"""

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ..core.config import ModelConfig
from ..core.diskio import guard_output, staged
from ..core.errors import PhiloraError, first_line
from ..model.adapter import Adapter, AdapterError, read_adapter
from ..model.devices import DTYPES
from ..model.families import is_4bit, is_conv1d, stop_token_ids
from ..model.inject import load_biases, set_module, target_layer
from ..model.loading import load_model_and_tokenizer, load_tokenizer, resolve_path, resolve_source
from ..model.quant import dequantize_weight, prepare_quantized

TOKENIZER_FILES = ("tokenizer.model", "spiece.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                   "vocab.txt", "chat_template.jinja", "chat_template.json")
WEIGHT_FILES = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                "pytorch_model.bin.index.json")


def merge_adapter(model, adapter: Adapter, dtype: torch.dtype) -> int:
    """Add each module's update into its base weight, computed in float32 and cast once to
    ``dtype`` (in place; no LoRA layers involved). Returns the number of merged modules."""
    tied = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    with torch.no_grad():
        for name, (A, B, _) in adapter.modules.items():
            layer = target_layer(model, name, A, B, adapter.path)
            if tied is not None and layer.weight is tied:
                raise AdapterError(f"{adapter.path}: '{name}' shares its weight with the input "
                                   f"embeddings (tied); merging would change both")
            conv1d = is_conv1d(layer)  # Conv1D stores (in, out)
            merged = adapter.merged_weight(name, layer.weight.T if conv1d else layer.weight)  # W + delta (DoRA: rescaled)
            layer.weight.data = (merged.T if conv1d else merged).contiguous().to(dtype)
            if not bool(torch.isfinite(layer.weight).all()):  # never save a model that overflowed
                raise AdapterError(f"{adapter.path}: '{name}' merged is not finite in "
                                   f"{str(dtype).replace('torch.', '')} (NaN in the adapter, or the sum "
                                   f"overflows); check the adapter, or merge with --dtype float32")
        load_biases(model, adapter, dtype)
    return len(adapter.modules)


def stored_dtype(path: str, model_cfg) -> torch.dtype:
    """The dtype the model's weights are saved in (config.json), float32 if it does not say."""
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code,
                                            revision=model_cfg.revision)
    except (OSError, ValueError) as e:
        raise PhiloraError(f"cannot load model config '{path}': {first_line(e)}") from None
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def load_base(model_cfg, path: str, dtype: torch.dtype):
    """The base model at ``path`` (``model_cfg``'s, resolved) on CPU: as stored, or (QLoRA) 4-bit
    quantized and dequantized to ``dtype``."""
    if model_cfg.quantization:
        print(f"merge: the run trained on a {model_cfg.quantization} 4-bit base: merging into its "
              f"dequantized 4-bit weights ({str(dtype).replace('torch.', '')})")
        return load_dequantized_base(replace(model_cfg, name_or_path=path), dtype)  # resolved: not again
    from transformers import AutoModelForCausalLM
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=stored_dtype(path, model_cfg), trust_remote_code=model_cfg.trust_remote_code,
            revision=model_cfg.revision)
    except (OSError, ValueError, ImportError) as e:
        raise PhiloraError(f"cannot load model '{path}': {first_line(e)}") from None


def load_dequantized_base(model_cfg: ModelConfig, dtype: torch.dtype) -> nn.Module:
    """The 4-bit base of ``model_cfg`` as a plain model in ``dtype`` on the CPU.

    Each Linear4bit becomes an ``nn.Linear`` holding its dequantised weight, layer by layer (on
    a GPU the peak is the 4-bit model plus one layer), so base + adapter merged from it computes
    what training saw. The result has no quantization config: ``save_pretrained`` writes it plain.
    """
    if not model_cfg.quantization:
        raise PhiloraError("load_dequantized_base needs model.quantization (nf4 or fp4)")
    model, _, _ = load_model_and_tokenizer(model_cfg, training=False)
    prepare_quantized(model)
    for name, m in list(model.named_modules()):
        if not is_4bit(m):
            continue
        new = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        new.weight = nn.Parameter(dequantize_weight(m.weight).to("cpu", dtype), requires_grad=False)
        if m.bias is not None:
            new.bias = nn.Parameter(m.bias.detach().to("cpu", dtype), requires_grad=False)
        set_module(model, name, new)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    elif hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model.to("cpu", dtype)


def copy_tokenizer_files(source_dirs, out_dir: Path) -> None:
    """Copy the tokenizer files of the first of ``source_dirs`` that has each, unless already in
    ``out_dir`` (what ``save_pretrained`` wrote wins: it is the tokenizer the run used)."""
    for name in TOKENIZER_FILES:
        if (out_dir / name).exists():
            continue
        for d in source_dirs:
            if d and (Path(d) / name).is_file():
                shutil.copyfile(Path(d) / name, out_dir / name)
                break


def merge(source, out, base: Optional[str] = None, dtype: Optional[str] = None,
          max_shard_size: str = "5GB") -> Path:
    """Merge the adapter of ``source`` (a run or PEFT adapter directory) into its base model and
    save the result to ``out`` (over what is there: the CLI refuses an existing output without
    --force); returns the output directory."""
    if dtype not in (None, "auto", *DTYPES):
        raise PhiloraError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    src = resolve_source(source, base)
    if src.adapter_dir is None:
        raise PhiloraError(f"{source}: nothing to merge: not a run or adapter directory (no adapter_config.json)")
    adapter = read_adapter(src.adapter_dir, dora=True)  # a bad adapter fails before the base loads
    path = resolve_path(src.model_cfg.name_or_path)
    # force: what exists is written over (the CLI asked); the base path is known only here
    out_dir = guard_output(out, force=True, directory=True, inputs=(src.adapter_dir, path))
    out_dtype = DTYPES[dtype] if dtype in DTYPES else stored_dtype(path, src.model_cfg)
    model = load_base(src.model_cfg, path, out_dtype)
    n = merge_adapter(model, adapter, out_dtype)
    model.to(out_dtype)  # the other weights: one cast (none when already out_dtype)
    try:  # a merged model without a tokenizer is still a model: said below
        tokenizer = load_tokenizer(src.tokenizer_path or path, src.model_cfg.trust_remote_code, chat=False)
    except PhiloraError:
        tokenizer = None
    if tokenizer is not None:
        model.generation_config.eos_token_id = stop_token_ids(model, tokenizer)
    with staged(out_dir) as tmp:  # written aside, then renamed in: a full disk leaves out_dir as it was
        model.save_pretrained(str(tmp), max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
            copy_tokenizer_files([src.tokenizer_path, path], tmp)
        written = {f.name for f in tmp.iterdir()}
    for pattern in WEIGHT_FILES:  # --force: no stale shard of an older model may stay behind
        for stale in out_dir.glob(pattern):
            if stale.name not in written:
                stale.unlink()
    if tokenizer is None:
        print(f"merge: no tokenizer found at '{path}'; the merged model has none")
    print(f"merged {n} LoRA modules of {src.adapter_dir} into {path} -> {out_dir} "
          f"({str(out_dtype).replace('torch.', '')})")
    return out_dir
