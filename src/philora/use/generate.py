"""Generate with a fine-tuned model: ``philora generate`` (one prompt or a JSONL file) and
``philora chat`` (interactive, keeps the conversation).

A source is what ``loading.load_source`` takes: a run or PEFT adapter directory (base +
adapter, unmerged), a merged or plain model directory, or a model name (``tiny``). Prompts go
through the tokenizer's chat template, exactly as in training, and generation stops on the
model's end-of-turn tokens (``families.stop_token_ids``: the generation config's eos ids, the
tokenizer's eos, Phi-3's ``<|end|>``), which are never part of the reply. Decoding is
transformers' ``generate``; streaming is its ``TextStreamer``. Hand-written glue only: prompt
files and the chat loop.
"""

import json
import sys
from typing import List, Optional, Sequence

from ..core.errors import PhiloraError
from ..data.formats import ROLES, tools_json
from ..data.records import json_lines, parse_json
from ..model.decoding import chat_ids, generate_ids, generate_reply
from ..model.loading import load_source


# -----------------------------------------------------------------------------
# the commands

def _check_messages(messages, where: str) -> List[dict]:
    if not isinstance(messages, list) or not messages:
        raise PhiloraError(f"{where}: 'messages' must be a non-empty list")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise PhiloraError(f"{where}: each message needs a role ({'/'.join(ROLES)}) and a string content")
    out = [{"role": m["role"], "content": m["content"]} for m in messages]
    for i, (m, o) in enumerate(zip(messages, out), 1):
        if m.get("tools") is not None:  # tool definitions on the system message, as in training
            o["tools"] = tools_json(m["tools"], m["role"], f"message {i}", where)
    return out


def read_prompts(path: str) -> List[dict]:
    """Records of a JSONL prompts file: {"prompt": str} or {"messages": [...]}. A conversation
    ending with an assistant turn is a held-out example: that turn becomes the reference."""
    try:
        lines = list(json_lines(path))  # read as training data is: lines named from 1, a BOM dropped
    except (FileNotFoundError, IsADirectoryError):
        raise PhiloraError(f"{path}: no such file") from None
    records = []
    for n, line in lines:
        where = f"{path}:{n}"
        rec = parse_json(line, where)
        if isinstance(rec, dict) and isinstance(rec.get("prompt"), str):
            records.append({"prompt": rec["prompt"], "messages": [{"role": "user", "content": rec["prompt"]}]})
        elif isinstance(rec, dict) and "messages" in rec:
            messages = _check_messages(rec["messages"], where)
            out = {"messages": messages}
            if messages[-1]["role"] == "assistant":
                out["messages"], out["reference"] = messages[:-1], messages[-1]["content"]
            if not out["messages"]:
                raise PhiloraError(f"{where}: nothing to reply to before the assistant turn")
            records.append(out)
        else:
            raise PhiloraError(f'{where}: expected {{"prompt": "..."}} or {{"messages": [...]}}')
    if not records:
        raise PhiloraError(f"{path}: no prompts")
    return records


def _with_system(messages: List[dict], system: Optional[str]) -> List[dict]:
    if system and messages[0]["role"] != "system":
        return [{"role": "system", "content": system}] + messages
    return messages


def generate_cli(source, prompt=None, prompts=None, out=None, stream=True, system=None,
                 temperature=0.7, top_p=0.9, max_new_tokens=256, seed=0, base=None) -> int:
    """``philora generate``: a reply to ``prompt`` on stdout, or JSONL replies for ``prompts``."""
    if (prompt is None) == (prompts is None):
        raise PhiloraError("give either --prompt TEXT or --prompts FILE.jsonl")
    if out is not None and prompts is None:
        raise PhiloraError("--out is for --prompts (one prompt's reply goes to stdout)")
    records = read_prompts(prompts) if prompts else None  # bad files fail before the model loads
    model, tokenizer, _ = load_source(source, base)
    sampling = dict(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
    if prompt is not None:
        messages = _with_system([{"role": "user", "content": prompt}], system)
        reply = generate_reply(model, tokenizer, messages, stream=stream, **sampling)
        if not stream:
            print(reply)
        return 0
    sink = open(out, "w", encoding="utf-8") if out else sys.stdout
    try:
        for rec in records:
            reply = generate_reply(model, tokenizer, _with_system(rec["messages"], system), **sampling)
            row = {"prompt": rec["prompt"]} if "prompt" in rec else {"messages": rec["messages"]}
            row.update({k: rec[k] for k in ("reference",) if k in rec}, response=reply)
            sink.write(json.dumps(row, ensure_ascii=False) + "\n")
            sink.flush()
    finally:
        if out:
            sink.close()
    return 0


def chat(source, system=None, temperature=0.7, top_p=0.9, max_new_tokens=256, seed=0,
         base=None) -> int:
    """``philora chat``: read user turns from stdin until EOF or /exit; /reset clears the history."""
    model, tokenizer, _ = load_source(source, base)
    interactive = sys.stdin.isatty()
    print(f"chatting with {source}: /reset clears the conversation, /exit (or Ctrl-D) quits",
          file=sys.stderr)
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    turn = 0
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:  # EOF
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            history = list(start)
            print("(conversation cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        reply = generate_reply(model, tokenizer, history, temperature, top_p, max_new_tokens,
                               seed + turn, stream=True)
        history.append({"role": "assistant", "content": reply})
        turn += 1
    return 0
