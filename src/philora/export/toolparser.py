"""A vLLM tool parser that reads the tool calls a Phi-4-mini run was trained to write.

Phi-4-mini writes ``<|tool_call|>[{"name": .., "arguments": {..}}, ..]<|/tool_call|>`` (its tokenizer's
special tokens; use/toolcalls.py reads it), but vLLM's parser named for it, ``phi4_mini_json``, looks for
``functools[...]`` (vllm/tool_parsers/phi4mini_tool_parser.py) and reads none of these calls: a server
started with it answers every call as plain text (``philora verify --vllm-tool-parser phi4_mini_json``
shows it). vLLM loads parsers from a file (``--tool-parser-plugin FILE --tool-call-parser NAME``), so
``philora export tool-parser RUN`` writes ``PLUGIN_SOURCE`` beside the run and prints the ``vllm serve``
line; ``philora verify`` serves the run's prompts through the same file. Formats that vLLM's own parsers
read (hermes, llama3_json: ``model.families.TOOL_CALL_FORMATS``) need no plugin.

The plugin is one self-contained file, vllm and the standard library only, since vLLM's python need not
have philora (it is kept here as text: as a module of the package it would import vllm). Its rules are
use/toolcalls.py's ``phi4_mini`` ones, to the letter (tests/export/test_tool_parser.py runs both on the
same texts): a JSON list of calls or one call; ``arguments`` or ``parameters``, an object or its JSON
text; the text before the first ``<|tool_call|>`` is the content; a reply that ends inside a call (no
``<|/tool_call|>``) is read to its end. Where philora keeps an unparsable call as ``{"invalid": ..}``,
the plugin answers the whole reply as content and no call, as vLLM's own parsers do. Streaming sends
the content up to ``<|tool_call|>``, then each call whole once its JSON is complete (the closing tag, or
a body that parses). ``<|tool_call|>`` is a special token, which the server strips from the text unless
the parser's ``adjust_request`` turns ``skip_special_tokens`` off, as vLLM's hermes parser does.

The tools, for a model whose template reads them from the system message. An OpenAI chat request carries
the tool definitions as the request's ``tools``, each assistant call as ``tool_calls`` with its arguments as
JSON text (``openai_messages``, ``openai_tools``: data/encoding.template_inputs' ``tools=``), and nothing else
on a message: vLLM and llama-server drop a ``tools`` key on a system message. philora's data carries them on
the system message as JSON text (data/formats.py ``tools_json``), where Phi-4-mini's template reads them
(``<|system|>{content}<|tool|>{tools}<|/tool|><|end|>``), and nowhere else: behind a server a client's tools
never reach its prompt. For such a template ``philora export tool-parser`` writes ``tools_template`` for
``vllm serve --chat-template``, and ``philora export gguf`` puts it in the GGUF for llama.cpp: the run's own
template, unchanged, behind a preamble that, when the request gives ``tools`` and the system message has
none, sets the system message's ``tools`` to the JSON text training spliced in. The servers normalize the
request's tools (``name``, ``description``, ``parameters`` in that order, other keys dropped; a missing
description is null in vLLM, ``""`` in llama-server), so the preamble drops null fields and an empty
description, and writes each tool in the data's shape (``tools_shape``): ``flat`` (``{"name", "description",
"parameters"}``, Phi-4-mini's model card) or ``openai`` (``{"type": "function", "function": {...}}``), with
``tojson`` as ``json.dumps(..., ensure_ascii=False)``: training's text byte for byte when the data's tools
are in that shape, keys in that order and no others; with no system message they get an empty one.

Hand-written: vLLM has no parser for this format, and neither vLLM nor the model ships a template that
reads the request's tools for Phi-4-mini.
"""

import json
import re
import shlex
from pathlib import Path
from typing import List, Optional, Tuple

import jinja2
from jinja2 import meta

from ..core.diskio import guard_output, write_text
from ..core.errors import PhiloraError
from ..data.build import build_datasets
from ..data.encoding import template_inputs
from ..model.adapter import read_adapter
from ..model.families import TOOL_CALL_FORMATS, tool_call_format, vllm_tool_parser
from ..model.loading import load_tokenizer, resolve_path, resolve_source
from .adapter_check import VLLM_DEFAULT_MAX_LORA_RANK, adapter_rank, vllm_max_lora_rank

PLUGIN_SOURCE = r'''"""philora's vLLM tool parser for Phi-4-mini's tool calls (written by ``philora export tool-parser``).

    vllm serve BASE --enable-auto-tool-choice --tool-parser-plugin THIS_FILE --tool-call-parser philora_phi4_mini

Phi-4-mini writes <|tool_call|>[{"name": .., "arguments": {..}}, ..]<|/tool_call|>; vLLM's own phi4_mini_json
parser looks for functools[...] and reads none of these. The rules are philora's (philora/use/toolcalls.py),
which trained the model: a JSON list of calls or one call; "arguments" or "parameters", an object or its
JSON text; the text before the first <|tool_call|> is the content; a reply that ends inside a call (no
<|/tool_call|>) is read to its end. A call that does not parse makes the whole reply content, no call, as
vLLM's own parsers do. Streaming: the content up to <|tool_call|>, then each call whole once its JSON is
complete. vllm and the standard library only: vLLM's python need not have philora.
"""

import json
import re

try:
    from vllm.tool_parsers.abstract_tool_parser import ToolParser, ToolParserManager
except ImportError:  # vLLM before the parsers left vllm.entrypoints.openai
    from vllm.entrypoints.openai.tool_parsers.abstract_tool_parser import ToolParser, ToolParserManager
try:
    from vllm.entrypoints.generate.base.protocol import (DeltaFunctionCall, DeltaMessage, DeltaToolCall,
                                                         ExtractedToolCallInformation, FunctionCall, ToolCall)
except ImportError:
    from vllm.entrypoints.openai.protocol import (DeltaFunctionCall, DeltaMessage, DeltaToolCall,
                                                  ExtractedToolCallInformation, FunctionCall, ToolCall)

NAME = "philora_phi4_mini"
START, END = "<|tool_call|>", "<|/tool_call|>"
BODIES = re.compile(r"<\|tool_call\|>(.*?)(?:<\|/tool_call\|>|$)", re.DOTALL)  # philora's own


def read_call(obj):
    """(name, arguments as JSON text) of one decoded call object; None when it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj["arguments"] if "arguments" in obj else obj.get("parameters", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return obj["name"], json.dumps(args, ensure_ascii=False)


def read_body(body):
    """The calls of the JSON between the tags (a list of calls, or one); None if any is not a call."""
    try:
        value = json.loads(body)
    except ValueError:
        return None
    calls = [read_call(v) for v in (value if isinstance(value, list) else [value])]
    return None if None in calls else calls


def read_reply(text):
    """(content: the text before the first call, calls); calls None when one does not parse."""
    calls = []
    for body in BODIES.findall(text):
        got = read_body(body)
        if got is None:
            return text, None
        calls += got
    return text.split(START, 1)[0], calls


def blocks(text):
    """[(body, closed)] of each <|tool_call|> in text, cut where BODIES cuts them."""
    out, at = [], text.find(START)
    while at >= 0:
        end = text.find(END, at + len(START))
        out.append((text[at + len(START):] if end < 0 else text[at + len(START):end], end >= 0))
        at = -1 if end < 0 else text.find(START, end + len(END))
    return out


def tool_call(name, args):
    return ToolCall(type="function", function=FunctionCall(name=name, arguments=args))


class PhiloraPhi4MiniToolParser(ToolParser):
    """vLLM --tool-call-parser philora_phi4_mini. One instance per request (the server's contract)."""

    def __init__(self, tokenizer, *args, **kwargs):
        super().__init__(tokenizer, *args, **kwargs)
        self.content_sent = 0  # characters of the reply streamed as content
        self.blocks_sent = 0  # <|tool_call|> blocks streamed (as calls, or as text when no call)

    def adjust_request(self, request):
        request = super().adjust_request(request)
        if request.tools and request.tool_choice != "none":
            request.skip_special_tokens = False  # <|tool_call|> is a special token: keep it in the text
        return request

    def extract_tool_calls(self, model_output, request):
        content, calls = read_reply(model_output)
        if not calls:
            return ExtractedToolCallInformation(tools_called=False, tool_calls=[], content=model_output)
        return ExtractedToolCallInformation(tools_called=True, tool_calls=[tool_call(n, a) for n, a in calls],
                                            content=content or None)

    def extract_tool_calls_streaming(self, previous_text, current_text, delta_text, previous_token_ids,
                                     current_token_ids, delta_token_ids, request):
        # <|tool_call|> is one token, so it arrives whole: no text is held back for a tag in pieces
        start = current_text.find(START)
        upto = len(current_text) if start < 0 else start
        content = current_text[self.content_sent:upto]
        self.content_sent = max(self.content_sent, upto)
        deltas = []
        for body, closed in blocks(current_text)[self.blocks_sent:]:
            calls = read_body(body)
            if calls is None and not closed:
                break  # still being written
            self.blocks_sent += 1
            if calls is None:  # closed and no call: its text, as content
                content += START + body + END
                continue
            for name, args in calls:
                call = tool_call(name, args)
                self.current_tool_id = len(self.prev_tool_call_arr)
                self.prev_tool_call_arr.append({"name": name, "arguments": json.loads(args)})  # decoded, as vLLM's own
                self.streamed_args_for_tool.append(args)  # all of it: nothing left for the server to add
                deltas.append(DeltaToolCall(index=self.current_tool_id, type="function", id=call.id,
                                            function=DeltaFunctionCall(name=name, arguments=args).model_dump(
                                                exclude_none=True)))
        if content or deltas:
            return DeltaMessage(content=content or None, tool_calls=deltas)
        return None


ToolParserManager.register_module(NAME, module=PhiloraPhi4MiniToolParser)
'''

PARSER_NAME = re.search(r'^NAME = "(\w+)"$', PLUGIN_SOURCE, re.M).group(1)  # the plugin's own
PLUGIN_FILE = "philora_tool_parser.py"
PLUGIN_NOTE = "plugin: philora export tool-parser"
PLUGIN_FORMATS = ("phi4_mini",)  # tool-call formats no vLLM parser reads, which the plugin reads
FORMATS = tuple(name for name, _, _ in TOOL_CALL_FORMATS)
SHAPE_NOTE = {"flat": 'the data\'s tools as [{"name", "description", "parameters"}, ...] (Phi-4-mini\'s model card), '
                      'keys in that order, no others (--tools-shape openai: {"type": "function", "function": ...})',
              "openai": 'the data\'s tools as [{"type": "function", "function": {"name", "description", '
                        '"parameters"}}, ...], keys in that order, no others'}
TOOLS_SHAPES = ("flat", "openai")
TEMPLATE_FILE = "philora_chat_template.jinja"
# The preamble: {shape} is TOOLS_SHAPES' entry. Jinja's if-block does not scope, so ``messages`` is replaced
# for the rest of the template. Loops, namespace(), dict(pairs) and dict(mapping, key=value) only: constructs
# both Python's jinja2 (transformers, vLLM, llama-cpp-python) and llama.cpp's own C++ Jinja engine (llama-server,
# common/jinja/) run; that engine reads ``rejectattr('1', 'none')`` as a test named '1' and fails.
PREAMBLE = """{#- philora: the request's tools onto the system message, as JSON text, as trained
(tools shape: {shape}); the model's own template follows, unchanged -#}
{%- if tools and not (messages and messages[0]['role'] == 'system' and messages[0]['tools'] is defined
      and messages[0]['tools']) -%}
{%- set philora = namespace(tools=[]) -%}
{%- for tool in tools -%}
{%- set fn = tool['function'] if tool['function'] is defined else tool -%}
{%- set kept = namespace(pairs=[]) -%}
{%- for key, value in fn.items() -%}
{%- if value is not none and not (key == 'description' and value == '') -%}
{%- set kept.pairs = kept.pairs + [[key, value]] -%}
{%- endif -%}
{%- endfor -%}
{%- set fn = dict(kept.pairs) -%}
{%- set philora.tools = philora.tools + [{wrap}] -%}
{%- endfor -%}
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set messages = [dict(messages[0], tools=philora.tools | tojson)] + messages[1:] -%}
{%- else -%}
{%- set messages = [{'role': 'system', 'content': '', 'tools': philora.tools | tojson}] + messages -%}
{%- endif -%}
{%- endif -%}
"""
WRAP = {"flat": "fn", "openai": "{'type': 'function', 'function': fn}"}


def openai_tools(messages: List[dict]) -> Optional[list]:
    """An OpenAI request's ``tools``: training's ``tools=`` (data.encoding.template_inputs); None if none."""
    return template_inputs(messages)[1].get("tools")


def openai_messages(messages: List[dict]) -> List[dict]:
    """The conversation as an OpenAI request's ``messages``: role, content, and an assistant's
    ``tool_calls`` with an id and the arguments as JSON text (as clients send them); no ``tools`` key."""
    out = []
    for m in messages:
        msg = {"role": m["role"], "content": m.get("content")}
        if m.get("tool_calls"):
            msg["tool_calls"] = [{"id": c.get("id", f"call_{k}"), "type": "function",
                                  "function": {"name": c["function"]["name"],
                                               "arguments": json.dumps(c["function"]["arguments"], ensure_ascii=False)}}
                                 for k, c in enumerate(m["tool_calls"])]
        out.append(msg)
    return out


def tools_shape(messages: List[dict]) -> str:
    """``openai`` when the conversation's tools are given as ``{"type": "function", "function": ...}``, else ``flat``."""
    chat, kwargs = template_inputs(messages)
    if not kwargs:
        return "flat"
    text = next(m["tools"] for m in chat if m.get("tools"))  # JSON text or a list: template_inputs read it
    tools = json.loads(text) if isinstance(text, str) else text
    tools = tools if isinstance(tools, list) else [tools]
    return "openai" if all(isinstance(t, dict) and "function" in t for t in tools) else "flat"


def reads_system_tools(template) -> bool:
    """Whether the template (or one of a dict of named templates) reads the tools from the system message and
    not from the ``tools`` variable (Phi-4-mini's), so that an OpenAI request's tools never reach its prompt.
    Parsed as transformers' environment parses it ({% break %}); a template Jinja cannot parse: no."""
    if isinstance(template, dict):
        return any(reads_system_tools(t) for t in template.values())
    if not template or not re.search(r"""message\[['"]tools['"]\]|message\.tools\b""", template):
        return False
    try:
        parsed = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except jinja2.TemplateSyntaxError:
        return False
    return "tools" not in meta.find_undeclared_variables(parsed)


def own_template(template) -> Optional[str]:
    """The one template a server renders a request with tools by, of a tokenizer's ``chat_template``: a dict
    of named templates gives its "tool_use" one, else its "default" (as transformers and vLLM choose)."""
    return template.get("tool_use") or template.get("default") if isinstance(template, dict) else template


def tools_template(template: str, shape: str = "flat") -> str:
    """The template for ``vllm serve --chat-template`` and a GGUF's ``tokenizer.chat_template``: ``template``
    behind ``PREAMBLE``, which writes the request's ``tools`` (in ``shape``) onto the system message as the
    JSON text training put there."""
    if shape not in TOOLS_SHAPES:
        raise ValueError(f"tools shape {shape!r}: expected one of {', '.join(TOOLS_SHAPES)}")
    return PREAMBLE.replace("{shape}", shape).replace("{wrap}", WRAP[shape]) + template


def vllm_chat_template(template, shape: str = "flat") -> Optional[str]:
    """``vllm serve --chat-template``'s text for a template that reads tools only from the system message, else None."""
    return tools_template(own_template(template), shape) if reads_system_tools(template) else None


def served_template(template, shape: str = "flat"):
    """The chat template a server renders a request's tools with as trained (a GGUF's): ``tools_template``
    for one that reads them only from the system message, else itself (a dict of named templates: each so)."""
    if isinstance(template, dict):
        return {name: served_template(t, shape) for name, t in template.items()}
    return tools_template(template, shape) if reads_system_tools(template) else template


def vllm_parser(fmt: Optional[str], name: Optional[str] = None) -> Tuple[Optional[str], bool]:
    """(vLLM --tool-call-parser, whether it is this plugin) to read format ``fmt``'s calls with: ``name``
    when given, this plugin for ``PLUGIN_FORMATS``, else vLLM's own; (None, False) without a format."""
    if fmt is None:
        return None, False
    name = name or (PARSER_NAME if fmt in PLUGIN_FORMATS else vllm_tool_parser(fmt))
    return name, name == PARSER_NAME


def write_plugin(path) -> Path:
    """The plugin file at ``path`` (atomically)."""
    return write_text(path, PLUGIN_SOURCE)


def own_parsers() -> str:
    """The formats vLLM's own parsers read, with the parser: 'hermes (--tool-call-parser hermes), ...'."""
    return ", ".join(f"{f} (--tool-call-parser {vllm_tool_parser(f)})" for f in FORMATS if f not in PLUGIN_FORMATS)


def serve_line(src, parser: str, plugin: Optional[Path], template: Optional[Path] = None,
               base: Optional[str] = None) -> str:
    """The ``vllm serve`` command for the run's adapter (its absolute path) on ``base`` (the resolved base
    directory: a GGUF / ``pkg:`` base's conversion; default the run's model), with the run's tokenizer where
    it has one, reading tool calls with ``parser`` (loaded from ``plugin`` when given), rendering with the
    ``--chat-template`` file ``template`` when given; ``--max-lora-rank`` where vLLM's default is too small."""
    rank = adapter_rank(read_adapter(src.adapter_dir))
    adapter = Path(src.adapter_dir).resolve()
    words = ["vllm", "serve", str(base or src.model_cfg.name_or_path)]
    words += ["--tokenizer", str(Path(src.tokenizer_path).resolve())] if src.tokenizer_path else []
    words += ["--enable-lora", "--lora-modules", f"{adapter.name}={adapter}"]
    if rank > VLLM_DEFAULT_MAX_LORA_RANK:
        words += ["--max-lora-rank", str(vllm_max_lora_rank(rank))]
    words += ["--chat-template", str(template)] if template else []
    words += ["--enable-auto-tool-choice"] + (["--tool-parser-plugin", str(plugin)] if plugin else [])
    return " ".join(map(shlex.quote, words + ["--tool-call-parser", parser]))


def data_tools_shape(src, tokenizer) -> str:
    """The tools shape ``export gguf`` / ``export tool-parser`` default to: for a template that reads them only
    from the system message (where the shape matters), that of the run's eval prompts (data.build_datasets
    from its config.yaml, as verify takes them: the tokenized data's cache makes it quick); else ``flat``."""
    if src.run_cfg is None or not reads_system_tools(tokenizer.chat_template):
        return "flat"
    quiet = lambda *a, **k: None  # noqa: E731
    try:
        _, examples, _ = build_datasets(src.run_cfg.data, tokenizer, src.run_cfg.training_config.seed, log=quiet)
    except PhiloraError as e:
        raise PhiloraError(f"{e} (reading the run's data for the shape of its tools: pass --tools-shape)") from None
    return tools_shape(next((e["messages"] for e in examples if any(m.get("tools") for m in e["messages"])), []))


def run_tokenizer(src):
    """The tokenizer a run's prompts are rendered with (the run's own, else its base's), without a model."""
    return load_tokenizer(src.tokenizer_path or resolve_path(src.model_cfg.name_or_path),
                          src.model_cfg.trust_remote_code, chat=False)


def export_tool_parser(run, out=None, shape: Optional[str] = None, force: bool = False) -> Tuple[Optional[Path], List[str]]:
    """``philora export tool-parser``: for a run whose model writes calls no vLLM parser reads, the plugin at
    ``out`` (default: RUN/philora_tool_parser.py) and, for a template that reads the tools only from the
    system message, the ``--chat-template`` file beside it (tools in ``shape``, default data_tools_shape's);
    an existing file replaced only with ``force``; (the plugin's path or None, the lines to print). A format
    vLLM reads: no file, the serve line with its parser. No tool-call format: PhiloraError (one line)."""
    run = str(run)
    src = resolve_source(run)
    if src.adapter_dir is None:
        raise PhiloraError(f"{run}: not a run or adapter directory (no adapter_config.json)")
    base = resolve_path(src.model_cfg.name_or_path)  # a GGUF / pkg: base: its converted directory
    tok = run_tokenizer(src)
    fmt = tool_call_format(tok)
    if fmt is None:
        raise PhiloraError(f"{run}: its model writes no tool calls in a format philora knows ({', '.join(FORMATS)}), "
                           f"so there is no tool parser to export; vLLM's own parsers read {own_parsers()}")
    parser, plugin = vllm_parser(fmt)
    if not plugin:
        return None, [f"{run}: vLLM's own {parser} parser reads this model's {fmt} tool calls; no plugin "
                      f"needed. Serve it with:", serve_line(src, parser, None, base=base)]
    path = guard_output(Path(out) if out is not None else Path(run) / PLUGIN_FILE, force, directory=False)
    template, lines = None, []
    if reads_system_tools(tok.chat_template):
        shape = shape or data_tools_shape(src, tok)
        template = guard_output(path.parent / TEMPLATE_FILE, force, directory=False, name="the chat template")
        write_text(template, vllm_chat_template(tok.chat_template, shape))
        lines = [f"{template}: the run's chat template behind a preamble that puts an OpenAI request's tools onto the "
                 f"system message as training did (its template reads them nowhere else; vLLM drops a message's "
                 f"'tools'), as {shape} JSON: {SHAPE_NOTE[shape]}"]
    path = write_plugin(path)
    return path, [f"{path}: vLLM tool parser {parser} for the {fmt} tool calls this model writes (vLLM's own "
                  f"{vllm_tool_parser(fmt)} reads none of them)."] + lines + [
                  "Serve it with:", serve_line(src, parser, path, template, base=base),
                  f"Check it in vLLM: philora verify {shlex.quote(run)} --vllm-python PATH (a python with vllm)"]
