"""Chat-template tokenization with assistant-only labels: the ids and labels of one conversation.

    encode_chat(messages, tokenizer, max_length) -> {"input_ids", "labels"}
    template_inputs(messages) -> (chat, kwargs)   what apply_chat_template gets, here and at inference

input_ids are exactly ``tokenizer.apply_chat_template(chat, tokenize=True, **kwargs)`` (kwargs: the
``tools=`` the system message carries, for templates that read that variable). Labels are -100
except, for each assistant turn: the tokens that carry characters of its content, then every token up to and
including the end-of-turn token, the first added token after the content (``<|end|>``, ``<|im_end|>``,
``<|eot_id|>``, ``</s>``; whatever template text sits between, such as Llama 2's space before ``</s>``, is
needed to stop and is labelled too). Headers, the newline after ``<|end|>`` and the final ``<|endoftext|>``
stay -100. Contents are located in the rendered text (the conversation rendered up to the turn with the
generation prompt tells where the turn starts, so an earlier identical message is never matched) and tokens
are matched by character offsets, which survives special tokens that swallow the whitespace to their right:
Phi-3's header token also swallows the content's leading whitespace, which is then in no token and not
trained. Where offsets are unavailable or disagree with the template's ids, labels come from comparing the
token prefixes of partial renderings, as TRL does for prompt-completion data. An assistant turn with
"tool_calls" is written by the template itself (Qwen2.5: ``<tool_call>\n{..}\n</tool_call>``, Llama 3.1:
``{"name": .., "parameters": ..}``): its text runs from the generation prompt to where the rendering
parts from the same conversation with a plain reply in its place, so the call tokens are trained.

Written by hand: transformers' ``return_assistant_tokens_mask`` needs ``{% generation %}`` markers
that published chat templates (Phi-3's among them) do not have, so the labels are found from the
template's own rendering instead.
"""

import bisect
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

from .formats import DataError

IGNORE_INDEX = -100  # the label of a position that is not trained on (as torch's cross_entropy)
TEMPLATE_KEYS = ("role", "content", "tools", "tool_calls")  # what a chat template reads of a message
PROBE = "philora probe reply"  # a plain reply put in place of a tool-calling turn to find where it ends


def template_inputs(messages: Sequence[dict]) -> Tuple[List[dict], dict]:
    """The messages as chat templates read them and apply_chat_template's keyword arguments:
    ``tools=``, the tool definitions the system message carries (JSON text, formats.py), as a list.
    Templates such as Qwen2.5's and Llama 3.1's read that variable, Phi-4-mini's the message's own;
    tools that are not JSON (free text for a template to splice in) give no ``tools=``."""
    chat = [{k: m[k] for k in TEMPLATE_KEYS if k in m} for m in messages]
    text = next((m["tools"] for m in chat if m.get("tools")), None)
    try:
        tools = json.loads(text) if isinstance(text, str) else text
    except ValueError:
        tools = None
    if not isinstance(tools, (list, dict)) or not tools:
        return chat, {}
    return chat, {"tools": [served_tool(t) for t in (tools if isinstance(tools, list) else [tools])]}


def served_tool(tool):
    """A tool definition as OpenAI-compatible servers hand it to the template (vLLM, llama-server):
    ``{"type": "function", "function": {"name", "description", "parameters"}}`` in that order, a flat
    ``{"name", ...}`` wrapped, other keys dropped; so the ``tools=`` a template renders in training
    is the one it renders when served. A missing description stays missing: vLLM then renders null
    and llama-server "", so no training text matches both (``philora data check`` says so)."""
    fn = tool.get("function", tool) if isinstance(tool, dict) else None
    if not isinstance(fn, dict) or "name" not in fn:
        return tool  # not a function definition: as given
    return {"type": "function", "function": {k: fn[k] for k in ("name", "description", "parameters") if k in fn}}


def encode_chat(messages: List[dict], tokenizer, max_length: Optional[int] = None,
                where: str = "conversation") -> Dict[str, List[int]]:
    """Token ids of the chat template and labels: -100 except assistant contents and their end-of-turn
    token. DataError (naming ``where``) for tools the template does not render."""
    chat, kwargs = template_inputs(messages)
    _check_tools_rendered(chat, tokenizer, kwargs, where)
    enc = _encode_with_offsets(chat, tokenizer, kwargs)
    ids = _as_ids(enc if enc is not None else tokenizer.apply_chat_template(chat, tokenize=True, **kwargs))
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("train", True)]
    added = set(tokenizer.added_tokens_decoder)  # headers and end-of-turn markers are added tokens
    labels = _labels_from_offsets(chat, turns, ids, tokenizer, added, kwargs, enc)
    if labels is None:
        labels = _labels_from_prefixes(chat, turns, ids, tokenizer, added, kwargs)
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels}


def _check_tools_rendered(chat, tokenizer, kwargs, where: str) -> None:
    """A conversation with tool definitions must show them to the model: the template's rendering
    differs with and without them (Phi-4-mini's template reads them only from a system message,
    Qwen2.5's and Llama 3.1's only from ``tools=``); otherwise training would silently teach calls
    to functions the prompt never named."""
    if not any(m.get("tools") for m in chat):
        return
    bare = [{k: v for k, v in m.items() if k != "tools"} for m in chat]
    if tokenizer.apply_chat_template(chat, tokenize=False, **kwargs) == tokenizer.apply_chat_template(bare, tokenize=False):
        on = "the first message" if chat[0]["role"] != "system" else "the system message"
        raise DataError(f"{where}: the chat template renders none of the 'tools' (given on {on}; a template "
                        f"such as Phi-4-mini's reads them only from a system message: add one)")


def _as_ids(out):  # apply_chat_template returns a BatchEncoding (transformers 5) or a list (4.x)
    if hasattr(out, "keys"):
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    if out and isinstance(out[0], list):
        out = out[0]
    return [int(t) for t in out]


def _encode_with_offsets(chat, tokenizer, kwargs):
    """The template's own tokenization (``apply_chat_template(tokenize=True)``, one call) with
    each token's character offsets in the rendered text; None for tokenizers without offsets."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    try:
        enc = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True,
                                            tokenizer_kwargs={"return_offsets_mapping": True}, **kwargs)
    except TypeError:  # a tokenizer whose apply_chat_template takes no tokenizer_kwargs
        return None
    return enc if hasattr(enc, "keys") and "offset_mapping" in enc else None


def _labels_from_offsets(chat, turns, ids, tokenizer, added, kwargs, enc=None):
    if enc is None:
        return None
    text = tokenizer.apply_chat_template(chat, tokenize=False, **kwargs)  # the text those offsets point into
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    if len(offsets) != len(ids) or (offsets and offsets[-1][1] > len(text)):
        return None
    starts, ends = [s for s, _ in offsets], [e for _, e in offsets]
    ordered = starts == sorted(starts) and ends == sorted(ends)  # then a turn's tokens are one run
    labels, cursor = [IGNORE_INDEX] * len(ids), 0
    for i in turns:
        span = _content_span(chat, i, text, cursor, tokenizer, kwargs)
        if span is None:
            return None
        start, end = span
        cursor = end
        last = None
        for k in range(bisect.bisect_right(ends, start) if ordered else 0, len(ids)):
            s, e = offsets[k]
            if ordered and s >= end:
                break
            t = ids[k]
            # content tokens; an added token only when wholly inside (not a header that swallowed whitespace)
            if s < end and e > start and (t not in added or (s >= start and e <= end)):
                labels[k], last = t, k
        if last is None:
            continue
        k = last + 1  # then through the end-of-turn token: the first added token after the content
        while k < len(ids) and ids[k] not in added:
            k += 1
        if k < len(ids):
            labels[last + 1:k + 1] = ids[last + 1:k + 1]
    return labels


def _content_span(chat, i, text, cursor, tokenizer, kwargs):
    """Character span of chat[i]'s content in the rendered text, searching from where the turn starts
    (a turn with tool calls: all the template writes for it, up to its end-of-turn token)."""
    lo = cursor
    if i > 0:
        try:
            prefix = tokenizer.apply_chat_template(chat[:i], tokenize=False, add_generation_prompt=True, **kwargs)
            same = len(prefix) if text.startswith(prefix) else len(os.path.commonprefix([prefix, text]))
            lo = max(lo, same)
        except Exception:  # templates that cannot render a partial conversation
            pass
    if chat[i].get("tool_calls"):
        plain = chat[:i] + [{"role": "assistant", "content": PROBE}] + chat[i + 1:]
        other = tokenizer.apply_chat_template(plain, tokenize=False, **kwargs)
        end = len(text) - len(os.path.commonprefix([text[::-1], other[::-1]]))  # where the two end alike
        return (lo, end) if end > lo else None
    content = chat[i]["content"]
    for needle in (content, content.strip()):  # some templates strip contents
        pos = text.find(needle, lo)
        if pos >= 0:
            return pos, pos + len(needle)
    return None


def _labels_from_prefixes(chat, turns, ids, tokenizer, added, kwargs):
    """Fallback: a turn's tokens are where the ids of the conversation up to it stop matching (as TRL)."""
    labels = [IGNORE_INDEX] * len(ids)
    for i in turns:
        before = [] if i == 0 else _as_ids(
            tokenizer.apply_chat_template(chat[:i], tokenize=True, add_generation_prompt=True, **kwargs))
        through = _as_ids(tokenizer.apply_chat_template(chat[:i + 1], tokenize=True, **kwargs))
        # the end-of-turn token closes the turn: the first added token after a plain reply in its place
        # (added tokens inside a reply, as Qwen2.5's <tool_call>, do not), else the first added token
        plain = _as_ids(tokenizer.apply_chat_template(
            chat[:i] + [{"role": "assistant", "content": PROBE}], tokenize=True, **kwargs))
        end = next((t for t in plain[_common_prefix(before, plain):] if t in added), None)
        for k in range(_common_prefix(before, ids), _common_prefix(through, ids)):
            labels[k] = ids[k]
            if ids[k] == end or (end is None and ids[k] in added):
                break
    return labels


def _common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
