"""Tool-calling data (data/formats.py, data/encoding.py): OpenAI-style records (a record's ``tools``,
assistant ``tool_calls``, ``tool`` results) read into the messages chat templates take, with one-line
errors; rendered through Qwen2.5-Instruct's and Llama-3.1-Instruct's real templates
(tests/fixtures/chat_templates) exactly as transformers renders them with ``tools=``, and labelled on the
call text the template writes (plus its end-of-turn token), by the offsets path and by the prefix
fallback alike; tool results and prompts are not trained. The end-to-end runs (training, GGUF, llama.cpp)
are in tests/export/test_verify_tools.py."""

import json

import pytest

from philora.data.encoding import IGNORE_INDEX, encode_chat, template_inputs
from philora.data.formats import DataError, to_messages

TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris", "days": [1, 2]}}}


def _record(**reply):
    return {"tools": TOOLS, "messages": [
        {"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", **reply}, {"role": "tool", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "It is 21 degrees."}]}


def test_openai_records_become_template_messages():
    """tools onto the system message (JSON text, as formats keeps them); tool_calls normalised to
    {"type", "function": {"name", "arguments": object}} (arguments given as JSON text parsed, a flat call
    wrapped, an id kept); no content: ""; and template_inputs gives templates tools= as a list."""
    flat = {"id": "c1", "name": "weather", "arguments": json.dumps({"city": "Paris", "days": [1, 2]})}
    msgs = to_messages(_record(content=None, tool_calls=[flat]), "auto", "f.jsonl:1")
    assert msgs == [{"role": "system", "content": "Use tools.", "tools": json.dumps(TOOLS)},
                    {"role": "user", "content": "Weather in Paris?"},
                    {"role": "assistant", "content": "", "tool_calls": [dict(CALL, id="c1")]},
                    {"role": "tool", "content": '{"temp": 21}'},
                    {"role": "assistant", "content": "It is 21 degrees."}]
    chat, kwargs = template_inputs([dict(m, train=True) for m in msgs])
    assert kwargs == {"tools": TOOLS} and chat == msgs  # the "train" flag is not the template's
    assert "tool_calls" not in to_messages(_record(content="ok"))[2]  # Llama 3.1 tests `'tool_calls' in message`
    assert template_inputs([{"role": "system", "content": "s", "tools": "free text"}])[1] == {}
    one = [{"role": "system", "content": "s", "tools": '{"name": "f"}'}]
    assert template_inputs(one)[1] == {"tools": [{"type": "function", "function": {"name": "f"}}]}  # as served


@pytest.mark.parametrize("record, needle", [
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": [CALL]}, {"role": "assistant", "content": "x"}]},
     "message 1 has 'tool_calls', which only an assistant message makes (role 'user')"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": CALL}]},
     "message 2 'tool_calls' must be a list, got dict"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [{"function": {}}]}]},
     "message 2 tool call 1 must be an object with a 'name'"),
    ({"messages": [{"role": "user", "content": "hi"},
                   {"role": "assistant", "tool_calls": [{"name": "f", "arguments": "{city: 1}"}]}]},
     "message 2 tool call 1 'arguments' is not valid JSON: '{city: 1}'"),
    ({"messages": [{"role": "user", "content": "hi"},
                   {"role": "assistant", "tool_calls": [{"name": "f", "arguments": [1]}]}]},
     "message 2 tool call 1 'arguments' must be an object, got list"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " ", "tool_calls": []}]},
     "message 2 has empty content"),
    ({"tools": TOOLS, "messages": [{"role": "system", "content": "s", "tools": TOOLS},
                                   {"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]},
     "'tools' given twice"),
])
def test_bad_tool_data_is_one_line(record, needle, helpers):
    with pytest.raises(DataError) as e:
        to_messages(record, "auto", "f.jsonl:3")
    helpers.one_line_error(e, f"f.jsonl:3: {needle}")


def _tokenizer(phi3_tokenizer_dir, template_name, special, plain=()):
    """Phi-3's vocabulary with a family's markers added (not stripping whitespace) and its real template."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer
    from model_matrix import FIXTURES
    tok = AutoTokenizer.from_pretrained(str(phi3_tokenizer_dir))
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in special], special_tokens=True)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
    tok.chat_template = (FIXTURES / "chat_templates" / template_name).read_text(encoding="utf-8")
    return tok


FAMILIES = {  # template, special tokens, plain added tokens, the labelled text of the two replies
    "qwen2.5": ("Qwen-Qwen2.5-7B-Instruct.jinja", ["<|im_start|>", "<|im_end|>"], ["<tool_call>", "</tool_call>"],
                ['<tool_call>\n{"name": "weather", "arguments": {"city": "Paris", "days": [1, 2]}}\n</tool_call>'
                 '<|im_end|>',
                 "It is 21 degrees.<|im_end|>"]),
    "llama3.1": ("meta-llama-Llama-3.1-8B-Instruct.jinja",
                 ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
                  "<|python_tag|>"], [],
                 ['{"name": "weather", "parameters": {"city": "Paris", "days": [1, 2]}}<|eot_id|>',
                  "It is 21 degrees.<|eot_id|>"]),
}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("path", ["offsets", "prefixes"])
def test_tool_calls_render_as_the_template_writes_them_and_are_trained(family, path, phi3_tokenizer_dir,
                                                                       monkeypatch):
    """input_ids are transformers' apply_chat_template(messages, tools=TOOLS); the labels are the call as the
    family writes it and the final answer, each with its end-of-turn token, nothing of the tool's result
    (Qwen2.5: a user turn of <tool_response>; Llama 3.1: an ipython turn) nor of the prompts."""
    template, special, plain, want = FAMILIES[family]
    tok = _tokenizer(phi3_tokenizer_dir, template, special, plain)
    if path == "prefixes":  # the fallback for tokenizers without offsets
        monkeypatch.setattr("philora.data.encoding._labels_from_offsets", lambda *a: None)
    record = _record(tool_calls=[CALL])
    ex = encode_chat(to_messages(record), tok)
    openai = [dict(m, content=m.get("content", "")) for m in record["messages"]]
    ids = tok.apply_chat_template(openai, tools=TOOLS, tokenize=True, return_dict=True)["input_ids"]
    assert ex["input_ids"] == ids
    runs, current = [], []
    for t, label in zip(ids, ex["labels"]):
        if label != IGNORE_INDEX:
            assert label == t
            current.append(t)
        elif current:
            runs, current = runs + [current], []
    runs += [current] if current else []
    assert [tok.decode(r, skip_special_tokens=False) for r in runs] == want
    text = tok.decode(ids, skip_special_tokens=False)
    assert '"temp' in text and text.count('"name": "weather"') == 2  # the tool's result, its definition, the call


PHI4_MINI_TOOLS = ("{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and "
                   "message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' "
                   "+ message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + "
                   "message['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}")  # Phi-4-mini's, as families.json


@pytest.mark.parametrize("family", list(FAMILIES))
def test_record_tools_without_a_system_message(family, phi3_tokenizer_dir):
    """OpenAI-style records often have tools and no system message: Qwen2.5's and Llama 3.1's templates
    take them as tools= (writing their own system block), as transformers renders them."""
    template, special, plain, _ = FAMILIES[family]
    tok = _tokenizer(phi3_tokenizer_dir, template, special, plain)
    record = {"tools": TOOLS, "messages": [{"role": "user", "content": "Weather in Paris?"},
                                           {"role": "assistant", "tool_calls": [CALL]}]}
    msgs = to_messages(record, "auto", "f.jsonl:4")
    ids = encode_chat(msgs, tok, where="f.jsonl:4")["input_ids"]
    plain_msgs = [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": "", "tool_calls": [CALL]}]
    want = tok.apply_chat_template(plain_msgs, tools=TOOLS, tokenize=True, return_dict=True)["input_ids"]
    assert ids == want and '"weather"' in tok.decode(ids)


def test_tools_the_template_does_not_render_are_refused(phi3_tokenizer_dir):
    """Tools a template never shows the model would train calls to functions the prompt never named:
    Phi-4-mini's template reads them only from a system message, so a record's tools with no system
    message are refused, naming the record; on a system message they render. A template with no tools
    at all (Phi-3's) refuses them either way."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(phi3_tokenizer_dir))
    tok.chat_template = PHI4_MINI_TOOLS
    turns = [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": "ok"}]
    no_system = to_messages({"tools": TOOLS, "messages": turns}, "auto", "f.jsonl:5")
    with pytest.raises(DataError) as e:
        encode_chat(no_system, tok, where="f.jsonl:5")
    assert str(e.value).startswith("f.jsonl:5: the chat template renders none of the 'tools' (given on the first")
    assert "\n" not in str(e.value)
    system = to_messages({"tools": TOOLS, "messages": [{"role": "system", "content": "s"}] + turns}, "auto", "f.jsonl:6")
    assert "<|tool|>" in tok.decode(encode_chat(system, tok, where="f.jsonl:6")["input_ids"])
    phi3 = AutoTokenizer.from_pretrained(str(phi3_tokenizer_dir))
    with pytest.raises(DataError, match="f.jsonl:6: the chat template renders none of the 'tools' .given on the system"):
        encode_chat(system, phi3, where="f.jsonl:6")


def test_tools_are_trained_as_servers_render_them(phi3_tokenizer_dir):
    """Servers hand templates OpenAI-shaped tools ({"type", "function": {"name", "description",
    "parameters"}}, in that order, nothing else): a flat or reordered tool is trained in that shape;
    tools given as JSON text are written out as json.dumps does (as a template's tojson)."""
    from philora.data.encoding import served_tool
    flat = {"parameters": {"type": "object"}, "extra": 1, "description": "d", "name": "f"}
    want = {"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}
    assert json.dumps(served_tool(flat)) == json.dumps(want)
    assert json.dumps(served_tool({"type": "function", "function": flat})) == json.dumps(want)
    assert served_tool("free text") == "free text"
    msgs = to_messages({"tools": '[{"name":"f","parameters":{}}]', "messages": [
        {"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]})
    assert msgs[0]["tools"] == '[{"name": "f", "parameters": {}}]'
    assert template_inputs(msgs)[1] == {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}


def test_data_check_warns_of_tools_without_description(tmp_path, phi3_tokenizer_dir, capsys):
    """A tool with no description: vLLM renders null, llama-server "" where training had none, so the
    served prompt cannot be the trained one: data check says how many conversations have one."""
    from philora.cli import main
    tok = _tokenizer(phi3_tokenizer_dir, *FAMILIES["qwen2.5"][:3])
    tok.save_pretrained(tmp_path / "tok")
    bare = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    recs = [{"tools": TOOLS if i % 2 else bare, "messages": [{"role": "user", "content": f"q{i}"},
                                                           {"role": "assistant", "content": f"a{i}"}]} for i in range(6)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    code = main(["data", "check", f"model.name_or_path={tmp_path / 'tok'}", f"data.train={tmp_path / 'd.jsonl'}",
                 "data.eval_fraction=0"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "warning: 6 conversations define a tool with no \"description\"" in out  # TOOLS has none either
