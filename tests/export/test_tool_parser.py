"""philora.export.toolparser: the vLLM tool-parser plugin for Phi-4-mini's calls, and ``philora export
tool-parser``.

The plugin runs in real vLLM (its CPU build's python, .venv-vllm), loaded as ``vllm serve
--tool-parser-plugin`` loads it, and is driven through vLLM's own serving parser (the ``Parser``
vLLM's chat endpoint builds per request: ``adjust_request``, ``parse`` for a whole reply, ``parse_delta``
for a stream, ending with its ``finished`` step). On tricky replies its calls are checked against
philora's own phi4_mini parser (use/toolcalls.py, which reads what the model was trained to write),
whole and streamed (token by token through Phi-4-mini-shape tokenizer, and character by character);
vLLM's phi4_mini_json reads none of them. The command's output and one-line errors: a Phi-4-mini
adapter gets the file and the ``vllm serve`` line, Qwen2.5 (hermes) and Llama 3 (llama3_json) adapters
the line with vLLM's own parser, a model without a tool-call format a one-line error.
"""

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

from philora.data.encoding import template_inputs
from philora.data.formats import to_messages
from philora.export.toolparser import (PARSER_NAME, PLUGIN_FILE, PLUGIN_SOURCE, TEMPLATE_FILE, openai_messages,
                                      openai_tools, reads_system_tools, tools_shape, tools_template, vllm_parser,
                                      write_plugin)
from philora.use.toolcalls import parse_tool_calls

S, E = "<|tool_call|>", "<|/tool_call|>"
CALL = {"name": "weather", "arguments": {"city": "Zürich", "days": 2}}
# (what it tries) -> reply text, as vLLM hands it to the parser: special tokens kept, the stop token left out
TEXTS = {
    "list of one": S + json.dumps([CALL]) + E,
    "list of two, parameters": S + json.dumps([CALL, {"name": "add", "parameters": {"values": [2, 3.0]}}]) + E,
    "one object": S + json.dumps(CALL, ensure_ascii=False) + E,
    "arguments as JSON text": S + json.dumps([{"name": "f", "arguments": json.dumps({"q": "a}]b"})}]) + E,
    "no arguments": S + '[{"name": "now"}]' + E,
    "content first": "Let me look that up.\n" + S + json.dumps([CALL]) + E,
    "no closing tag": "ok " + S + json.dumps([CALL]),
    "no closing tag, newline": S + json.dumps([CALL]) + "\n",
    "two blocks": S + json.dumps(CALL) + E + "\n" + S + '[{"name": "g", "arguments": {}}]' + E,
    "text after": S + json.dumps([CALL]) + E + " Done.",
    "braces in strings": S + '[{"name": "say", "arguments": {"text": "[{\\"x\\": 1}] <|tool"}}]' + E,
    "empty list": S + "[]" + E,
    "no call": "The weather in Paris is {sunny} [mostly] < 3 days.",
    "broken JSON": "Hm. " + S + '[{"name": "f", "arguments": {]' + E,
    "not a call in the list": S + '[{"name": "f", "arguments": {}}, 3]' + E,
    "arguments text not JSON": S + '[{"name": "f", "arguments": "{oops"}]' + E,
    "name not a string": S + '[{"name": 7, "arguments": {}}]' + E,
    "cut off inside": S + '[{"name": "f", "argum',
    "valid then broken": S + json.dumps([CALL]) + E + S + "{nope" + E,
}

DRIVER = r'''
import json, sys
from transformers import AutoTokenizer
from vllm.tool_parsers import ToolParserManager
from vllm.parser.parser_manager import ParserManager
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

plugin, tokenizer_dir, name = sys.argv[1:4]
texts = json.load(sys.stdin)
ToolParserManager.import_tool_parser(plugin)  # what vllm serve --tool-parser-plugin does
tok = AutoTokenizer.from_pretrained(tokenizer_dir)
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]

def request(**kw):
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], **kw)

def parser(parser_name, req):  # as the chat endpoint builds one per request
    cls = ParserManager.get_parser(tool_parser_name=parser_name, enable_auto_tools=True, tokenizer=tok)
    p = cls(tok, req.tools)
    return p, p.adjust_request(req)

def whole(parser_name, text):
    p, req = parser(parser_name, request(tools=TOOLS, tool_choice="auto"))
    _, content, calls = p.parse(text, req, enable_auto_tools=True)
    return {"content": content, "calls": [[c.name, json.loads(c.arguments)] for c in calls or []]}

def pieces_by_token(text):  # the deltas vLLM's detokenizer sends: an incomplete UTF-8 character waits
    ids, out, sent = tok.encode(text, add_special_tokens=False), [], ""
    for i in range(len(ids)):
        now = tok.decode(ids[:i + 1], skip_special_tokens=False)
        if not now.endswith("\ufffd"):
            out.append((now[len(sent):], ids[i:i + 1]))
            sent = now
    assert sent == text, (sent, text)
    return out

def pieces_by_char(text):  # the tags whole (one token each), everything else a character at a time
    out, at = [], 0
    while at < len(text):
        tag = next((t for t in ("<|tool_call|>", "<|/tool_call|>") if text.startswith(t, at)), text[at])
        out.append((tag, [0]))
        at += len(tag)
    return out

def stream(pieces, stop_alone):
    # the stop token (no text) ends the stream alone, or with the last piece in one delta
    pieces = pieces + [("", [1])] if stop_alone else pieces[:-1] + [(pieces[-1][0], pieces[-1][1] + [1])]
    p, req = parser(name, request(tools=TOOLS, tool_choice="auto", stream=True))
    content, calls = "", {}
    for i, (delta, ids) in enumerate(pieces):
        d = p.parse_delta(delta, ids, req, prompt_token_ids=[5], finished=i == len(pieces) - 1)
        if d is None:
            continue
        content += d.content or ""
        for t in d.tool_calls:
            c = calls.setdefault(t.index, {"ids": [], "name": "", "arguments": ""})
            c["ids"] += [t.id] if t.id else []
            c["name"] += (t.function.name or "") if t.function else ""
            c["arguments"] += (t.function.arguments or "") if t.function else ""
    assert sorted(calls) == list(range(len(calls))) and all(len(c["ids"]) == 1 for c in calls.values()), calls
    return {"content": content, "calls": [[calls[i]["name"], json.loads(calls[i]["arguments"])] for i in sorted(calls)]}

skips = {}
for label, kw in {"auto": dict(tools=TOOLS, tool_choice="auto"), "none": dict(tools=TOOLS, tool_choice="none"),
                  "no tools": {}}.items():
    skips[label] = parser(name, request(**kw))[1].skip_special_tokens
print(json.dumps({"skip_special_tokens": skips, "start_tokens": len(tok.encode("<|tool_call|>", add_special_tokens=False)),
                  "results": {k: {"whole": whole(name, t), "tokens": stream(pieces_by_token(t), False),
                                  "chars": stream(pieces_by_char(t), True), "vllm_phi4_mini_json": whole("phi4_mini_json", t)}
                              for k, t in texts.items()}}))
'''


@pytest.fixture(scope="module")
def in_vllm(vllm_python, families, tmp_path_factory):
    """The plugin written by philora, driven in real vLLM on TEXTS: {label: {"whole", "tokens", "chars",
    "vllm_phi4_mini_json"}} (one process: vLLM takes seconds to import)."""
    d = tmp_path_factory.mktemp("plugin")
    plugin = write_plugin(d / PLUGIN_FILE)
    driver = d / "driver.py"
    driver.write_text(DRIVER)
    proc = subprocess.run([vllm_python, str(driver), str(plugin), str(families.dir("phi4-mini")), PARSER_NAME],
                          input=json.dumps(TEXTS), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _philora(text):
    """philora's reading of a reply: (the calls as [name, arguments], whether every call parsed)."""
    calls = parse_tool_calls(text, "phi4_mini")
    return [[c["name"], c["arguments"]] for c in calls if "invalid" not in c], all("invalid" not in c for c in calls)


@pytest.mark.parametrize("label", list(TEXTS))
def test_plugin_reads_what_philora_reads(in_vllm, label):
    """Whole reply: philora's calls, name and arguments, with the text before the first tag as content;
    where philora finds a call it cannot parse, no call and the whole reply as content (vLLM's way).
    Streamed (by token, by character): the same calls, each once, and the text before the first tag."""
    text, got = TEXTS[label], in_vllm["results"][label]
    want, readable = _philora(text)
    before = text.split(S, 1)[0]
    if want and readable:
        assert got["whole"] == {"content": before if before.strip() else None, "calls": want}
    else:
        assert got["whole"] == {"content": text, "calls": []}
    for way in ("tokens", "chars"):
        if readable:
            assert got[way] == {"content": before, "calls": want}, way
        else:  # a stream cannot take back what it sent: never a call philora does not read, the text first
            assert got[way]["content"].startswith(before) and all(c in want for c in got[way]["calls"]), way
    if want:  # vLLM's own parser for Phi-4-mini looks for functools[...]: none of these
        assert in_vllm["results"][label]["vllm_phi4_mini_json"]["calls"] == []


def test_plugin_keeps_the_tool_call_token(in_vllm):
    """<|tool_call|> is one special token of Phi-4-mini's tokenizer; with tools (tool_choice auto) the
    plugin has the server keep special tokens in the text, else the server's default stands."""
    assert in_vllm["start_tokens"] == 1
    assert in_vllm["skip_special_tokens"] == {"auto": False, "none": True, "no tools": True}


def test_parser_choice():
    """verify's default vLLM parser per format: the plugin where vLLM has none that reads the calls."""
    assert vllm_parser("phi4_mini") == (PARSER_NAME, True) == ("philora_phi4_mini", True)
    assert vllm_parser("hermes") == ("hermes", False) and vllm_parser("llama3_json") == ("llama3_json", False)
    assert vllm_parser("phi4_mini", "phi4_mini_json") == ("phi4_mini_json", False)
    assert vllm_parser(None) == (None, False)


# -----------------------------------------------------------------------------
# philora export tool-parser

@pytest.fixture(scope="module")
def adapters(families, tmp_path_factory, helpers):
    """PEFT adapters (rank 4 on o_proj; 32 for phi4-mini) on the matrix's tiny Phi-4-mini, Llama 3, Qwen2
    (its tokenizer given Qwen2.5's <tool_call> tokens, saved with the adapter) and Phi-3 models."""
    from transformers import AutoTokenizer
    d = tmp_path_factory.mktemp("adapters")
    out = {}
    for name, r in (("phi4-mini", 32), ("llama3", 4), ("qwen2", 4), ("phi3-mini-4k", 4)):
        out[name] = d / name
        helpers.peft_adapter(families.dir(name), out[name], r=r, lora_alpha=8, target_modules=["o_proj"])
    tok = AutoTokenizer.from_pretrained(families.dir("qwen2"))
    tok.add_tokens(["<tool_call>", "</tool_call>"])
    tok.save_pretrained(out["qwen2"])
    return out


def _cli(capsys, helpers, *argv):
    code, err = helpers.run_cli(capsys, "export", "tool-parser", *map(str, argv))
    return code, err


def test_export_writes_the_plugin_and_the_serve_line(adapters, families, capsys, helpers):
    from philora.cli import main
    from transformers import AutoTokenizer
    run = adapters["phi4-mini"]
    capsys.readouterr()
    assert main(["export", "tool-parser", str(run)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    plugin = run / PLUGIN_FILE
    assert plugin.read_text(encoding="utf-8") == PLUGIN_SOURCE
    template = run / TEMPLATE_FILE
    assert out[0].startswith(f"{plugin}: vLLM tool parser philora_phi4_mini for the phi4_mini tool calls")
    assert out[1].startswith(f"{template}: the run's chat template behind a preamble") and "as flat JSON" in out[1]
    assert out[2] == "Serve it with:"
    assert out[3] == (f"vllm serve {families.dir('phi4-mini')} --enable-lora --lora-modules phi4-mini={run} "
                      f"--max-lora-rank 32 --chat-template {template} --enable-auto-tool-choice "
                      f"--tool-parser-plugin {plugin} --tool-call-parser philora_phi4_mini")
    own = AutoTokenizer.from_pretrained(families.dir("phi4-mini")).chat_template
    assert template.read_text(encoding="utf-8") == tools_template(own, "flat") and tools_template(own).endswith(own)
    code, err = _cli(capsys, helpers, run, "--out", run / "p.py")  # the template beside it exists
    assert code == 2 and err == f"philora: error: the chat template '{template}' already exists; pass --force to " \
                                f"overwrite it"
    assert main(["export", "tool-parser", str(run), "--out", str(run / "p.py"), "--tools-shape", "openai",
                 "--force"]) == 0
    assert (run / "p.py").read_text(encoding="utf-8") == PLUGIN_SOURCE
    assert template.read_text(encoding="utf-8") == tools_template(own, "openai")


@pytest.mark.parametrize("family, parser", [("qwen2", "hermes"), ("llama3", "llama3_json")])
def test_formats_vllm_reads_need_no_plugin(adapters, families, capsys, family, parser):
    from philora.cli import main
    run = adapters[family]
    capsys.readouterr()
    assert main(["export", "tool-parser", str(run)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == f"{run}: vLLM's own {parser} parser reads this model's {parser} tool calls; no plugin needed. " \
                     f"Serve it with:"
    tokenizer = f"--tokenizer {run} " if family == "qwen2" else ""  # the run's own tokenizer, where it has one
    assert out[1] == (f"vllm serve {families.dir(family)} {tokenizer}--enable-lora --lora-modules {family}={run} "
                      f"--enable-auto-tool-choice --tool-call-parser {parser}")
    assert not (run / PLUGIN_FILE).exists() and not (run / TEMPLATE_FILE).exists()


def test_export_errors_are_one_line(adapters, families, capsys, helpers, tmp_path):
    code, err = _cli(capsys, helpers, adapters["phi3-mini-4k"])
    assert code == 2 and err == (
        f"philora: error: {adapters['phi3-mini-4k']}: its model writes no tool calls in a format philora knows "
        f"(phi4_mini, hermes, llama3_json), so there is no tool parser to export; vLLM's own parsers read "
        f"hermes (--tool-call-parser hermes), llama3_json (--tool-call-parser llama3_json)")
    taken = tmp_path / "taken.py"
    taken.write_text("x")
    code, err = _cli(capsys, helpers, adapters["phi4-mini"], "--out", taken)
    assert code == 2 and err == f"philora: error: --out '{taken}' already exists; pass --force to overwrite it"
    code, err = _cli(capsys, helpers, families.dir("phi4-mini"), "--out", tmp_path / "x.py")
    assert code == 2 and err == f"philora: error: {families.dir('phi4-mini')}: not a run or adapter directory " \
                                f"(no adapter_config.json)"
    code, err = _cli(capsys, helpers, tmp_path / "nowhere", "--out", tmp_path / "y.py")
    assert code == 2 and err.startswith("philora: error: ") and "no such directory" in err


def test_serve_line_and_plugin_as_verify_serves_them(adapters, families, tmp_path, monkeypatch, helpers):
    """Through the API, a run given by a relative path: the serve line names the adapter and the run's
    tokenizer by absolute path (vllm serve may start elsewhere); an existing plugin file is replaced only with
    force, as the template beside it (the CLI guarded the plugin itself before)."""
    from philora.core.errors import PhiloraError
    from philora.export.toolparser import export_tool_parser
    monkeypatch.chdir(adapters["qwen2"].parent)
    _, lines = export_tool_parser("qwen2")
    run = adapters["qwen2"]
    assert lines[1] == (f"vllm serve {families.dir('qwen2')} --tokenizer {run} --enable-lora --lora-modules "
                        f"qwen2={run} --enable-auto-tool-choice --tool-call-parser hermes")
    taken = tmp_path / "taken.py"
    taken.write_text("x")
    with pytest.raises(PhiloraError) as e:
        export_tool_parser(adapters["phi4-mini"], taken)
    helpers.one_line_error(e, f"--out '{taken}' already exists; pass --force")
    assert taken.read_text() == "x"


def test_tools_shape_defaults_to_the_runs_data(adapters, families, tmp_path, capsys):
    """A Phi-4-mini run whose data gave the tools as {"type": "function", ...}: export tool-parser and
    export gguf without --tools-shape write the template in that shape (flat before: the verify of such a
    run passed in vLLM and failed in every GGUF); --tools-shape overrides it."""
    import shutil
    import gguf
    from transformers import AutoTokenizer
    from philora.cli import main
    from philora.core.config import Config, DataConfig, ModelConfig, save_config
    run = tmp_path / "run"
    shutil.copytree(adapters["phi4-mini"], run, ignore=shutil.ignore_patterns("philora_*"))
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"tools": OPENAI, "messages": [
        {"role": "system", "content": "Use tools."}, {"role": "user", "content": f"Wetter {i}?"},
        {"role": "assistant", "content": "Sonnig."}]}) + "\n" for i in range(4)))
    save_config(Config(model=ModelConfig(name_or_path=str(families.dir("phi4-mini"))),
                       data=DataConfig(train=str(data), eval=str(data), max_length=256)), run / "config.yaml")
    own = AutoTokenizer.from_pretrained(families.dir("phi4-mini")).chat_template
    assert main(["export", "tool-parser", str(run)]) == 0
    assert (run / TEMPLATE_FILE).read_text(encoding="utf-8") == tools_template(own, "openai")
    assert "as openai JSON" in capsys.readouterr().out
    for flag, shape in (([], "openai"), (["--tools-shape", "flat"], "flat")):
        out = tmp_path / shape / "m.gguf"
        assert main(["export", "gguf", str(run), "--out", str(out), "--outtype", "f32", *flag]) == 0
        assert gguf.GGUFReader(str(out)).fields["tokenizer.chat_template"].contents() == tools_template(own, shape)


def test_reads_system_tools_takes_what_servers_take():
    """A dict of named templates (any of them), {% break %} (transformers' loopcontrols); a template Jinja
    cannot parse reads no tools (a traceback from export gguf before)."""
    reads = "{% for message in messages %}{{ message['tools'] }}{% break %}{% endfor %}"
    assert reads_system_tools(reads)
    assert reads_system_tools({"default": "{{ messages }}", "tool_use": reads})
    assert not reads_system_tools({"default": "{{ messages }}"})
    assert not reads_system_tools("{% for message in messages %}{{ message['tools'] }}{% generation %}")
    assert not reads_system_tools(reads.replace("{% break %}", "") + "{{ tools }}")


# -----------------------------------------------------------------------------
# the chat template for vllm serve --chat-template: an OpenAI request's tools where Phi-4-mini reads them

FLAT = [{"name": "weather", "description": "Wetter in einer Stadt: Zürich", "parameters": {"city": {"type": "str"}}},
        {"name": "now", "parameters": {}}]
OPENAI = [{"type": "function", "function": t} for t in FLAT]


def _vllm_normalized(tools):
    """The request's tools as vLLM's server hands them to the template (ChatCompletionToolsParam.model_dump:
    type, then function's name, description (null when missing), parameters; tests/export/test_verify.py
    checks the whole path in real vLLM)."""
    return [{"type": "function", "function": {"name": t["function"]["name"],
                                              "description": t["function"].get("description"),
                                              "parameters": t["function"].get("parameters")}} for t in tools]


def _llama_server_normalized(tools):
    """The request's tools as llama-server hands them to the template (llama.cpp 0c1e570, common/chat.cpp
    common_chat_tools_parse_oaicompat + common_chat_tools_to_json_oaicompat: type, then function's name,
    description ("" when missing), parameters; other keys dropped)."""
    return [{"type": "function", "function": {"name": t["function"]["name"],
                                              "description": t["function"].get("description", ""),
                                              "parameters": t["function"].get("parameters", {})}} for t in tools]


@pytest.mark.parametrize("tools", [FLAT, OPENAI], ids=["flat", "openai"])
def test_tools_template_renders_the_trained_prompt(families, tools):
    """transformers' apply_chat_template of the Phi-4-mini template: the conversation as training renders it
    (data.formats + encoding.template_inputs: the tools on the system message as JSON text) equals the
    OpenAI request (no tools on a message, the request's tools as vLLM and llama-server normalize them, and
    as sent: llama-cpp-python's formatter too) through tools_template, in the data's shape; without tools, or with the system message's own, it is the
    model's template; with no system message the tools get an empty one."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(families.dir("phi4-mini"))
    record = {"tools": tools, "messages": [{"role": "system", "content": "Use tools."},
                                           {"role": "user", "content": "Wetter in Zürich?"},
                                           {"role": "assistant", "content": "Sonnig."}]}
    trained, kwargs = template_inputs(to_messages(record, "auto")[:-1])
    want = tok.apply_chat_template(trained, add_generation_prompt=True, tokenize=False, **kwargs)
    assert "<|tool|>" + json.dumps(tools, ensure_ascii=False) + "<|/tool|>" in want
    assert reads_system_tools(tok.chat_template) and tools_shape(trained) == ("flat" if tools is FLAT else "openai")
    fixed = tools_template(tok.chat_template, tools_shape(trained))
    request, req_tools = openai_messages(trained), _vllm_normalized(openai_tools(trained))
    assert all("tools" not in m for m in request) and openai_tools(trained) == OPENAI
    for served in (req_tools, _llama_server_normalized(OPENAI), OPENAI):  # vLLM's, llama-server's, the client's
        assert tok.apply_chat_template(request, tools=served, chat_template=fixed, add_generation_prompt=True,
                                       tokenize=False) == want
    if importlib.util.find_spec("llama_cpp"):  # llama-cpp-python's own Jinja2 formatter, as a GGUF's template
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        assert Jinja2ChatFormatter(template=fixed, eos_token=tok.eos_token, bos_token=tok.bos_token or "")(
            messages=request, tools=OPENAI).prompt == want
    assert "<|tool|>" not in tok.apply_chat_template(request, tools=req_tools, add_generation_prompt=True,
                                                     tokenize=False)  # the model's own: the tools are lost
    assert tok.apply_chat_template(request, chat_template=fixed, add_generation_prompt=True, tokenize=False) == \
        tok.apply_chat_template(request, add_generation_prompt=True, tokenize=False)
    assert tok.apply_chat_template(trained, tools=req_tools, chat_template=fixed, add_generation_prompt=True,
                                   tokenize=False) == want
    assert tok.apply_chat_template(request[1:], tools=req_tools, chat_template=fixed, add_generation_prompt=True,
                                   tokenize=False) == want.replace("<|system|>Use tools.", "<|system|>")


def test_templates_that_read_the_tools_variable_need_no_fix():
    """Qwen2.5's and Llama 3.1's templates read the request's tools= (tests/fixtures/chat_templates)."""
    d = Path(__file__).parents[1] / "fixtures" / "chat_templates"
    for name in ("Qwen-Qwen2.5-7B-Instruct.jinja", "meta-llama-Llama-3.1-8B-Instruct.jinja"):
        assert not reads_system_tools((d / name).read_text(encoding="utf-8"))
    assert not reads_system_tools(None)
