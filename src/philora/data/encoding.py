"""Chat-template tokenization with assistant-only labels: the ids and labels of one conversation.

    encode_chat(messages, tokenizer, max_length) -> {"input_ids", "labels"}

input_ids are exactly ``tokenizer.apply_chat_template(messages, tokenize=True)``. Labels are -100
except, for each assistant turn: the tokens that carry characters of its content, then every token up to and
including the end-of-turn token, the first added token after the content (``<|end|>``, ``<|im_end|>``,
``<|eot_id|>``, ``</s>``; whatever template text sits between, such as Llama 2's space before ``</s>``, is
needed to stop and is labelled too). Headers, the newline after ``<|end|>`` and the final ``<|endoftext|>``
stay -100. Contents are located in the rendered text (the conversation rendered up to the turn with the
generation prompt tells where the turn starts, so an earlier identical message is never matched) and tokens
are matched by character offsets, which survives special tokens that swallow the whitespace to their right:
Phi-3's header token also swallows the content's leading whitespace, which is then in no token and not
trained. Where offsets are unavailable or disagree with the template's ids, labels come from comparing the
token prefixes of partial renderings, as TRL does for prompt-completion data.

Written by hand: transformers' ``return_assistant_tokens_mask`` needs ``{% generation %}`` markers
that published chat templates (Phi-3's among them) do not have, so the labels are found from the
template's own rendering instead.
"""

import bisect
import os
from typing import Dict, List, Optional

IGNORE_INDEX = -100  # the label of a position that is not trained on (as torch's cross_entropy)


def encode_chat(messages: List[dict], tokenizer, max_length: Optional[int] = None) -> Dict[str, List[int]]:
    """Token ids of the chat template and labels: -100 except assistant contents and their end-of-turn token."""
    # tool definitions ride on the system message (formats.py); the template decides how they render
    chat = [{k: m[k] for k in ("role", "content", "tools") if k in m} for m in messages]
    enc = _encode_with_offsets(chat, tokenizer)
    ids = _as_ids(enc if enc is not None else tokenizer.apply_chat_template(chat, tokenize=True))
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("train", True)]
    added = set(tokenizer.added_tokens_decoder)  # headers and end-of-turn markers are added tokens
    labels = _labels_from_offsets(chat, turns, ids, tokenizer, added, enc)
    if labels is None:
        labels = _labels_from_prefixes(chat, turns, ids, tokenizer, added)
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels}


def _as_ids(out):  # apply_chat_template returns a BatchEncoding (transformers 5) or a list (4.x)
    if hasattr(out, "keys"):
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    if out and isinstance(out[0], list):
        out = out[0]
    return [int(t) for t in out]


def _encode_with_offsets(chat, tokenizer):
    """The template's own tokenization (``apply_chat_template(tokenize=True)``, one call) with
    each token's character offsets in the rendered text; None for tokenizers without offsets."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    try:
        enc = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True,
                                            tokenizer_kwargs={"return_offsets_mapping": True})
    except TypeError:  # a tokenizer whose apply_chat_template takes no tokenizer_kwargs
        return None
    return enc if hasattr(enc, "keys") and "offset_mapping" in enc else None


def _labels_from_offsets(chat, turns, ids, tokenizer, added, enc=None):
    if enc is None:
        return None
    text = tokenizer.apply_chat_template(chat, tokenize=False)  # the text those offsets point into
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    if len(offsets) != len(ids) or (offsets and offsets[-1][1] > len(text)):
        return None
    starts, ends = [s for s, _ in offsets], [e for _, e in offsets]
    ordered = starts == sorted(starts) and ends == sorted(ends)  # then a turn's tokens are one run
    labels, cursor = [IGNORE_INDEX] * len(ids), 0
    for i in turns:
        span = _content_span(chat, i, text, cursor, tokenizer)
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


def _content_span(chat, i, text, cursor, tokenizer):
    """Character span of chat[i]'s content in the rendered text, searching from where the turn starts."""
    lo = cursor
    if i > 0:
        try:
            prefix = tokenizer.apply_chat_template(chat[:i], tokenize=False, add_generation_prompt=True)
            same = len(prefix) if text.startswith(prefix) else len(os.path.commonprefix([prefix, text]))
            lo = max(lo, same)
        except Exception:  # templates that cannot render a partial conversation
            pass
    content = chat[i]["content"]
    for needle in (content, content.strip()):  # some templates strip contents
        pos = text.find(needle, lo)
        if pos >= 0:
            return pos, pos + len(needle)
    return None


def _labels_from_prefixes(chat, turns, ids, tokenizer, added):
    """Fallback: a turn's tokens are where the ids of the conversation up to it stop matching (as TRL)."""
    labels = [IGNORE_INDEX] * len(ids)
    for i in turns:
        before = [] if i == 0 else _as_ids(
            tokenizer.apply_chat_template(chat[:i], tokenize=True, add_generation_prompt=True))
        through = _as_ids(tokenizer.apply_chat_template(chat[:i + 1], tokenize=True))
        for k in range(_common_prefix(before, ids), _common_prefix(through, ids)):
            labels[k] = ids[k]
            if ids[k] in added:  # the end-of-turn token closes the turn
                break
    return labels


def _common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
