"""philora export gguf's Ollama Modelfile TEMPLATE: for each chat format philora knows, the Go
template renders conversations exactly as the Hugging Face chat template does (a new reply, and a
conversation ending in an assistant turn, continued). Rendered by a tiny interpreter of the Go
text/template subset the TEMPLATE uses (no Go or Ollama needed); the HF templates are the hub's.
"""

import json
import re

import pytest

from philora.export.ollama import FORMATS, detect, go_template

CHATS = [
    [{"role": "user", "content": "What is 17 plus 25?"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. How can I help?"},
     {"role": "user", "content": "Write a haiku about the sea."}],
]


# -----------------------------------------------------------------------------
# a tiny interpreter for the Go text/template subset the TEMPLATE uses

def _go_tokens(expr: str):
    return re.findall(r'\(|\)|"(?:\\.|[^"\\])*"|[^\s()]+', expr)


def _go_eval(tokens, i, ctx):
    """Evaluate one operand at tokens[i]; returns (value, next index)."""
    t = tokens[i]
    if t == "(":
        value, i = _go_command(tokens, i + 1, ctx)
        assert tokens[i] == ")"
        i += 1
        while i < len(tokens) and tokens[i].startswith("."):
            value, i = value[tokens[i][1:]], i + 1
        return value, i
    if t.startswith('"'):
        return json.loads(t), i + 1
    if t.isdigit():
        return int(t), i + 1
    if t.startswith("$."):
        return ctx["$"][t[2:]], i + 1
    if t.startswith("$"):
        return ctx["vars"][t], i + 1
    if t.startswith("."):
        return ctx["dot"][t[1:]], i + 1
    raise AssertionError(f"unknown operand {t!r}")


FUNCS = {"eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "not": lambda a: not a,
         "and": lambda a, b: a and b, "or": lambda a, b: a or b, "len": len,
         "slice": lambda a, k: a[k:], "index": lambda a, k: a[k]}


def _go_command(tokens, i, ctx):
    if tokens[i] in FUNCS:
        f, args, i = FUNCS[tokens[i]], [], i + 1
        while i < len(tokens) and tokens[i] != ")":
            value, i = _go_eval(tokens, i, ctx)
            args.append(value)
        return f(*args), i
    return _go_eval(tokens, i, ctx)


def _go_expr(expr, ctx):
    value, i = _go_command(_go_tokens(expr), 0, ctx)
    return value


def _go_parse(template: str):
    """Text and actions with {{- / -}} trimming applied, as a flat list of ("text", s) / ("act", s)."""
    parts, pos = [], 0
    for m in re.finditer(r"\{\{(-\s)?(.*?)(\s-)?\}\}", template, re.S):
        text = template[pos:m.start()]
        if m.group(1):
            text = text.rstrip()
        if parts and parts[-1][0] == "trim":
            parts.pop()
            text = text.lstrip()
        parts.append(("text", text))
        parts.append(("act", m.group(2).strip()))
        if m.group(3):
            parts.append(("trim", ""))
        pos = m.end()
    tail = template[pos:]
    if parts and parts[-1][0] == "trim":
        parts.pop()
        tail = tail.lstrip()
    return parts + [("text", tail)]


def _go_block(parts, i, ctx, out, run=True):
    """Run parts from i until an unmatched else/end; returns (index of it, its action)."""
    while i < len(parts):
        kind, s = parts[i]
        if kind == "text":
            if run:
                out.append(s)
            i += 1
        elif s == "end" or s == "else" or s.startswith("else if "):
            return i, s
        elif s.startswith("if "):
            taken, cond = False, s[3:]
            while True:
                hit = run and not taken and (cond is None or bool(_go_expr(cond, ctx)))
                i, stop = _go_block(parts, i + 1, ctx, out, hit)
                taken = taken or hit
                if stop == "end":
                    break
                cond = None if stop == "else" else stop[len("else if "):]
            i += 1
        elif s.startswith("range "):
            m = re.fullmatch(r"range (\$\w+), (\$\w+) := (.+)", s)
            items = _go_expr(m.group(3), ctx) if run else []
            start, end = i + 1, None
            for k, item in enumerate(items):
                inner = dict(ctx, dot=item, vars=dict(ctx["vars"], **{m.group(1): k, m.group(2): item}))
                end, _ = _go_block(parts, start, inner, out)
            if end is None:
                end, _ = _go_block(parts, start, ctx, out, run=False)
            i = end + 1
        elif ":=" in s:
            name, expr = (x.strip() for x in s.split(":=", 1))
            if run:
                ctx["vars"][name] = _go_expr(expr, ctx)
            i += 1
        else:
            if run:
                out.append(str(_go_expr(s, ctx)))
            i += 1
    return i, None


def go_render(template: str, messages) -> str:
    root = {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
    out = []
    _go_block(_go_parse(template), 0, {"$": root, "dot": root, "vars": {}}, out)
    return "".join(out)


# Hub chat templates of each family (Phi-3: the fixture's own)
TEMPLATES = {
    "phi-3.5": "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
               "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
               "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
               "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}",
    "phi-4-mini": "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and "
                  "message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + "
                  "'<|tool|>' + message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] "
                  "+ '|>' + message['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
                  "{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}",
    "phi-4": "{% for message in messages %}{% if (message['role'] == 'system') %}{{'<|im_start|>system<|im_sep|>' + "
             "message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'user') %}{{'<|im_start|>user<|im_sep|>' "
             "+ message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'assistant') %}"
             "{{'<|im_start|>assistant<|im_sep|>' + message['content'] + '<|im_end|>'}}{% endif %}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}",
    "chatml": "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
              "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    "qwen2.5": "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + "
               "'<|im_end|>\n' }}{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are "
               "a helpful assistant.<|im_end|>\n' }}{%- endif %}{%- for message in messages %}{%- if (message.role == "
               "\"user\") or (message.role == \"system\" and not loop.first) or (message.role == \"assistant\") %}"
               "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}{%- endif %}"
               "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}",
    "llama-3": "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
               "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
               "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
               "{{ content }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
}


@pytest.mark.parametrize("family", ["phi-3", *TEMPLATES])
def test_ollama_template_renders_like_the_chat_template(family, tiny_model_dir, phi3_tokenizer_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(phi3_tokenizer_dir if family == "phi-3" else tiny_model_dir)
    if family != "phi-3":
        tok.chat_template = TEMPLATES[family]
    if family == "llama-3":
        tok.bos_token = "<|begin_of_text|>"
    fmt = detect(tok)
    assert fmt is not None and fmt.name == family
    bos = tok.bos_token if fmt.bos else ""
    template = go_template(fmt)
    chats = CHATS + [[{"role": "system", "content": ""}, {"role": "user", "content": "x"}]]
    for chat in chats:  # a new reply: the assistant header is added
        assert bos + go_render(template, chat) == tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    for chat in CHATS:  # a conversation ending in an assistant turn is continued (prefill)
        chat = chat + [{"role": "assistant", "content": "Sure, here"}]
        assert bos + go_render(template, chat) == tok.apply_chat_template(chat, tokenize=False, continue_final_message=True)


def test_unknown_chat_template_is_not_guessed(tiny_model_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}### assistant:"
    assert detect(tok) is None
    assert {f.name for f in FORMATS} == {"phi-3", *TEMPLATES}


# SmolLM2-135M-Instruct's template (the real model's, as its GGUF carries it): ChatML that writes a
# default system message when the conversation has none
SMOLLM2 = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"


def test_a_default_system_message_is_read_off_the_template(tiny_model_dir):
    """ChatML with its own default system prompt (SmolLM2's) is ChatML with that prompt: the Modelfile's
    Go template renders it as the chat template does, with and without a system message."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = SMOLLM2
    fmt = detect(tok)
    assert fmt is not None and fmt.name == "chatml"
    assert fmt.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    template = go_template(fmt)
    for chat in CHATS + [[{"role": "system", "content": ""}, {"role": "user", "content": "x"}]]:
        assert go_render(template, chat) == tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
