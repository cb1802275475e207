"""The Ollama ``Modelfile`` written beside an exported GGUF: ``FROM`` the file, a ``TEMPLATE``
equivalent to the tokenizer's chat template, and ``PARAMETER stop`` for every stop token.

Ollama renders prompts with Go templates, not Jinja, and a template that drops the end-of-turn
token or the assistant header is what makes exported models ramble or print gibberish. Instead of
translating Jinja in general, the chat formats of the families philora fine-tunes (Phi-3 / 3.5,
Phi-4-mini, Phi-4, ChatML / Qwen, Llama 3) are data here; the tokenizer's template is recognised
by rendering probe conversations through it, and the matching format's Go template is written; a
format's template that writes a system message of its own when a conversation has none (SmolLM2's,
Qwen2.5's) is recognised with that message read off its rendering. An unrecognised template gets no TEMPLATE line (Ollama then guesses from the GGUF's own chat
template) and a printed note. The Go template handles a conversation ending in a user turn
(adds the assistant header) or in an assistant turn (left open, so the reply continues it).
"""

from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence, Tuple

from ..core.diskio import write_text
from ..model.families import stop_token_ids

TURN_ROLES = ("system", "user", "assistant")  # the turns a Modelfile TEMPLATE renders (no tool turns)


@dataclass(frozen=True)
class ChatFormat:
    name: str
    turn: Dict[str, Tuple[str, str]]  # role -> (text before the content, text after it)
    generation: str  # the assistant header a reply follows
    skip_empty_system: bool = False
    default_system: Optional[str] = None  # rendered when the conversation has no system message
    bos: bool = False  # the template starts with the tokenizer's BOS text (added by llama.cpp instead)


def _same(before: str, after: str, roles=TURN_ROLES) -> Dict[str, Tuple[str, str]]:
    return {r: (before.format(role=r), after) for r in roles}


FORMATS: List[ChatFormat] = [
    ChatFormat("phi-3", _same("<|{role}|>\n", "<|end|>\n"), "<|assistant|>\n"),
    ChatFormat("phi-3.5", _same("<|{role}|>\n", "<|end|>\n"), "<|assistant|>\n", skip_empty_system=True),
    ChatFormat("phi-4-mini", _same("<|{role}|>", "<|end|>"), "<|assistant|>"),
    ChatFormat("phi-4", _same("<|im_start|>{role}<|im_sep|>", "<|im_end|>"), "<|im_start|>assistant<|im_sep|>"),
    ChatFormat("chatml", _same("<|im_start|>{role}\n", "<|im_end|>\n"), "<|im_start|>assistant\n"),
    ChatFormat("qwen2.5", _same("<|im_start|>{role}\n", "<|im_end|>\n"), "<|im_start|>assistant\n",
               default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
    ChatFormat("llama-3", _same("<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>"),
               "<|start_header_id|>assistant<|end_header_id|>\n\n", bos=True),
]

PROBES: List[List[dict]] = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}, {"role": "user", "content": "C"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "A"}, {"role": "assistant", "content": "B"},
     {"role": "user", "content": "C"}],
]


def render(fmt: ChatFormat, messages: Sequence[dict]) -> str:
    """What the format's chat template gives with add_generation_prompt=True (after BOS)."""
    out = ""
    if fmt.default_system and (not messages or messages[0]["role"] != "system"):
        before, after = fmt.turn["system"]
        out += before + fmt.default_system + after
    for m in messages:
        if m["role"] == "system" and fmt.skip_empty_system and not m["content"]:
            continue
        before, after = fmt.turn[m["role"]]
        out += before + m["content"] + after
    return out + fmt.generation


def detect(tok) -> Optional[ChatFormat]:
    """The known format whose rendering equals the tokenizer's chat template on every probe."""
    if not getattr(tok, "chat_template", None):
        return None
    try:
        wanted = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in PROBES]
    except Exception:  # noqa: BLE001 (a template that rejects a probe is no known format)
        return None
    for derive in (False, True):  # the formats as listed first, then with a default system message read off
        for fmt in FORMATS:
            bos = (tok.bos_token or "") if fmt.bos else ""
            candidate = _with_default_system(fmt, wanted[0].removeprefix(bos)) if derive else fmt
            if candidate and all(w == bos + render(candidate, p) for w, p in zip(wanted, PROBES)):
                return candidate
    return None


def _with_default_system(fmt: ChatFormat, text: str) -> Optional[ChatFormat]:
    """``fmt`` with the system message its template writes when a conversation has none (SmolLM2's
    "You are a helpful AI assistant named SmolLM, ..."), read off the rendering of a conversation
    without one; None when that rendering starts with no system turn."""
    before, after = fmt.turn["system"]
    if fmt.default_system or not text.startswith(before) or after not in text[len(before):]:
        return None
    return replace(fmt, default_system=text[len(before):].split(after, 1)[0])


def _lit(text: str) -> str:
    """A Go template action printing ``text`` (a Go string literal: no whitespace trimming issues)."""
    esc = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return '{{ "' + esc + '" }}'


def go_template(fmt: ChatFormat) -> str:
    """Ollama's TEMPLATE (Go text/template over .Messages) for ``fmt``."""
    lines = []
    if fmt.default_system:
        before, after = fmt.turn["system"]
        lines.append('{{- if ne (index .Messages 0).Role "system" }}' + _lit(before + fmt.default_system + after)
                     + "{{ end }}")
    lines += ["{{- range $i, $_ := .Messages }}", "{{- $last := eq (len (slice $.Messages $i)) 1 }}"]
    for k, role in enumerate(TURN_ROLES):
        before, after = fmt.turn[role]
        body = _lit(before) + "{{ .Content }}"
        body += ("{{ if not $last }}" + _lit(after) + "{{ end }}") if role == "assistant" else _lit(after)
        if role == "system" and fmt.skip_empty_system:
            body = "{{ if .Content }}" + body + "{{ end }}"
        lines.append(f'{{{{- {"if" if k == 0 else "else if"} eq .Role "{role}" }}}}' + body)
    lines += ["{{- end }}", '{{- if and $last (ne .Role "assistant") }}' + _lit(fmt.generation) + "{{ end }}",
              "{{- end }}"]
    return "\n".join(lines)


def stop_strings(model_dir: Path, tok, eot: Optional[str]) -> List[str]:
    """Every token generation stops on (generate.stop_token_ids: generation config, eos, the
    architecture's stop tokens) plus the end-of-turn token, as text."""
    from transformers import AutoConfig, GenerationConfig
    try:
        gen = GenerationConfig.from_pretrained(str(model_dir))
    except (OSError, ValueError):
        gen = None
    ids = stop_token_ids(SimpleNamespace(generation_config=gen, config=AutoConfig.from_pretrained(str(model_dir))), tok)
    out = [tok.convert_ids_to_tokens(i) for i in ids if i < len(tok)]
    return sorted(set(out + ([eot] if eot else [])))


def modelfile_text(from_line: str, tok, stops: Sequence[str], adapter: Optional[str] = None) -> Tuple[str, bool]:
    """(Modelfile text, whether a TEMPLATE was written)."""
    fmt = detect(tok)
    lines = ["# written by philora export gguf; use: ollama create NAME -f Modelfile",
             f"FROM {from_line}"]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    if fmt is not None:
        lines += [f"# chat format: {fmt.name}", f'TEMPLATE """{go_template(fmt)}"""']
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n", fmt is not None


def modelfile_path(out) -> Path:
    """Where the Modelfile of the GGUF file ``out`` goes: beside it (Ollama's FROM ./name)."""
    return Path(out).parent / "Modelfile"


def write_modelfile(out: Path, model_dir: Path, tok, eot: Optional[str], base_from: Optional[str] = None) -> Path:
    """Write ``Modelfile`` next to the GGUF ``out``: FROM it (or, for an adapter, FROM the base
    ``base_from`` with ADAPTER it)."""
    name = f"./{out.name}"
    from_line, adapter = (base_from, name) if base_from else (name, None)
    text, templated = modelfile_text(from_line, tok, stop_strings(model_dir, tok, eot), adapter)
    path = write_text(modelfile_path(out), text)  # atomic: a failed write leaves the old one, says why in one line
    if not templated:
        print(f"export: the chat template is not one philora knows (Phi-3/3.5, Phi-4-mini, Phi-4, ChatML, "
              f"Qwen2.5, Llama 3); {path} has no TEMPLATE, Ollama will guess it from the GGUF")
    return path
