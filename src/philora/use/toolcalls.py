"""Tool calls read out of a reply, in the syntax of the model's family, and a function-calling score.

Each family writes calls in its own syntax (``model.families.TOOL_CALL_FORMATS`` says which, from
the tokenizer):

* ``phi4_mini``: ``<|tool_call|>[{"name": .., "arguments": {..}}, ..]<|/tool_call|>`` (Phi-4-mini's
  tokens; a JSON list, or one object);
* ``hermes`` (Qwen2.5, Hermes 2/3): ``<tool_call>{"name": .., "arguments": {..}}</tool_call>``, one
  object per tag, an unclosed last tag read to the end (as vLLM's ``hermes`` parser does);
* ``llama3_json`` (Llama 3.x): bare JSON objects ``{"name": .., "parameters": {..}}`` anywhere in the
  reply, after an optional ``<|python_tag|>`` (as vLLM's ``llama3_json`` parser scans them).

A training message's reference calls are its OpenAI-style ``tool_calls`` when it has them (the template
wrote them in the family's syntax, data.encoding), else those its content writes (``message_calls``).
``arguments`` (or ``parameters``) may be a JSON string of the object, as some models write it. A call
whose JSON does not parse is kept as ``{"invalid": text}``: it is a call the model meant, and it
matches nothing. Calls are compared by name and arguments through ``call_key`` (canonical JSON:
``1`` and ``1.0`` differ, key order does not). Hand-written: each format is a few lines, and the
serving engines' parsers live in other processes (vLLM) or in C++ (llama.cpp's server).
"""

import json
import re
from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple

from ..data.encoding import TEMPLATE_KEYS

FORMATS = ("phi4_mini", "hermes", "llama3_json")
_PHI4 = re.compile(r"<\|tool_call\|>(.*?)(?:<\|/tool_call\|>|$)", re.DOTALL)
_HERMES = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)


def _call(obj) -> Optional[dict]:
    """{"name", "arguments"} of one decoded call object, None when it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj["arguments"] if "arguments" in obj else obj.get("parameters", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return {"name": obj["name"], "arguments": args}


def _json_calls(text: str) -> List[dict]:
    """The calls of one JSON text (a list of call objects, or one object)."""
    try:
        value = json.loads(text)
    except ValueError:
        return [{"invalid": text.strip()}]
    items = value if isinstance(value, list) else [value]
    calls = [_call(v) for v in items]
    return [c if c is not None else {"invalid": json.dumps(v, ensure_ascii=False)} for c, v in zip(calls, items)]


def _llama3_calls(text: str) -> List[dict]:
    """Every top-level JSON object that is a call, left to right (braces inside one are skipped)."""
    text, decoder, calls, at = text.replace("<|python_tag|>", ""), json.JSONDecoder(), [], 0
    while True:
        at = text.find("{", at)
        if at < 0:
            return calls
        try:
            obj, end = decoder.raw_decode(text, at)
        except ValueError:
            at += 1
            continue
        call = _call(obj)
        calls += [call] if call is not None else []
        at = end


def parse_tool_calls(text: str, fmt: Optional[str]) -> List[dict]:
    """The tool calls in reply ``text`` written in format ``fmt`` (``FORMATS``; None: no calls)."""
    if fmt == "phi4_mini":
        return [c for body in _PHI4.findall(text) for c in _json_calls(body)]
    if fmt == "hermes":
        return [c for a, b in _HERMES.findall(text) for c in _json_calls(a or b)]
    if fmt == "llama3_json":
        return _llama3_calls(text)
    if fmt is None:
        return []
    raise ValueError(f"unknown tool-call format {fmt!r} (one of {', '.join(FORMATS)})")


def call_key(call: dict) -> Tuple[str, str]:
    """(name, canonical JSON of the arguments); an unparsed call gets a key no other call has."""
    if "invalid" in call:
        return ("\0invalid", call["invalid"])
    return (call["name"], json.dumps(call["arguments"], sort_keys=True, ensure_ascii=False))


def show_calls(calls: Sequence[dict]) -> str:
    """Calls as one short line: name(arguments JSON), ..."""
    if not calls:
        return "no call"
    return ", ".join(f"unparsed {c['invalid'][:60]!r}" if "invalid" in c else
                     f"{c['name']}({json.dumps(c['arguments'], ensure_ascii=False)})" for c in calls)


# -----------------------------------------------------------------------------
# the score

def message_calls(message: dict, fmt: Optional[str]) -> List[dict]:
    """The calls an assistant message makes: its "tool_calls" (OpenAI-style, data.formats), else those
    written in its content in format ``fmt``."""
    if message.get("tool_calls"):
        return [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in message["tool_calls"]]
    return parse_tool_calls(message["content"], fmt) if message["role"] == "assistant" else []


def call_turns(messages: Sequence[dict], fmt: Optional[str]) -> List[Tuple[List[dict], List[dict]]]:
    """(prompt: the conversation before it, reference calls) for each assistant turn with tool calls."""
    out = []
    for i, m in enumerate(messages):
        calls = message_calls(m, fmt)
        if calls:
            out.append(([{k: x[k] for k in TEMPLATE_KEYS if k in x} for x in messages[:i]], calls))
    return out


def function_calling_score(pairs: Sequence[Tuple[Sequence[dict], Sequence[dict]]]) -> Dict[str, float]:
    """Over (predicted calls, reference calls) per held-out turn: ``exact_match``, the share of
    reference calls the prediction makes with the same name and arguments; ``name_match``, with the
    same name; ``turns_exact``, turns whose calls are exactly the reference's (order aside);
    ``predicted``: calls made, ``calls``: reference calls, ``turns``."""
    calls = sum(len(r) for _, r in pairs)
    exact = sum(sum((Counter(map(call_key, p)) & Counter(map(call_key, r))).values()) for p, r in pairs)
    names = sum(sum((Counter(call_key(c)[0] for c in p) & Counter(call_key(c)[0] for c in r)).values())
                for p, r in pairs)
    whole = sum(Counter(map(call_key, p)) == Counter(map(call_key, r)) for p, r in pairs)
    return {"exact_match": exact / max(calls, 1), "name_match": names / max(calls, 1),
            "turns_exact": whole / max(len(pairs), 1), "predicted": sum(len(p) for p, _ in pairs),
            "calls": calls, "turns": len(pairs)}
