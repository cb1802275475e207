"""``philora verify --prompts FILE`` (export/verify.held_out_prompts): a conversation that ends on a user turn
is the prompt whole, validated as training data is: the record's tools onto the system message as JSON text,
earlier tool calls kept, a tools list on a system message written out as JSON (Phi-4-mini's template
splices it in as text: a Python list gave a traceback), a bad record one line naming its file and line.
The expected messages are written out by hand here; the rendering is the Phi-4-mini template's own."""

import json

import pytest

from philora.data.formats import DataError
from philora.export.verify import held_out_prompts
from philora.model.decoding import chat_ids

TOOLS = [{"name": "weather", "description": "Weather in a city", "parameters": {"city": {"type": "str"}}}]
TEXT = json.dumps(TOOLS)


def _file(tmp_path, records):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_prompts_that_end_on_a_user_turn_keep_tools_and_calls(tmp_path, families):
    from transformers import AutoTokenizer
    call = {"type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    path = _file(tmp_path, [
        {"tools": TOOLS, "messages": [{"role": "system", "content": "Use tools."},
                                      {"role": "user", "content": "Paris?"},
                                      {"role": "assistant", "content": None, "tool_calls": [call]},
                                      {"role": "tool", "content": "sunny"},
                                      {"role": "user", "content": "And Tokyo?"}]},
        {"messages": [{"role": "system", "content": "Use tools.", "tools": TOOLS},
                      {"role": "user", "content": "Tokyo?", "name": "ignored"}]},
        {"conversations": [{"from": "human", "value": "Hi"}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}])
    got = held_out_prompts(None, None, path)
    assert [w for w, _ in got] == [f"{path}:{i}" for i in range(1, 5)]
    assert got[0][1] == [
        {"role": "system", "content": "Use tools.", "tools": TEXT},
        {"role": "user", "content": "Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny"},
        {"role": "user", "content": "And Tokyo?"}]
    assert got[1][1] == [{"role": "system", "content": "Use tools.", "tools": TEXT},
                         {"role": "user", "content": "Tokyo?"}]
    assert got[2][1] == [{"role": "user", "content": "Hi"}]
    assert got[3][1] == [{"role": "user", "content": "Hi"}]  # up to its last assistant turn, as before
    tok = AutoTokenizer.from_pretrained(families.dir("phi4-mini"))
    text = tok.decode(chat_ids(tok, got[1][1]))  # a traceback before: '<|tool|>' + a list
    assert f"<|system|>Use tools.<|tool|>{TEXT}<|/tool|><|end|>" in text


@pytest.mark.parametrize("record, needle", [
    ({"messages": [{"role": "user", "content": "Hi", "tool_calls": [{"name": "f"}]}]},
     "message 1 has 'tool_calls', which only an assistant message makes"),
    ({"messages": [{"role": "user", "content": "Hi", "tools": TOOLS}]},
     "message 1 has 'tools', which go on the system message"),
    ({"messages": [{"role": "bot", "content": "Hi"}]}, "message 1 has unknown role 'bot'"),
    ({"tools": TOOLS, "messages": [{"role": "system", "content": "s", "tools": TOOLS}, {"role": "user", "content": "q"}]},
     "'tools' given twice")])
def test_bad_prompt_records_are_one_line(tmp_path, helpers, record, needle):
    path = _file(tmp_path, [record])
    with pytest.raises(DataError) as e:
        held_out_prompts(None, None, path)
    helpers.one_line_error(e, f"{path}:1: ", needle)
