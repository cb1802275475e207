"""Per-architecture facts, in one small table: fused projections, their slices and aliases.

Phi-3 fuses q/k/v into ``self_attn.qkv_proj`` (rows: q, then k, then v) and gate/up into
``mlp.gate_up_proj`` (rows: gate, then up). With grouped-query attention (Phi-3-small/medium)
the q/k/v slices are unequal, so sizes come from the model config, never from out_features / 3.

``SLICE_ALIASES`` lets the Llama-style target names of the Phi-3 cookbook
(``q_proj``, ``k_proj``, ``v_proj``, ``gate_proj``, ``up_proj``) mean slices of the fused
modules, instead of silently matching nothing as they do in PEFT.

Also here: what kind of linear layer a module is (``nn.Linear``, GPT-2's ``Conv1D``, a
bitsandbytes 4-bit ``Linear4bit``), which tokens end a reply (the generation config's, the
tokenizer's eos, and the end-of-turn token the chat template puts after an assistant message,
which is what training labels), where LongRoPE switches factor sets and what that means for
serving, the final-logit softcap (Gemma 2), and the syntax in which a family's chat models write
tool calls (``TOOL_CALL_FORMATS``).
"""

import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch.nn as nn

from ..data.encoding import PROBE  # an assistant message whose end the template shows


def head_dim(c) -> int:
    """The attention head size of a model config (its ``head_dim``, else hidden / heads)."""
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def kv_heads(c) -> int:
    """The key/value head count of a model config (fewer than the query heads under GQA)."""
    return getattr(c, "num_key_value_heads", None) or c.num_attention_heads


def _qkv_sizes(c) -> List[int]:
    hd, kv = head_dim(c), kv_heads(c)
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

# Gated SiLU MLPs, by class name: down(silu(gate) * up), gate and up from one fused projection
# (its rows: gate, then up) or from two. fused.fuse_mlps trains these through one autograd
# function that saves less; each entry is checked against the class's own forward in the tests.
GATED_MLPS: Dict[str, Tuple[Tuple[str, ...], str]] = {  # class -> (projections, activation attribute)
    "Phi3MLP": (("gate_up_proj",), "activation_fn"),
    "LlamaMLP": (("gate_proj", "up_proj"), "act_fn"),
    "MistralMLP": (("gate_proj", "up_proj"), "act_fn"),
    "Qwen2MLP": (("gate_proj", "up_proj"), "act_fn"),
    "Qwen3MLP": (("gate_proj", "up_proj"), "act_fn"),
}

# Stop tokens beyond the tokenizer's eos, by model type (Phi-3 ends a turn with <|end|>).
STOP_TOKENS: Dict[str, Tuple[str, ...]] = {
    "phi3": ("<|end|>", "<|endoftext|>", "<|assistant|>"),
}


# How a family's chat models write tool calls: (format, the tokens or template text that identify
# it, all of them, in the tokenizer's vocabulary or its chat template; vLLM's --tool-call-parser).
# use/toolcalls.py parses each format.
TOOL_CALL_FORMATS: Tuple[Tuple[str, Tuple[str, ...], str], ...] = (
    # vLLM's phi4_mini_json reads functools[..], none of these: export/toolparser.py's plugin reads them
    ("phi4_mini", ("<|tool_call|>", "<|/tool_call|>"), "phi4_mini_json"),  # <|tool_call|>[{..}]<|/tool_call|>
    ("hermes", ("<tool_call>",), "hermes"),  # Qwen2.5, Hermes 2/3: <tool_call>{..}</tool_call>
    ("llama3_json", ("<|start_header_id|>", "<|eot_id|>"), "llama3_json"),  # Llama 3.x: {"name", "parameters"}
)


def tool_call_format(tokenizer) -> Optional[str]:
    """The tool-call format of the tokenizer's model family (``TOOL_CALL_FORMATS``), or None."""
    vocab = tokenizer.get_vocab()
    template = getattr(tokenizer, "chat_template", None) or ""
    template = template if isinstance(template, str) else " ".join(map(str, template.values()))
    for name, marks, _ in TOOL_CALL_FORMATS:
        if all(m in vocab or m in template for m in marks):
            return name
    return None


def vllm_tool_parser(fmt: Optional[str]) -> Optional[str]:
    """vLLM's --tool-call-parser for a tool-call format."""
    return next((parser for name, _, parser in TOOL_CALL_FORMATS if name == fmt), None)


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




def end_of_turn_ids(tokenizer) -> List[int]:
    """The token the chat template puts right after an assistant message's content: the first
    added (special) token after it, as training labels it (``<|end|>``, ``<|im_end|>``,
    ``<|eot_id|>``, ``<end_of_turn>``, ``</s>``). [] when the template cannot show one."""
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": PROBE}]
    try:
        text = tokenizer.apply_chat_template(chat, tokenize=False)
    except Exception:  # a template that rejects even this (or none at all): nothing to learn
        return []
    at = text.find(PROBE) if isinstance(text, str) else -1
    if at < 0:
        return []
    added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    tail = tokenizer(text[at + len(PROBE):], add_special_tokens=False)["input_ids"]
    return [int(t) for t in tail if t in added][:1]


def stop_token_ids(model, tokenizer) -> List[int]:
    """Ids that end a reply, sorted: the model's generation config's eos ids, the tokenizer's
    eos, the chat template's end-of-turn token and the architecture's table (Phi-3 also stops on
    ``<|assistant|>``)."""
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    ids.append(tokenizer.eos_token_id)
    ids += end_of_turn_ids(tokenizer)
    vocab = tokenizer.get_vocab()
    ids += [vocab[s] for s in stop_token_strings(model.config) if s in vocab]
    return sorted({int(i) for i in ids if i is not None})


# -- rotary factors and logits ---------------------------------------------------------------------

def text_config(config):
    """The language model's config: a multimodal config's ``text_config``, else the config itself."""
    return getattr(config, "text_config", None) or config


def longrope_switch(config) -> Optional[int]:
    """``original_max_position_embeddings`` of a LongRoPE model (Phi-3-mini-128k, Phi-3.5-mini,
    Phi-4-mini): conversations longer than this use the long factors. None for other models."""
    if config is None:
        return None
    config = text_config(config)
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(params, dict) or params.get("rope_type", params.get("type")) != "longrope":
        return None
    switch = params.get("original_max_position_embeddings") or getattr(
        config, "original_max_position_embeddings", None)
    return int(switch) if switch else None


def longrope_advice(switch: int, short: int, long: int) -> str:
    """How to serve an adapter trained on ``short`` / ``long`` conversations of a LongRoPE
    model (one line). Serving engines pick one factor set per deployment: vLLM from
    ``--max-model-len`` (long above the switch), llama.cpp from ``n_ctx``."""
    if long == 0:
        return (f"LongRoPE: trained with the short factors only (all {short} conversations <= {switch} "
                f"tokens): serve on the same side, vLLM --max-model-len {switch} (or less; above "
                f"{switch} every request uses the long factors)")
    if short == 0:
        return (f"LongRoPE: trained with the long factors only (all {long} conversations > {switch} "
                f"tokens): serve with vLLM --max-model-len above {switch} (then every request uses "
                f"the long factors, as trained)")
    return (f"LongRoPE: trained on both sides of the switch at {switch} tokens ({short} conversations "
            f"with the short factors, {long} with the long): vLLM uses one set for every request, "
            f"short with --max-model-len <= {switch}, long above; choose the side your requests "
            f"were trained on, or train on one side only (data.max_length <= {switch})")


def final_logit_softcap(config) -> Optional[float]:
    """The cap of ``cap * tanh(logits / cap)`` some models apply to their logits (Gemma 2: 30)."""
    return getattr(text_config(config), "final_logit_softcapping", None) if config is not None else None


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
