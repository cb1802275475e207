"""Tool calls (use/toolcalls.py, families.TOOL_CALL_FORMATS): each family's format parsed with tricky
arguments (nested lists, quotes, escapes, several calls, an argument given as JSON text, unparsable
JSON); the format chosen from the tokenizer; the function-calling score against hand-computed
numbers. The eval report's function-calling section and ``philora verify`` on a Phi-4-mini-shape
tool-calling run are in tests/export/test_verify.py (one run for both)."""

import json

import pytest

from philora.model.families import tool_call_format, vllm_tool_parser
from philora.use.toolcalls import call_key, call_turns, function_calling_score, parse_tool_calls

TRICKY = {"query": 'say "hi" [not a bracket] \\ }', "nested": [[1, 2], [3, [4.5, True, None]]],
          "obj": {"a": {"b": ["]", "}"]}}, "unicode": "café ☕"}


def _expected(*calls):
    return [{"name": n, "arguments": a} for n, a in calls]


def test_phi4_mini_format():
    body = json.dumps([{"name": "search", "arguments": TRICKY}, {"name": "add", "arguments": {"values": [2, 3]}}])
    text = f"Let me look.<|tool_call|>{body}<|/tool_call|>"
    assert parse_tool_calls(text, "phi4_mini") == _expected(("search", TRICKY), ("add", {"values": [2, 3]}))
    # one object instead of a list; "parameters"; arguments as JSON text; two blocks; no closing tag at the end
    text = ('<|tool_call|>{"name": "a", "parameters": {"x": 1}}<|/tool_call|> and '
            '<|tool_call|>[{"name": "b", "arguments": "{\\"y\\": [1, \\"]\\"]}"}]')
    assert parse_tool_calls(text, "phi4_mini") == _expected(("a", {"x": 1}), ("b", {"y": [1, "]"]}))
    # vLLM's phi4_mini_json regex (functools\[(.*?)\]) would stop at the first "]": this one reads it whole
    assert parse_tool_calls("plain answer", "phi4_mini") == []
    bad = parse_tool_calls('<|tool_call|>[{"name": ""}}]<|/tool_call|>', "phi4_mini")
    assert bad == [{"invalid": '[{"name": ""}}]'}]
    assert call_key(bad[0]) != call_key({"name": "", "arguments": {}})


def test_hermes_format():
    text = (f'<tool_call>\n{json.dumps({"name": "search", "arguments": TRICKY})}\n</tool_call>\n'
            '<tool_call>{"name": "now", "arguments": {}}</tool_call><tool_call>{"name": "late", "arguments": {"k": "v"}}')
    assert parse_tool_calls(text, "hermes") == _expected(("search", TRICKY), ("now", {}), ("late", {"k": "v"}))
    assert parse_tool_calls('<tool_call>{"name": broken}</tool_call>', "hermes") == [{"invalid": '{"name": broken}'}]
    assert parse_tool_calls("<|tool_call|>[]<|/tool_call|>", "hermes") == []


def test_llama3_json_format():
    text = '<|python_tag|>' + json.dumps({"name": "search", "parameters": TRICKY}) + '; {"name": "b", "parameters": {}}'
    assert parse_tool_calls(text, "llama3_json") == _expected(("search", TRICKY), ("b", {}))
    # braces inside a call are not calls; a JSON object without a name is not one; prose is skipped
    assert parse_tool_calls('Sure: {"name": "f", "arguments": {"inner": {"name": "g"}}} {"x": 1} {bad', "llama3_json") \
        == _expected(("f", {"inner": {"name": "g"}}))
    assert parse_tool_calls("no call here", "llama3_json") == []
    with pytest.raises(ValueError):
        parse_tool_calls("x", "xml")


def test_call_keys_compare_values_exactly():
    assert call_key({"name": "f", "arguments": {"a": 1, "b": 2}}) == call_key({"name": "f", "arguments": {"b": 2, "a": 1}})
    assert call_key({"name": "f", "arguments": {"a": 1}}) != call_key({"name": "f", "arguments": {"a": 1.0}})
    assert call_key({"name": "f", "arguments": {"a": True}}) != call_key({"name": "f", "arguments": {"a": 1}})


def test_format_from_the_tokenizer(families):
    from transformers import AutoTokenizer
    got = {name: tool_call_format(AutoTokenizer.from_pretrained(families.dir(name))) for name in ("phi4-mini", "llama3")}
    assert got == {"phi4-mini": "phi4_mini", "llama3": "llama3_json"}
    qwen = AutoTokenizer.from_pretrained(families.dir("qwen2"))
    assert tool_call_format(qwen) is None  # the fixture's template has no tools
    qwen.chat_template += "{# calls: <tool_call>{...}</tool_call> #}"  # as Qwen2.5's template says
    assert tool_call_format(qwen) == "hermes"
    assert [vllm_tool_parser(f) for f in ("phi4_mini", "hermes", "llama3_json", None)] == \
        ["phi4_mini_json", "hermes", "llama3_json", None]


def test_function_calling_score_by_hand():
    w = lambda city: {"name": "weather", "arguments": {"city": city}}  # noqa: E731
    add = {"name": "add", "arguments": {"values": [2, 3]}}
    pairs = [
        ([w("Paris")], [w("Paris")]),                  # exact
        ([w("Paris")], [w("Tokyo")]),                  # right name, wrong argument
        ([add, w("Oslo")], [w("Oslo"), add]),          # both exact, other order
        ([], [add]),                                   # no call made
        ([{"invalid": "[{"}, add, add], [add]),        # one exact, two extra calls
    ]
    # reference calls: 1 + 1 + 2 + 1 + 1 = 6; exact: 1 + 0 + 2 + 0 + 1 = 4; names: 1 + 1 + 2 + 0 + 1 = 5;
    # turns exact: 1st and 3rd = 2/5; calls made: 1 + 1 + 2 + 0 + 3 = 7
    assert function_calling_score(pairs) == {"exact_match": 4 / 6, "name_match": 5 / 6, "turns_exact": 2 / 5,
                                             "predicted": 7, "calls": 6, "turns": 5}


def test_call_turns_are_the_assistant_turns_with_calls():
    call = '<|tool_call|>[{"name": "f", "arguments": {}}]<|/tool_call|>'
    msgs = [{"role": "system", "content": "S", "tools": "[]"}, {"role": "user", "content": "U"},
            {"role": "assistant", "content": call}, {"role": "tool", "content": "1"},
            {"role": "assistant", "content": "Done."}]
    assert call_turns(msgs, "phi4_mini") == [(msgs[:2], [{"name": "f", "arguments": {}}])]
    assert call_turns(msgs, None) == []
