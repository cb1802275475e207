"""Per-architecture facts, in one small table: fused projections, their slices and aliases.

Phi-3 fuses q/k/v into ``self_attn.qkv_proj`` (rows: q, then k, then v) and gate/up into
``mlp.gate_up_proj`` (rows: gate, then up). With grouped-query attention (Phi-3-small/medium)
the q/k/v slices are unequal, so sizes come from the model config, never from out_features / 3.

``SLICE_ALIASES`` lets the Llama-style target names of the Phi-3 cookbook
(``q_proj``, ``k_proj``, ``v_proj``, ``gate_proj``, ``up_proj``) mean slices of the fused
modules, instead of silently matching nothing as they do in PEFT.
"""

from typing import Dict, List, Optional, Tuple


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
