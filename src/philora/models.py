"""Per-architecture facts, in one small table: fused projections, their slices and aliases.

Phi-3 fuses q/k/v into ``self_attn.qkv_proj`` (rows: q, then k, then v) and gate/up into
``mlp.gate_up_proj`` (rows: gate, then up). With grouped-query attention (Phi-3-small/medium)
the q/k/v slices are unequal, so sizes come from the model config, never from out_features / 3.

``SLICE_ALIASES`` lets the Llama-style target names of the Phi-3 cookbook
(``q_proj``, ``k_proj``, ``v_proj``, ``gate_proj``, ``up_proj``) mean slices of the fused
modules, instead of silently matching nothing as they do in PEFT.

Also here: what kind of linear layer a module is (``nn.Linear``, GPT-2's ``Conv1D``, a
bitsandbytes 4-bit ``Linear4bit``) and which tokens end a reply.
"""

import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch.nn as nn


def _head_dim(c) -> int:
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def _qkv_sizes(c) -> List[int]:
    hd = _head_dim(c)
    kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return [c.num_attention_heads * hd, kv * hd, kv * hd]


def _gate_up_sizes(c) -> List[int]:
    return [c.intermediate_size, c.intermediate_size]


# model_type -> fused module name (last dotted part) -> (slice names, config -> slice sizes)
FUSED_MODULES: Dict[str, Dict[str, Tuple[Tuple[str, ...], object]]] = {
    "phi3": {
        "qkv_proj": (("q", "k", "v"), _qkv_sizes),
        "gate_up_proj": (("gate", "up"), _gate_up_sizes),
    },
}

# model_type -> Llama-style target name -> (fused module, slice)
SLICE_ALIASES: Dict[str, Dict[str, Tuple[str, str]]] = {
    "phi3": {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"),
        "up_proj": ("gate_up_proj", "up"),
    },
}

# Stop tokens beyond the tokenizer's eos, by model type (Phi-3 ends a turn with <|end|>).
STOP_TOKENS: Dict[str, Tuple[str, ...]] = {
    "phi3": ("<|end|>", "<|endoftext|>", "<|assistant|>"),
}


def fused_slices(config, module_name: str) -> Optional[Tuple[Tuple[str, ...], List[int]]]:
    """(slice names, slice sizes) of a fused module of this model, or None if it is not fused."""
    table = FUSED_MODULES.get(getattr(config, "model_type", None), {})
    entry = table.get(module_name.rsplit(".", 1)[-1])
    if entry is None:
        return None
    names, sizes = entry
    return names, sizes(config)


def slice_aliases(config) -> Dict[str, Tuple[str, str]]:
    return SLICE_ALIASES.get(getattr(config, "model_type", None), {})


def stop_token_strings(config) -> Tuple[str, ...]:
    return STOP_TOKENS.get(getattr(config, "model_type", None), ())


def stop_token_ids(model, tokenizer) -> List[int]:
    """Ids that end a reply: the generation config's eos ids, the tokenizer's eos and the
    architecture's end-of-turn tokens (Phi-3: ``<|end|>``), sorted."""
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    ids.append(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids += [vocab[s] for s in stop_token_strings(model.config) if s in vocab]
    return sorted({int(i) for i in ids if i is not None})


# -- kinds of linear layer -----------------------------------------------------------------------

def is_conv1d(m: nn.Module) -> bool:
    """transformers' GPT-2-style ``Conv1D``: a linear layer whose weight is stored (in, out)."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


def is_4bit(m: nn.Module) -> bool:
    """A bitsandbytes 4-bit linear layer (QLoRA's frozen base); by name, so bitsandbytes stays
    an optional import."""
    return type(m).__name__ == "Linear4bit"


def is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or is_conv1d(m)


def linear_shape(m: nn.Module) -> Optional[Tuple[int, int]]:
    """(in, out) of a linear layer of any of the kinds above, else None."""
    if is_conv1d(m):
        return tuple(m.weight.shape)
    if isinstance(m, nn.Linear) or is_4bit(m):
        return m.in_features, m.out_features
    return None


def short_names(names: Sequence[str]) -> str:
    """"model.layers.0.self_attn.qkv_proj" -> "self_attn.qkv_proj", one per distinct suffix, for
    error messages that list a model's modules."""
    return ", ".join(sorted({re.sub(r"^.*?\.\d+\.", "", n) for n in names}))
