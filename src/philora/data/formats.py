"""Chat data formats: map one record to a validated list of messages.

Formats (``data.format``; ``auto`` decides per record from its keys):
    messages           {"messages": [{"role", "content"}, ...]}  (or the same list under "conversations");
                       roles system, user, assistant and tool (a tool's result). Tool calling: the
                       system message may carry "tools" (a JSON string, or a list/object written out
                       as JSON; a record's own "tools" go there too), which templates such as
                       Phi-4-mini's render as ``<|system|>...<|tool|>{tools}<|/tool|><|end|>`` and
                       others (Qwen2.5, Llama 3.1) take as apply_chat_template's ``tools=``
                       (encoding.template_inputs). The assistant's calls are either its content, in the
                       model's own syntax (Phi-4-mini: ``<|tool_call|>[...]<|/tool_call|>``), or
                       OpenAI-style "tool_calls" ([{"type": "function", "function": {"name", "arguments"}}],
                       content then optional), which the template writes in its own syntax (Qwen2.5:
                       ``<tool_call>\n{"name": .., "arguments": ..}\n</tool_call>``; Llama 3.1:
                       ``{"name": .., "parameters": ..}``); arguments given as JSON text are parsed
    sharegpt           {"conversations": [{"from": system|human|gpt, "value"}, ...]}  (user/assistant accepted)
    alpaca             {"instruction", "input"?, "output", "system"?}; input goes after the instruction and a
                       blank line
    prompt_completion  {"prompt", "completion"}, each a string (one user / one assistant message) or a list
                       of messages, as in TRL's conversational prompt-completion. Assistant turns inside the
                       prompt are context (marked "train": False), as TRL trains on the completion only.
Turns after the last trained assistant turn (say a trailing user question) are dropped: they carry no labels
and, the model being causal, cannot change the loss of earlier tokens, so TRL's result is unchanged and the
tokens are saved. A record with no assistant turn is an error (it would train on nothing).

Every mistake raises DataError with one line: "<where>: what is wrong", where is "file.jsonl:17" or
"file.parquet record 3" (given by the caller, see philora.data.load_records).
"""

import json
from typing import List

from ..core.errors import PhiloraError

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion")


class DataError(PhiloraError):
    """A mistake in the data; the message is one line naming the file and line (or record)."""


def detect_format(record: dict, where: str = "record") -> str:
    """Which of FORMATS a record is in, from its keys (null values count as absent: Arrow adds them)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    has = lambda key: record.get(key) is not None
    if has("messages"):
        return "messages"
    if has("conversations"):
        conv = record["conversations"]
        first = conv[0] if isinstance(conv, list) and conv and isinstance(conv[0], dict) else {}
        return "sharegpt" if "from" in first or "value" in first else "messages"
    if has("prompt") and has("completion"):
        return "prompt_completion"
    if has("instruction") and has("output"):
        return "alpaca"
    raise DataError(f"{where}: cannot tell the format from keys {sorted(record)} (expected messages, "
                    "conversations, prompt+completion or instruction+output)")


def to_messages(record: dict, fmt: str = "auto", where: str = "record") -> List[dict]:
    """The validated conversation of a record: [{"role", "content"}, ...], ending with an assistant turn."""
    msgs = conversation(record, fmt, where)
    trained = [i for i, m in enumerate(msgs) if m["role"] == "assistant" and m.get("train", True)]
    if not trained:
        raise DataError(f"{where}: no assistant message to train on")
    return msgs[:trained[-1] + 1]


def conversation(record: dict, fmt: str = "auto", where: str = "record") -> List[dict]:
    """A record's turns validated as training data is (roles, contents, tool calls, the record's tools
    onto its first message), with no assistant turn required: a conversation ending on a user turn is
    a prompt (``philora verify --prompts FILE``)."""
    if fmt == "auto":
        fmt = detect_format(record, where)
    elif not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if fmt == "messages":
        key = "messages" if record.get("messages") is not None else "conversations"
        turns = _turn_list(record, key, where)
        msgs = [_message(t, "role", "content", ROLES, f"message {i}", where) for i, t in enumerate(turns, 1)]
        if record.get("tools") is not None:
            msgs = _record_tools(record["tools"], msgs, where)
    elif fmt == "sharegpt":
        turns = _turn_list(record, "conversations", where)
        msgs = [_message(t, "from", "value", SHAREGPT_ROLES, f"message {i}", where) for i, t in enumerate(turns, 1)]
    elif fmt == "alpaca":
        user = _text(record, "instruction", where)
        extra = _text(record, "input", where, optional=True)
        if extra:
            user = f"{user}\n\n{extra}"
        system = _text(record, "system", where, optional=True)
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user}, {"role": "assistant", "content": _text(record, "output", where)}]
    elif fmt == "prompt_completion":
        prompt = _part(record, "prompt", "user", where)
        prompt = [dict(m, train=False) if m["role"] == "assistant" else m for m in prompt]
        msgs = prompt + _part(record, "completion", "assistant", where)
    else:
        raise DataError(f"{where}: unknown format {fmt!r} (expected auto or one of {', '.join(FORMATS)})")
    return msgs


def _turn_list(record, key, where):
    turns = record.get(key)
    if not isinstance(turns, list):
        raise DataError(f"{where}: '{key}' must be a list of messages, got {type(turns).__name__}")
    if not turns:
        raise DataError(f"{where}: '{key}' is empty")
    return turns


def _message(turn, role_key, content_key, roles, name, where):
    if not isinstance(turn, dict):
        raise DataError(f"{where}: {name} must be an object, got {type(turn).__name__}")
    if role_key not in turn:
        raise DataError(f"{where}: {name} has no '{role_key}'")
    role = turn[role_key]
    if not isinstance(role, str) or role not in roles:
        raise DataError(f"{where}: {name} has unknown role {role!r} (expected {', '.join(roles)})")
    role = roles[role] if isinstance(roles, dict) else role
    calls = tool_calls(turn["tool_calls"], role, name, where) if turn.get("tool_calls") else None
    content = turn.get(content_key)
    if calls and content is None:  # an assistant turn that only calls tools
        content = ""
    if not isinstance(content, str):
        raise DataError(f"{where}: {name} '{content_key}' must be a string, got {type(content).__name__}")
    if not content.strip() and not calls:
        raise DataError(f"{where}: {name} has empty content")
    message = {"role": role, "content": content}
    if turn.get("tools") is not None:
        message["tools"] = tools_json(turn["tools"], message["role"], name, where)
    if calls:  # only when there are some: Llama 3.1's template tests `'tool_calls' in message`
        message["tool_calls"] = calls
    return message


def _record_tools(tools, msgs: List[dict], where: str) -> List[dict]:
    """A record's top-level "tools" (as OpenAI-style datasets keep them), onto its first message: the
    system message where there is one (Phi-4-mini's template reads them there); otherwise the first
    turn carries them for ``encoding.template_inputs`` to pass as ``tools=`` (Qwen2.5's and Llama 3.1's
    templates read that variable and write their own system block), and a template that renders them
    from neither is refused when the record is encoded."""
    if "tools" in msgs[0]:
        raise DataError(f"{where}: 'tools' given twice (the record's and its system message's)")
    return [dict(msgs[0], tools=tools_json(tools, "system", "the record's", where))] + msgs[1:]


def tool_calls(calls, role: str, name: str, where: str) -> List[dict]:
    """An assistant message's "tool_calls", as chat templates read them: [{"type": "function",
    "function": {"name", "arguments": {..}}}] (an "id" kept); a call may also be given flat
    ({"name", "arguments"}), and arguments as the JSON text of an object (as OpenAI's API sends them)."""
    if role != "assistant":
        raise DataError(f"{where}: {name} has 'tool_calls', which only an assistant message makes (role {role!r})")
    if not isinstance(calls, list):
        raise DataError(f"{where}: {name} 'tool_calls' must be a list, got {type(calls).__name__}")
    out = []
    for k, call in enumerate(calls, 1):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise DataError(f"{where}: {name} tool call {k} must be an object with a 'name' "
                            f"(or {{\"function\": {{\"name\", \"arguments\"}}}})")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                raise DataError(f"{where}: {name} tool call {k} 'arguments' is not valid JSON: {args[:60]!r}") from None
        if not isinstance(args, dict):
            raise DataError(f"{where}: {name} tool call {k} 'arguments' must be an object, got {type(args).__name__}")
        entry = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        out.append(entry)
    return out


def tools_json(tools, role: str, name: str, where: str) -> str:
    """A system message's tool definitions as the JSON text templates splice in."""
    if role != "system":
        raise DataError(f"{where}: {name} has 'tools', which go on the system message (role {role!r})")
    if not isinstance(tools, (list, dict, str)) or isinstance(tools, str) and not tools.strip():
        raise DataError(f"{where}: {name} 'tools' must be a JSON string, list or object, got "
                        f"{type(tools).__name__ if not isinstance(tools, str) else 'an empty string'}")
    if isinstance(tools, str):
        try:  # JSON text written out as json.dumps does, as a server's template (tojson) writes it
            tools = json.loads(tools)
        except ValueError:
            return tools  # free text for a template to splice in, as given
    return json.dumps(tools, ensure_ascii=False)


def _text(record, key, where, optional=False):
    value = record.get(key)
    if value is None:
        if optional:
            return ""
        raise DataError(f"{where}: '{key}' is missing")
    if not isinstance(value, str):
        raise DataError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    if not value.strip() and not optional:
        raise DataError(f"{where}: '{key}' is empty")
    return value


def _part(record, key, role, where):  # prompt or completion: a string or a list of messages
    if isinstance(record.get(key), list):
        turns = _turn_list(record, key, where)
        return [_message(t, "role", "content", ROLES, f"{key} message {i}", where) for i, t in enumerate(turns, 1)]
    return [{"role": role, "content": _text(record, key, where)}]
