"""``philora verify``: the tuned model gives the same greedy replies wherever it is served.

A run's held-out prompts (the eval split, as ``philora eval``'s report takes them, or a file) are
decoded greedily by the reference, philora's own base + adapter in transformers, and by each
engine a user serves with: the adapter through ``peft`` itself, the merged model (``philora
merge``), each GGUF export (``philora export gguf``) in llama.cpp, vLLM in its own python, and any
exported file or model directory given. Token ids are compared with the reference's; per engine:
prompts with identical tokens, the first divergence and the reference's top-1 minus top-2 logit
there (below the engine's threshold a rounding may flip the token: a near-tie, not a failure),
replies that end on the chat template's end-of-turn token, whether the engine's own template and
tokenizer build the same prompt (vLLM: as ``vllm serve`` renders the conversation sent as an OpenAI
request, tools as the request's ``tools``; for a template that reads tools only from the system message,
Phi-4-mini's, with the ``--chat-template`` file ``philora export tool-parser`` writes), and the time taken. Real disagreements fail (exit 1): a
divergence above the threshold, a reply that runs past the reference's stop (a stop token lost in
export) or stops early, a prompt the engine renders differently, an engine whose replies are the
base model's (it ignores the adapter), an engine that fails. An engine that is not installed is
one line and skipped. The table goes to ``verify.md`` (beside the run's report.md), with
``verify.json``. Hand-written: no tool compares serving engines token by token against training.
"""

import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

from ..core.diskio import write_text
from ..core.errors import PhiloraError, first_line
from ..data.build import build_datasets
from ..data.encoding import TEMPLATE_KEYS
from ..data.formats import conversation, to_messages
from ..data.records import load_records
from ..model.adapter import read_adapter
from ..model.decoding import chat_ids
from ..model.families import end_of_turn_ids, head_dim, kv_heads, stop_token_ids, tool_call_format
from ..model.loading import load_model_and_tokenizer, load_source, load_tokenizer, resolve_source
from ..model.prepare import model_config
from ..run.evalgen import held_out
from ..use.merge import merge
from ..use.report import last_user_turn, lora_disabled
from ..use.toolcalls import parse_tool_calls
from .adapter_check import adapter_rank, vllm_max_lora_rank
from .engines import NotInstalled, hf_greedy, llama_cpp_greedy, llama_cpp_module, vllm_greedy, vllm_request
from .agreement import compare_calls, compare_engine, markdown
from .gguf import export_gguf
from .toolparser import (PLUGIN_FILE, TEMPLATE_FILE, openai_messages, openai_tools, tools_shape, vllm_chat_template,
                         vllm_parser, write_plugin)

ENGINES = ("peft", "merged", "gguf-f32", "gguf-q8_0")  # the default; "vllm" joins with --vllm-python
# The reference's top-1 minus top-2 logit below which another engine may flip a token by rounding:
# q8_0 moves logits by up to ~0.2-0.6 on small models, 4/5/6-bit k-quants by ~1-2 (llama.cpp tests)
MARGINS = {"gguf-q8_0": 1.0, "gguf-q4_k_m": 3.0, "gguf-q5_k_m": 3.0, "gguf-q6_k": 2.0, "gguf-q4_0": 3.0}
DEFAULT_MARGIN = 0.5
SAMPLES = 8
MAX_NEW_TOKENS = 128


# -----------------------------------------------------------------------------
# prompts

def _file_prompts(path: str) -> List[tuple]:
    """(where, messages) from a prompts file (any training format), validated as training data is (a
    bad record: DataError, one line): a conversation that ends on another turn than the assistant's (a
    user's) is the prompt whole, else the conversation up to its last assistant turn."""
    out = []
    for where, record in load_records(path):
        msgs = conversation(record, "auto", where)
        if not msgs or msgs[-1]["role"] == "assistant":
            msgs = held_out(to_messages(record, "auto", where))[0]
        out.append((where, [{k: m[k] for k in TEMPLATE_KEYS if k in m} for m in msgs]))
    return out


def held_out_prompts(src, tokenizer, prompts: Union[int, str, None]) -> List[tuple]:
    """(where, messages) of the prompts to verify: the first N of the run's eval split, as the report
    takes them (data.build_datasets from the run's config.yaml), or those of a file."""
    if isinstance(prompts, str) and not prompts.isdigit():
        if not Path(prompts).is_file():
            raise PhiloraError(f"--prompts {prompts}: no such file (give a number or a JSONL/JSON file)")
        return _file_prompts(prompts)
    n = SAMPLES if prompts is None else int(prompts)
    cfg = src.run_cfg
    if cfg is None:
        raise PhiloraError(f"{src.adapter_dir}: no config.yaml (not a philora run), so no eval split: "
                           f"pass --prompts FILE")
    quiet = lambda *a, **k: None  # noqa: E731 (training already logged the data counts)
    _, examples, _ = build_datasets(cfg.data, tokenizer, cfg.training_config.seed, log=quiet)
    return [(f"eval #{i + 1}", held_out(examples[i]["messages"])[0]) for i in range(min(n, len(examples)))]


def fit_context(prompts: List[dict], context: int, max_new_tokens: int, say: Callable) -> List[dict]:
    """The prompts whose tokens and reply fit the model's context; one line for each that does not."""
    kept = []
    for p in prompts:
        if len(p["ids"]) + max_new_tokens > context:
            say(f"verify: prompt {p['n']} ({p['where']}): {len(p['ids'])} tokens + {max_new_tokens} new exceed "
                f"the model's context of {context} tokens; skipped")
        else:
            kept.append(p)
    return kept


# -----------------------------------------------------------------------------
# engines: each returns one {"tokens", "stopped"[, "prompt"]} per prompt

def _reference(run: str, prompts_arg, max_new_tokens: int, say: Callable):
    """philora's own base + adapter (the reference, with margins) and the base (adapter off)."""
    model, tokenizer, src = load_source(run)
    pairs = held_out_prompts(src, tokenizer, prompts_arg)
    if not pairs:
        raise PhiloraError(f"{prompts_arg or run}: no prompts to verify")
    prompts = [{"n": i, "where": w, "messages": m, "ids": chat_ids(tokenizer, m)} for i, (w, m) in enumerate(pairs, 1)]
    context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
    prompts = fit_context(prompts, context, max_new_tokens, say)
    if not prompts:
        raise PhiloraError("no prompt fits the model's context; nothing to verify")
    stops = stop_token_ids(model, tokenizer)
    t0 = time.perf_counter()
    ref = [hf_greedy(model, p["ids"], stops, max_new_tokens) for p in prompts]
    seconds = time.perf_counter() - t0
    with lora_disabled(model):
        base = [hf_greedy(model, p["ids"], stops, max_new_tokens) for p in prompts]
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    return src, tokenizer, prompts, stops, ref, base, seconds, dtype, context


def _peft(src, prompts, stops, max_new_tokens):
    """The adapter through peft's own LoRA layers on the base as philora loads it."""
    from peft import PeftModel
    base, _, _ = load_model_and_tokenizer(src.model_cfg, training=False)
    model = PeftModel.from_pretrained(base, str(src.adapter_dir)).eval()
    return [hf_greedy(model, p["ids"], stops, max_new_tokens) for p in prompts]


def _hf_model_dir(path: Path, prompts, max_new_tokens):
    """A model directory as transformers serves it: its own generation config's eos ids and its own
    tokenizer's chat template (checked against the reference's prompt ids)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype="auto").eval()
    tok = load_tokenizer(str(path))
    eos = model.generation_config.eos_token_id
    stops = sorted({int(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos]) if i is not None})
    out = []
    for p in prompts:
        out.append({**hf_greedy(model, p["ids"], stops, max_new_tokens), "prompt": chat_ids(tok, p["messages"])})
    return out


def _merged(run, base, prompts, max_new_tokens, tmp):
    return _hf_model_dir(merge(run, Path(tmp) / "merged", base=base), prompts, max_new_tokens)


def _gguf(path: Path, prompts, max_new_tokens, context):
    import torch
    n_ctx = min(context, max(len(p["ids"]) for p in prompts) + max_new_tokens + 8)
    return llama_cpp_greedy(path, prompts, max_new_tokens, n_ctx, torch.get_num_threads())


def _tools_shape(prompts) -> str:
    """The shape the prompts' tools are given in (toolparser.tools_shape of the first with tools): what
    the templates behind toolparser's preamble (the GGUF's, vLLM's --chat-template) must write."""
    return tools_shape(next((p["messages"] for p in prompts if any(m.get("tools") for m in p["messages"])), []))


def _export(run, base, outtype, prompts, max_new_tokens, context, tmp):
    llama_cpp_module()  # not installed: skipped before the export's minutes
    path = export_gguf(run, Path(tmp) / f"gguf-{outtype}" / f"model-{outtype}.gguf", outtype=outtype, base=base,
                       tools_shape=_tools_shape(prompts))
    return _gguf(path, prompts, max_new_tokens, context)


def _vllm_template(tok, prompts, chat_template: Optional[str], tmp) -> Tuple[Optional[str], Optional[str]]:
    """(the ``--chat-template`` file vLLM serves with, a line saying why): ``chat_template`` when given; for
    a template that reads tools only from the system message (Phi-4-mini's), the one ``philora export
    tool-parser`` writes, in the shape of the prompts' tools; else None (the tokenizer's own)."""
    if chat_template:  # _engine_plan checked that it is a file
        return chat_template, None
    shape = _tools_shape(prompts)
    text = vllm_chat_template(tok.chat_template, shape)
    if text is None:
        return None, None
    path = write_text(Path(tmp) / TEMPLATE_FILE, text)
    return str(path), (f"vllm: the chat template philora export tool-parser writes (the request's tools onto "
                       f"the system message, {shape} shape), as --chat-template")


def _vllm(python, ref, tool_parser, chat_template, tmp):
    """vLLM serving the adapter; a tool-calling run's calls read by ``tool_parser`` (default: the parser
    that reads the format, toolparser.py's plugin where vLLM has none); each prompt also rendered as
    ``vllm serve`` renders an OpenAI request of the conversation (with ``_vllm_template``'s template)."""
    src, prompts, max_new_tokens, dtype, fmt = (ref[k] for k in ("src", "prompts", "max_new_tokens", "dtype", "fmt"))
    max_lora_rank = vllm_max_lora_rank(adapter_rank(read_adapter(src.adapter_dir)))
    base = src.model_cfg.name_or_path  # load_source resolved it (a GGUF base: the converted directory)
    c = model_config(base, src.model_cfg)  # K and V per layer, per token
    kv_token_bytes = 2 * c.num_hidden_layers * kv_heads(c) * head_dim(c) * (4 if dtype == "float32" else 2) if c else 0
    parser, plugin = vllm_parser(fmt, tool_parser)
    template, note = _vllm_template(ref["tok"], prompts, chat_template, tmp)
    if note:
        ref["say"](f"verify: {note}")
    # the tools always go in (as the reference renders them); without a parser, with tool_choice "none"
    chats = [{"messages": openai_messages(p["messages"]), "tools": openai_tools(p["messages"])} for p in prompts]
    request = vllm_request(base, str(src.tokenizer_path or base), str(src.adapter_dir),
                           max_lora_rank, [p["ids"] for p in prompts],
                           max_new_tokens, max(len(p["ids"]) for p in prompts) + max_new_tokens, kv_token_bytes,
                           dtype, parser, next((c["tools"] for c in chats if c["tools"]), None),
                           str(write_plugin(Path(tmp) / PLUGIN_FILE)) if plugin else None, chats, template)
    return vllm_greedy(python, request, say=ref["say"])


def _engine_plan(run, engines, models, vllm_python, vllm_tool_parser=None, vllm_chat_template=None):
    """[(name, run(ref, tmp))] in the order given, checked before any model loads; ``ref`` holds the
    reference's src, prompts, stops, max_new_tokens, dtype and context; tmp is a temporary directory."""
    names = list(engines) if engines is not None else list(ENGINES) + (["vllm"] if vllm_python else [])
    plan = []
    for name in names:
        if name == "peft":
            plan.append((name, lambda ref, tmp: _peft(ref["src"], ref["prompts"], ref["stops"], ref["max_new_tokens"])))
        elif name == "merged":
            plan.append((name, lambda ref, tmp: _merged(run, ref["src"].model_cfg.name_or_path, ref["prompts"], ref["max_new_tokens"], tmp)))
        elif name.startswith("gguf-") and len(name) > 5:
            plan.append((name, lambda ref, tmp, t=name[5:]: _export(
                run, ref["src"].model_cfg.name_or_path, t, ref["prompts"], ref["max_new_tokens"], ref["context"], tmp)))
        elif name == "vllm":
            if not vllm_python:
                raise PhiloraError("--engines vllm needs --vllm-python PATH (a python with vllm installed)")
            if vllm_chat_template and not Path(vllm_chat_template).is_file():
                raise PhiloraError(f"--vllm-chat-template {vllm_chat_template}: no such file")
            plan.append((name, lambda ref, tmp: _vllm(vllm_python, ref, vllm_tool_parser, vllm_chat_template, tmp)))
        else:
            raise PhiloraError(f"--engines: unknown engine {name!r} (peft, merged, gguf-f32, gguf-f16, gguf-bf16, "
                               f"gguf-q8_0, gguf-q4_k_m, ..., vllm)")
    for m in models or []:
        path = Path(m)
        if path.suffix == ".gguf" and path.is_file():
            plan.append((f"gguf:{path.name}", lambda ref, tmp, p=path: _gguf(
                p, ref["prompts"], ref["max_new_tokens"], ref["context"])))
        elif (path / "config.json").is_file():
            plan.append((f"model:{path.name}", lambda ref, tmp, p=path: _hf_model_dir(
                p, ref["prompts"], ref["max_new_tokens"])))
        else:
            raise PhiloraError(f"--model {m}: not a .gguf file or a model directory (no config.json)")
    for flag, value in (("--vllm-tool-parser", vllm_tool_parser), ("--vllm-chat-template", vllm_chat_template)):
        if value and "vllm" not in names:
            raise PhiloraError(f"{flag} {value} is for the vllm engine (--vllm-python PATH, and vllm in --engines)")
    return plan


# -----------------------------------------------------------------------------
# verify

def _run_engine(name, thunk, ref: dict, say) -> dict:
    """One engine's replies, or why there are none (skipped: not installed; error: it failed)."""
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="philora-verify-") as tmp:
            replies = thunk(ref, tmp)
    except NotInstalled as e:
        say(f"verify: {name}: skipped: {e}")
        return {"engine": name, "status": "skipped", "reason": str(e)}
    except Exception as e:  # noqa: BLE001 (an engine that cannot serve the run is a finding; the others go on)
        reason = str(e) if isinstance(e, PhiloraError) else f"{type(e).__name__}: {first_line(e)}"
        say(f"verify: {name}: failed: {reason}")
        return {"engine": name, "status": "error", "reason": reason, "seconds": time.perf_counter() - t0}
    return {"engine": name, "replies": replies, "seconds": time.perf_counter() - t0}


# Where an engine's tool calls come from when it has no parser of its own
OWN_PARSER_NOTE = {"gguf": "llama-cpp-python's chat handler parses no tool calls",
                   "hf": "transformers parses no tool calls"}


def with_tool_calls(replies: List[dict], tok, fmt: Optional[str], engine: str) -> List[dict]:
    """Each reply with ``tool_calls`` (and the ``tool_parser`` that read them): the engine's own
    parser's where it gave them (vLLM), else philora's parser of the model's format, saying why."""
    kind = "gguf" if engine.startswith("gguf") else "hf"
    for r in replies:
        if "tool_calls" not in r:
            tokens = r["tokens"][:-1] if r["stopped"] else r["tokens"]
            r["tool_calls"] = parse_tool_calls(tok.decode(tokens, skip_special_tokens=False), fmt)
            r["tool_parser"] = f"philora {fmt}" + (f" ({OWN_PARSER_NOTE[kind]})" if engine != "reference" else "")
    return replies


def verify(run, engines: Optional[Sequence[str]] = None, prompts: Union[int, str, None] = None,
           out=None, margin: Optional[float] = None, max_new_tokens: int = MAX_NEW_TOKENS,
           models: Sequence[str] = (), vllm_python: Optional[str] = None, say: Callable = None,
           vllm_tool_parser: Optional[str] = None, vllm_chat_template: Optional[str] = None) -> dict:
    """Verify the run (or PEFT adapter directory) ``run`` in ``engines`` (default ``ENGINES``, plus
    vLLM with ``vllm_python``) and in the exported files / model directories ``models``, on the first
    ``prompts`` held-out prompts (or those of a file); vLLM reads a tool-calling run's calls with its
    ``vllm_tool_parser`` (default: toolparser.vllm_parser's) and renders its prompts with the
    ``vllm_chat_template`` file (default: ``_vllm_template``'s). Writes verify.md / verify.json to ``out`` (the
    run directory by default); returns the result, whose "exit_code" is 1 on a real disagreement."""
    say = say if say is not None else (lambda line: print(line, file=sys.stderr))
    run = str(run)
    if resolve_source(run).adapter_dir is None:
        raise PhiloraError(f"{run}: no adapter to verify (no adapter_config.json); verify takes a run or adapter directory")
    plan = _engine_plan(run, engines, models, vllm_python, vllm_tool_parser, vllm_chat_template)
    src, tok, plist, stops, ref, base, seconds, dtype, context = _reference(run, prompts, max_new_tokens, say)
    fmt = tool_call_format(tok)
    shared = dict(src=src, prompts=plist, stops=stops, max_new_tokens=max_new_tokens, dtype=dtype, context=context,
                  fmt=fmt, tok=tok, say=say)
    if fmt:
        with_tool_calls(ref, tok, fmt, "reference")
    eot = (end_of_turn_ids(tok) or [None])[0]
    decode = lambda ids: tok.decode(ids, skip_special_tokens=False)  # noqa: E731
    result = {"run": run, "max_new_tokens": max_new_tokens, "dtype": dtype, "tool_call_format": fmt,
              "end_of_turn": {"id": eot, "token": decode([eot]) if eot is not None else None},
              "prompts": [{"n": p["n"], "where": p["where"], "last_user_turn": last_user_turn(p["messages"]),
                           "prompt_tokens": len(p["ids"])} for p in plist],
              "reference": {"engine": "reference", "seconds": seconds, "replies": ref,
                            "stops_on_eot": sum(r["stopped"] and r["tokens"][-1] == eot for r in ref)},
              "adapter_changes": sum(r["tokens"] != b["tokens"] for r, b in zip(ref, base)), "engines": []}
    if not result["adapter_changes"]:
        say("verify: warning: the adapter changes none of the reference's greedy replies, so an engine "
            "that ignores it cannot be told apart")
    for name, thunk in plan:
        say(f"verify: {name} ...")
        res = _run_engine(name, thunk, shared, say)
        if "replies" in res:
            threshold = margin if margin is not None else MARGINS.get(name, DEFAULT_MARGIN)
            replies = with_tool_calls(res.pop("replies"), tok, fmt, name) if fmt else res.pop("replies")
            res.update(compare_engine(name, plist, ref, base, replies, eot, threshold, decode))
            unchecked = next((r["prompt_unchecked"] for r in replies if r.get("prompt_unchecked")), None)
            if unchecked:  # the engine could not render the prompts itself: the table says so
                res["prompt_unchecked"] = unchecked
            if fmt:
                res.update(compare_calls(name, plist, ref, replies, res))
            for line in res["failures"]:
                say(f"verify: FAIL {line}")
        result["engines"].append(res)
    result["base"] = compare_engine("base (adapter off)", plist, ref, base, base, eot, 0.0, decode)
    result["ok"] = all(e["status"] in ("ok", "skipped") for e in result["engines"])
    result["exit_code"] = 0 if result["ok"] else 1
    out_dir = Path(out) if out is not None else Path(run)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "verify.json", json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    write_text(out_dir / "verify.md", markdown(result))
    return result


# -----------------------------------------------------------------------------
# the command: ``philora verify`` is parsed here (cli.py hands it argv, as for bench), so
# ``philora --help`` does not import torch for it

def add_arguments(p) -> None:
    """``philora verify``'s options on the argparse parser ``p``."""
    p.add_argument("run", help="a philora run directory (or PEFT adapter directory)")
    p.add_argument("--engines", default=None,
                   help=f"comma-separated (default {','.join(ENGINES)}, plus vllm with --vllm-python); "
                        f"also gguf-f16, gguf-bf16, gguf-q4_k_m, ...")
    p.add_argument("--prompts", default=None,
                   help=f"N held-out prompts of the run's eval split (default {SAMPLES}), or a JSONL/JSON file")
    p.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    p.add_argument("--margin", type=float, default=None,
                   help=f"top-2 logit margin below which a divergence is a near-tie (default {DEFAULT_MARGIN}; "
                        f"q8_0 {MARGINS['gguf-q8_0']}, 4-bit 3.0)")
    p.add_argument("--model", action="append", default=[], metavar="PATH",
                   help="an exported .gguf file or a merged model directory to verify too (repeatable)")
    p.add_argument("--vllm-python", default=None, metavar="PATH", help="a python with vllm installed")
    p.add_argument("--vllm-tool-parser", default=None, metavar="NAME",
                   help="vLLM's --tool-call-parser to read a tool-calling run's calls with (default: the one that "
                        "reads the model's format; for Phi-4-mini philora's plugin, philora export tool-parser)")
    p.add_argument("--vllm-chat-template", default=None, metavar="FILE",
                   help="the template vllm serve --chat-template gets (default: the run's own; for one that reads tools "
                        "only from the system message, Phi-4-mini's, the one philora export tool-parser writes)")
    p.add_argument("--json", action="store_true", help="the result as one JSON object on stdout")
    p.add_argument("--out", default=None, help="directory for verify.md / verify.json (default: the run)")


def verify_cli(args) -> int:
    """``philora verify``: the table (or --json) on stdout; exit 1 on a real disagreement."""
    engines = [e.strip() for e in args.engines.split(",") if e.strip()] if args.engines else None
    say = lambda line: print(line, file=sys.stderr)  # noqa: E731
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        result = verify(args.run, engines, args.prompts, args.out, args.margin, args.max_new_tokens,
                        args.model, args.vllm_python, say, args.vllm_tool_parser, args.vllm_chat_template)
    print(json.dumps(result, ensure_ascii=False) if args.json else markdown(result))
    return result["exit_code"]


def main(argv: Sequence[str]) -> int:
    """``philora verify ARGS``: exit 0 when every engine that ran agrees, 1 on a real disagreement."""
    import argparse
    p = argparse.ArgumentParser(prog="philora verify", description="The run's held-out prompts, greedy, in each "
                                "serving engine: the same tokens as philora's base + adapter?")
    add_arguments(p)
    return verify_cli(p.parse_args(list(argv)))
