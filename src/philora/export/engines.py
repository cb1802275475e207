"""Greedy decoding of token prompts in each serving engine, for ``philora verify`` (verify.py).

Each engine returns, per prompt, ``{"tokens": [...], "stopped": bool}`` in one shape: the
generated ids with the token it stopped on included (so a reply that runs past the end of turn
shows as a longer list), and, where the engine renders prompts itself, ``"prompt"``: the ids its
own chat template and tokenizer make of the messages. Tokens go in (the reference's prompt ids),
so a difference in the replies is the model's, and the prompt check says whether the engine would
have built the same prompt from the conversation.

* transformers (the reference, the base, peft, a merged model): a plain greedy loop with the KV
  cache, keeping each step's top-1 minus top-2 logit (the margin a rounding must overcome to flip
  the token), stopping on the ids it is given.
* llama.cpp (llama-cpp-python): the file as llama.cpp reads it: its own end-of-generation tokens
  (``llama_vocab_is_eog``, from the file's metadata), its tokenizer, and its chat template through
  llama-cpp-python's own Jinja2 formatter given the conversation as an OpenAI client sends it
  (toolparser.openai_messages, the request's ``tools=``), as vLLM's check below: llama-server drops a
  message's ``tools`` too.
* vLLM: another python (vLLM pins its own torch and transformers) runs ``VLLM_SCRIPT`` on a JSON
  request on stdin and prints one JSON line; vLLM stops as it would when serving (the model's
  generation config and tokenizer eos). Its prompt check is the server's: each conversation as an
  OpenAI client sends it to ``vllm serve`` (toolparser.openai_messages: messages without a ``tools`` key, the tools
  as the request's ``tools``) goes through the server's own ``OnlineRenderer.render_chat`` (vLLM's
  request model, its tools normalization, ``--chat-template``, the tokenizer). With a ``tool_parser`` (a ``--tool-call-parser``: vLLM's own,
  or toolparser.py's plugin file, imported first as ``--tool-parser-plugin`` does) each reply's text
  goes through it as vLLM's server hands it over (detokenized without the stop token, special tokens
  skipped unless the parser's ``adjust_request`` keeps them), and its calls come back. A vLLM without the
  server's renderer says so (the prompts "not checked"); the child runs in its own process group, killed
  whole on a timeout or Ctrl-C.

Tool calls elsewhere: transformers has no tool-call parser, and llama-cpp-python's chat handlers
parse none (a Jinja2 template's handler returns the reply as content; only a ``tool_choice`` naming
one function constrains the arguments with a grammar), so verify reads those engines' calls with
philora's parser of the model's format (use/toolcalls.py) and says so. Phi-4-mini's own template reads
``tools`` only from the system message, so a client's tools never reach its prompt and the check fails
("another prompt", at the tools block); ``philora export gguf`` writes such a template behind
toolparser.py's preamble, which puts them there as trained.

Hand-written: no library compares engines token by token.
"""

import contextlib
import json
import os
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from ..core.errors import PhiloraError, first_line
from .toolparser import PLUGIN_NOTE, openai_messages, openai_tools


class NotInstalled(PhiloraError):
    """The engine is not installed here: verify skips it with one line."""


@torch.no_grad()
def hf_greedy(model, ids: Sequence[int], stops: Sequence[int], max_new_tokens: int) -> dict:
    """Greedy reply of a transformers model to ``ids`` (batch of one, no padding), with the
    top-1 minus top-2 logit margin at each step."""
    device = next(model.parameters()).device
    out: List[int] = []
    margins: List[float] = []
    past, step = None, torch.tensor([list(ids)], device=device)
    for _ in range(max_new_tokens):
        res = model(input_ids=step, past_key_values=past, use_cache=True, logits_to_keep=1)
        past = res.past_key_values
        top = res.logits[0, -1].float().topk(2)
        out.append(int(top.indices[0]))
        margins.append(float(top.values[0] - top.values[1]))
        if out[-1] in stops:
            break
        step = torch.tensor([[out[-1]]], device=device)
    return {"tokens": out, "stopped": bool(out) and out[-1] in stops, "margins": margins}


# -----------------------------------------------------------------------------
# llama.cpp

def llama_cpp_module():
    """llama_cpp, or PhiloraError saying it is not installed (the engine is then skipped)."""
    try:
        import llama_cpp
    except ImportError:
        raise NotInstalled("llama-cpp-python is not installed (pip install llama-cpp-python)") from None
    return llama_cpp


def _llama_prompt(llama_cpp, llm, vocab, messages: List[dict]) -> Optional[List[int]]:
    """The ids llama-cpp-python's chat handler makes (as ``create_chat_completion`` does) from the file's
    own chat template of ``messages`` sent as an OpenAI request: toolparser.openai_messages (no ``tools``
    on a message, calls as ``tool_calls``), the tools as ``tools=`` (openai_tools); None when the file
    has no template."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return None
    text = lambda i: llama_cpp.llama_vocab_get_text(vocab, i).decode("utf-8", errors="replace")  # noqa: E731
    eos, bos = llama_cpp.llama_vocab_eos(vocab), llama_cpp.llama_vocab_bos(vocab)
    formatter = Jinja2ChatFormatter(template=template, eos_token=text(eos) if eos >= 0 else "",
                                    bos_token=text(bos) if bos >= 0 else "", add_generation_prompt=True)
    tools, chat = openai_tools(messages), openai_messages(messages)
    try:
        rendered = formatter(messages=chat, tools=tools) if tools else formatter(messages=chat)
    except Exception as e:  # noqa: BLE001 (a template llama.cpp's Jinja cannot run is a finding, not a crash)
        raise PhiloraError(f"the file's chat template fails in llama-cpp-python: {first_line(e)}") from None
    return llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True)


def llama_cpp_greedy(path: Path, prompts: List[dict], max_new_tokens: int, n_ctx: int,
                     threads: int) -> List[dict]:
    """Greedy replies of the GGUF file ``path`` in llama.cpp to each prompt (``{"ids", "messages"}``),
    stopping on the tokens llama.cpp reads as end of generation."""
    import numpy as np
    llama_cpp = llama_cpp_module()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    vocab, n_vocab = llama_cpp.llama_model_get_vocab(llm.model), llm.n_vocab()
    results = []
    for p in prompts:
        try:
            own = _llama_prompt(llama_cpp, llm, vocab, p["messages"])
        except PhiloraError as e:
            own = str(e)
        llm.reset()
        llm.eval(p["ids"])
        out: List[int] = []
        for _ in range(max_new_tokens):  # the last position's logits (llm.scores holds them only with logits_all)
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
            out.append(int(np.argmax(logits)))
            if llama_cpp.llama_vocab_is_eog(vocab, out[-1]):
                break
            llm.eval(out[-1:])
        stopped = bool(out) and bool(llama_cpp.llama_vocab_is_eog(vocab, out[-1]))
        results.append({"tokens": out, "stopped": stopped, "prompt": own})
    llm.close()
    return results


# -----------------------------------------------------------------------------
# vLLM, in its own python

VLLM_SCRIPT = r'''
import json, sys


def tool_parser(req, tokenizer):
    # (parser or None, its load error, skip_special_tokens, the chat request) as vLLM's server has them:
    # a --tool-parser-plugin file imported first, the request with the run's tools adjusted by the parser
    # (none without tools: the server then neither adjusts nor parses, and skips special tokens)
    if not req.get("tool_parser"):
        return None, None, True, None
    try:
        from vllm.tool_parsers import ToolParserManager
    except ImportError:
        from vllm.entrypoints.openai.tool_parsers import ToolParserManager
    try:
        if req.get("tool_parser_plugin"):
            ToolParserManager.import_tool_parser(req["tool_parser_plugin"])
        parser = ToolParserManager.get_tool_parser(req["tool_parser"])(tokenizer)
    except Exception as e:
        return None, "%s: %s" % (type(e).__name__, e), True, None
    if not req.get("tools"):
        return parser, None, True, None
    import importlib
    for mod in ("vllm.entrypoints.openai.chat_completion.protocol", "vllm.entrypoints.openai.protocol"):
        try:
            protocol = importlib.import_module(mod)
        except ImportError:
            continue
        try:
            chat_request = protocol.ChatCompletionRequest(
                model=req["model"], messages=[{"role": "user", "content": "hi"}], tools=req["tools"], tool_choice="auto")
            return parser, None, bool(parser.adjust_request(chat_request).skip_special_tokens), chat_request
        except Exception as e:  # invalid tools, a failing adjust_request: the server would fail too
            return parser, "the chat request with the run's tools: %s: %s" % (type(e).__name__, e), True, None
    return parser, "this vLLM has no ChatCompletionRequest to adjust", True, None


def server_prompts(req, llm):
    # the ids vllm serve's /v1/chat/completions makes of each conversation: an OpenAI request (pydantic, as
    # the server parses the body) through the server's own OnlineRenderer (its tools normalization, the
    # --chat-template, the tokenizer); None where not asked or where this vLLM has no OnlineRenderer (then
    # with the line saying so)
    chats = req.get("chats")
    if not chats:
        return [None] * len(req["prompts"]), None
    import asyncio
    import vllm
    try:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.renderers.chat_utils import load_chat_template
        from vllm.renderers.online_renderer import OnlineRenderer
    except ImportError:
        return [None] * len(chats), "vLLM %s has no OnlineRenderer (vllm serve's chat rendering)" % vllm.__version__
    try:
        online = OnlineRenderer(model_config=llm.model_config, renderer=llm.renderer, request_logger=None,
                                chat_template=load_chat_template(req.get("chat_template")),
                                chat_template_content_format="auto", enable_auto_tools=bool(req.get("tool_parser")),
                                tool_parser=req.get("tool_parser"))
    except Exception as e:
        return ["vLLM's chat renderer does not start: %s: %s" % (type(e).__name__, e)] * len(chats), None

    async def one(chat):
        try:
            # the tools always go in, as the reference renders them; without a parser (no call format philora
            # knows) tool_choice "none": the template still gets them, and no --enable-auto-tool-choice is needed
            extra = {"tool_choice": "auto" if req.get("tool_parser") else "none"} if chat["tools"] else {}
            request = ChatCompletionRequest(model=req["model"], messages=chat["messages"], tools=chat["tools"], **extra)
            got = await online.render_chat(request)
        except Exception as e:
            return "vLLM's server fails to render the chat request: %s: %s" % (type(e).__name__, e)
        if not isinstance(got, tuple):  # an ErrorResponse, as the client would get it
            return "vLLM's server answers the chat request with an error: %s" % getattr(getattr(got, "error", None), "message", got)
        return [int(t) for t in got[1][0]["prompt_token_ids"]]

    async def every():
        return [await one(chat) for chat in chats]
    return asyncio.run(every()), None


def main():  # under __main__: vLLM starts its engine in spawned processes, which import this file
    req = json.load(sys.stdin)
    try:
        import vllm
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest
    except ImportError as e:
        print(json.dumps({"not_installed": "vllm is not importable: %s" % e}))
        sys.exit(3)
    kw = dict(model=req["model"], tokenizer=req["tokenizer"], max_model_len=req["max_model_len"],
              dtype=req["dtype"], enforce_eager=True, seed=0,
              kv_cache_memory_bytes=req["kv_cache_bytes"])  # on CPU it would reserve 92% of RAM otherwise
    if req["lora"]:
        kw.update(enable_lora=True, max_lora_rank=req["max_lora_rank"])
    llm = LLM(**kw)
    parser, parser_error, skip, chat_request = tool_parser(req, llm.get_tokenizer())
    if parser_error:  # no replies: a server with this parser would not start or would fail every tool request
        print(json.dumps({"vllm": vllm.__version__, "tool_parser_error": parser_error}))
        sys.exit(4)
    prompts, unchecked = server_prompts(req, llm)
    lora = LoRARequest("run", 1, req["lora"]) if req["lora"] else None
    # the reply's text detokenized as the server does it for the parser (the stop token left out)
    params = SamplingParams(temperature=0.0, max_tokens=req["max_tokens"], skip_special_tokens=skip)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in req["prompts"]], params, lora_request=lora)
    def calls(text):
        if parser is None:
            return None
        try:
            got = parser.extract_tool_calls(text, chat_request)
        except Exception as e:
            return {"error": "%s: %s" % (type(e).__name__, e), "text": text}
        return {"text": text, "calls": [{"name": t.function.name, "arguments": t.function.arguments}
                                        for t in (got.tool_calls if got.tools_called else [])]}
    print(json.dumps({"vllm": vllm.__version__, "prompt_unchecked": unchecked, "skip_special_tokens": skip, "outputs": [
        {"token_ids": list(o.outputs[0].token_ids), "finish_reason": o.outputs[0].finish_reason,
         "stop_reason": o.outputs[0].stop_reason, "tool_calls": calls(o.outputs[0].text), "prompt": own} for o, own in zip(outs, prompts)]}))


if __name__ == "__main__":
    main()
'''


def vllm_request(model: str, tokenizer: str, lora: Optional[str], max_lora_rank: int, prompts: List[List[int]],
                 max_tokens: int, max_model_len: int, kv_token_bytes: int, dtype: str = "float32",
                 tool_parser: Optional[str] = None, tools: Optional[list] = None,
                 tool_parser_plugin: Optional[str] = None, chats: Optional[List[dict]] = None,
                 chat_template: Optional[str] = None) -> dict:
    """The JSON ``VLLM_SCRIPT`` reads on stdin (the contract a fake vLLM python imitates in the tests);
    ``kv_token_bytes``: the KV cache one token takes (vLLM's CPU backend otherwise reserves 92% of the
    machine's memory, and refuses to start when less is free): room for every prompt at full length,
    twice over for vLLM's block rounding; ``tool_parser``: vLLM's --tool-call-parser to read each
    reply's tool calls with (OpenAI-style ``tools`` go in the request it adjusts), loaded from the
    ``--tool-parser-plugin`` file ``tool_parser_plugin`` when given (toolparser.py's); ``chats``: per prompt,
    the OpenAI request's ``{"messages", "tools"}`` (toolparser.py) whose rendering by vLLM's server (with the
    ``--chat-template`` file ``chat_template``, else the tokenizer's) comes back as each output's "prompt"."""
    kv_cache_bytes = max(64 << 20, 2 * kv_token_bytes * max_model_len * len(prompts))
    return {"model": model, "tokenizer": tokenizer, "lora": lora, "max_lora_rank": max_lora_rank,
            "prompts": prompts, "max_tokens": max_tokens, "max_model_len": max_model_len, "dtype": dtype,
            "kv_cache_bytes": kv_cache_bytes, "tool_parser": tool_parser, "tools": tools,
            "tool_parser_plugin": tool_parser_plugin, "chats": chats, "chat_template": chat_template}


def _vllm_env() -> dict:
    """The vLLM child's environment. VLLM_ENABLE_V1_MULTIPROCESSING=0 (unless the user set it) runs the engine
    core in the child itself instead of a second process: one generate call needs no IPC, and vLLM starts in
    about half the time (20 s vs 38 s on the tiny model, the same tokens), with nothing left to outlive it."""
    env = dict(os.environ)
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    return env


def _run_vllm(python: str, script: str, request: dict, timeout: float) -> Tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``python script`` fed ``request``, in its own process group: on a timeout
    or Ctrl-C the whole group is killed (vLLM's EngineCore, when it runs apart, is a daemon process that
    survives its parent's SIGKILL and keeps its memory)."""
    proc = subprocess.Popen([python, script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env=_vllm_env())
    try:
        out, err = proc.communicate(json.dumps(request), timeout=timeout)
    except (subprocess.TimeoutExpired, KeyboardInterrupt) as e:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if isinstance(e, KeyboardInterrupt):
            raise
        raise PhiloraError(f"--vllm-python {python}: vLLM did not finish in {timeout:.0f} s (its processes killed)") from None
    return proc.returncode, out, err


def vllm_greedy(python: str, request: dict, timeout: float = 1800, say: Optional[Callable] = None) -> List[dict]:
    """Greedy replies from vLLM run by ``python``. Not installed (no such python, no vllm in it):
    PhiloraError; vLLM's own failure, a tool parser that does not load: PhiloraError with its last line.
    A vLLM that cannot render the prompts as its server does: ``say`` says so, and each reply carries
    ``prompt_unchecked``."""
    if not Path(python).is_file():
        raise NotInstalled(f"--vllm-python {python}: no such file")
    with tempfile.NamedTemporaryFile("w", suffix="_philora_vllm.py", delete=False) as f:
        f.write(VLLM_SCRIPT)
    try:
        code, stdout, stderr = _run_vllm(python, f.name, request, timeout)
    except OSError as e:
        raise PhiloraError(f"--vllm-python {python}: {first_line(e)}") from None
    finally:
        Path(f.name).unlink(missing_ok=True)
    last = next((x for x in reversed(stdout.splitlines()) if x.startswith("{")), None)
    reply = json.loads(last) if last else {}
    if "not_installed" in reply:
        raise NotInstalled(f"{reply['not_installed']} (in {python})")
    parser, plugin = request.get("tool_parser"), request.get("tool_parser_plugin")
    if parser and reply.get("tool_parser_error"):
        raise PhiloraError(f"vLLM's tool parser {parser!r}{f' (plugin {plugin})' if plugin else ''} does not load: "
                           f"{reply['tool_parser_error'][:300]}")
    if code != 0 or "outputs" not in reply:
        tail = [x for x in (stderr or stdout).splitlines() if x.strip()]
        raise PhiloraError(f"vLLM failed (exit {code}): {(tail or ['no output'])[-1][:300]}")
    unchecked = reply.get("prompt_unchecked")
    if unchecked and say is not None:
        say(f"verify: vllm: {unchecked}: the prompts are not checked against vllm serve's rendering (tokens in)")
    label = f"vLLM {parser}" + (f" ({PLUGIN_NOTE})" if plugin else "")
    replies = [_vllm_reply(o, parser and label) for o in reply["outputs"]]
    for r in replies if unchecked else []:
        r["prompt_unchecked"] = f"not checked (vLLM {reply.get('vllm')})"
    return replies


def _vllm_reply(o: dict, parser: Optional[str]) -> dict:
    """vLLM's output as the common shape: it keeps an eos token in token_ids, but a stop_token_ids
    hit only as stop_reason, so that one is put back; its tool parser's calls (``parser``: how the
    reply names it) with their arguments decoded (vLLM hands them on as JSON text)."""
    tokens = [int(t) for t in o["token_ids"]]
    stopped = o.get("finish_reason") == "stop"
    if stopped and isinstance(o.get("stop_reason"), int) and (not tokens or tokens[-1] != o["stop_reason"]):
        tokens.append(int(o["stop_reason"]))
    out = {"tokens": tokens, "stopped": stopped, "prompt": o.get("prompt")}
    got = o.get("tool_calls")
    if parser and got is not None:
        out["tool_parser"] = parser
        out["tool_calls"] = [{"invalid": got["error"]}] if "error" in got else [
            _call(c) for c in got["calls"]]
    return out


def _call(c: dict) -> dict:
    """One call the parser read, its arguments decoded; one whose arguments are not JSON is kept as
    ``{"invalid": text}`` (use/toolcalls' way): that prompt's calls differ, the engine goes on."""
    try:
        return {"name": c["name"], "arguments": json.loads(c["arguments"])}
    except (TypeError, ValueError):
        return {"invalid": f"{c['name']}({c['arguments']})"}
