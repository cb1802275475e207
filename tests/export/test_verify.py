"""philora verify (export/verify.py, engines.py, agreement.py): a short run of the default config (the
tiny model on the sample data) verifies in peft, the merged model and GGUF f32 / q8_0 in llama.cpp;
deliberately broken serving copies fail naming the engine and the prompt (an adapter zeroed on the
way, a stop token lost from the generation config or the GGUF, a wrong chat template in the GGUF,
a vLLM that drops the LoRA); a missing engine is one line and the others run; bad input is one line.
A Phi-4-mini-shape tool-calling run verifies in llama.cpp with its tool calls compared, each prompt rendered
from the OpenAI request by the export's template (the model's own loses the tools: it fails); a vLLM whose
tool parser reads other calls fails; its eval report scores function calling. Real vLLM (where
.venv-vllm has it): the default run and the tool run give the reference's tokens, and vllm serve's own
rendering of each conversation sent as an OpenAI request is the trained prompt (for the tool run with the
chat template philora export tool-parser writes; with the model's own the tools are lost: it fails).

The reference's replies are checked against transformers' own ``generate`` (philora.model.decoding);
vLLM is imitated by a fake python that keeps the script's stdin/stdout contract and decodes with
transformers + peft (vLLM is not installed here).
"""

import argparse
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from philora.core.config import load_config
from philora.core.errors import PhiloraError
from philora.data.build import build_datasets
from philora.export.agreement import compare_reply
from philora.export.verify import add_arguments, verify, verify_cli
from philora.model.decoding import chat_ids, generate_ids
from philora.model.loading import load_source
from philora.run.evalgen import held_out
from philora.run.train import train
from philora.use.merge import merge

HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
N, NEW = 3, 24  # prompts, new tokens
RUN = ["training_config.max_steps=20", "training_config.learning_rate=5e-3", "training_config.warmup_steps=1",
       "training_config.eval_steps=0", "training_config.save_steps=0", "training_config.report_samples=0",
       "training_config.progress_bar=false", "training_config.logging_steps=10", "peft_config.lora_dropout=0.0",
       "data.max_length=256"]


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    """configs/tiny.yaml (the tiny model, the sample data) for 20 steps: replies end on <|end|>."""
    out = tmp_path_factory.mktemp("verify") / "tiny"
    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", f"training_config.output_dir={out}", *RUN])
    train(cfg, overwrite=True)
    return out


class Lines(list):
    def __call__(self, line):
        assert "\n" not in line
        self.append(line)


@pytest.fixture(scope="module")
def verified(tiny_run, tmp_path_factory):
    lines = Lines()
    out = tmp_path_factory.mktemp("verify-out")
    return verify(tiny_run, prompts=N, max_new_tokens=NEW, out=out, say=lines), out, lines


def _engine(result, name):
    return next(e for e in result["engines"] if e["engine"] == name)


def test_default_run_verifies(verified, tiny_run):
    """exit 0: peft and the merged model give the reference's tokens on every prompt, GGUF f32 and
    q8_0 too or within near-ties; the reference is transformers' generate, and not the base."""
    result, out, lines = verified
    assert result["exit_code"] == 0 and result["ok"], result
    names = [e["engine"] for e in result["engines"]]
    assert names == ["peft", "merged", "gguf-f32", "gguf-q8_0"]
    for name in ("peft", "merged"):
        e = _engine(result, name)
        assert e["status"] == "ok" and e["identical"] == N and not e["failures"], e
    assert _engine(result, "merged")["prompts_same"] == N  # the merged tokenizer builds the trained prompt
    for name in ("gguf-f32", "gguf-q8_0"):
        e = _engine(result, name)
        assert e["status"] == ("ok" if HAVE_LLAMA_CPP else "skipped"), e
        if HAVE_LLAMA_CPP:  # llama.cpp's own template + tokenizer build the prompt transformers does
            assert e["prompts_same"] == e["prompts_checked"] == N
            assert e["identical"] + e["near_ties"] == N and e["stops_on_eot"] >= 1, e
    assert result["adapter_changes"] >= 1
    # the reference against an independent decoder: transformers' generate on base + adapter
    model, tok, src = load_source(str(tiny_run))
    _, examples, _ = build_datasets(
        src.run_cfg.data, tok, src.run_cfg.training_config.seed, log=lambda *a, **k: None)
    ids = [chat_ids(tok, held_out(examples[i]["messages"])[0]) for i in range(N)]
    want = [generate_ids(model, tok, [i], max_new_tokens=NEW)[0] for i in ids]
    ref = result["reference"]["replies"]
    assert [r["tokens"][:-1] if r["stopped"] else r["tokens"] for r in ref] == want
    end = tok.convert_tokens_to_ids("<|end|>")
    assert result["end_of_turn"] == {"id": end, "token": "<|end|>"}
    assert result["reference"]["stops_on_eot"] == sum(r["stopped"] and r["tokens"][-1] == end for r in ref) >= 1
    md = (out / "verify.md").read_text()
    assert f"| peft | {N}/{N} |" in md and f"| merged | {N}/{N} |" in md and "**OK**" in md
    assert json.loads((out / "verify.json").read_text())["exit_code"] == 0


def test_default_run_in_real_vllm(tiny_run, vllm_python, tmp_path):
    """vLLM's CPU build (its own venv) serving the base with the run's adapter (a LoRARequest) gives the
    reference's tokens on every prompt and stops where it does; the base alone differs, so vLLM used
    the adapter."""
    result = verify(tiny_run, engines=["vllm"], vllm_python=vllm_python, prompts=N, max_new_tokens=NEW,
                    out=tmp_path, say=Lines())
    e = _engine(result, "vllm")
    assert result["exit_code"] == 0 and e["status"] == "ok" and not e["failures"], e
    assert e["identical"] == N and e["stops_on_eot"] == result["reference"]["stops_on_eot"], e
    assert result["adapter_changes"] >= 1
    # vllm serve's own rendering of each conversation as an OpenAI request is the trained prompt
    assert e["prompts_same"] == e["prompts_checked"] == N
    assert f"| vllm | {N}/{N} |" in (tmp_path / "verify.md").read_text() and f"| {N}/{N} same |" in \
        (tmp_path / "verify.md").read_text()


def _zeroed_copy(run: Path, out: Path) -> Path:
    """The run with every lora_B zero: an export path that lost the adapter."""
    shutil.copytree(run, out)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in tensors.items()},
              str(out / "adapter_model.safetensors"))
    return out


def test_zeroed_adapter_is_caught(tiny_run, tmp_path):
    """A merged model without the adapter's update: exit 1, 'ignores the adapter', naming the engine."""
    lines = Lines()
    merged = merge(str(_zeroed_copy(tiny_run, tmp_path / "zeroed")), tmp_path / "zeroed-merged")
    result = verify(tiny_run, engines=[], models=[merged], prompts=N, max_new_tokens=NEW, out=tmp_path, say=lines)
    assert result["exit_code"] == 1
    e = _engine(result, "model:zeroed-merged")
    assert e["failures"][0].startswith("model:zeroed-merged: ignores the adapter: its replies are the base model's")
    assert any(line.startswith("verify: FAIL model:zeroed-merged: ignores the adapter") for line in lines)


def test_lost_stop_token_is_caught(tiny_run, tmp_path):
    """A merged model whose generation config lost <|end|> runs on past the end of turn: exit 1,
    'does not stop on <|end|>' for each prompt the reference ends there."""
    merged = merge(str(tiny_run), tmp_path / "nostop")
    cfg_file = merged / "generation_config.json"
    gen = json.loads(cfg_file.read_text())
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(merged)
    gen["eos_token_id"] = [tok.eos_token_id]  # <|endoftext|> only: the template's <|end|> is lost
    cfg_file.write_text(json.dumps(gen))
    result = verify(tiny_run, engines=[], models=[merged], prompts=N, max_new_tokens=NEW, out=tmp_path, say=Lines())
    e = _engine(result, "model:nostop")
    ended = [i + 1 for i, r in enumerate(result["reference"]["replies"]) if r["tokens"][-1:] == [tok.convert_tokens_to_ids("<|end|>")]]
    assert ended and result["exit_code"] == 1 and e["stops_on_eot"] == 0
    assert [f.split(": ")[1] for f in e["failures"]] == [f"prompt {n} (eval #{n})" for n in ended]
    assert all("does not stop on '<|end|>' as the reference does" in f for f in e["failures"])


# -----------------------------------------------------------------------------
# GGUF files broken on the way (llama.cpp)

def _rewrite_gguf(src: Path, dst: Path, new: dict, drop=()) -> Path:
    """A copy of a GGUF file with metadata ``new`` ({key: (GGUFValueType, value, sub_type)}) set and
    keys ``drop`` removed (gguf's own gguf_new_metadata)."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata
    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), arch=reader.fields["general.architecture"].contents(),
                             endianess=reader.endianess)
    copy_with_new_metadata(reader, writer, {k: MetadataDetails(*v) for k, v in new.items()}, list(drop))
    return dst


@pytest.fixture(scope="module")
def gguf_f32(tiny_run, tmp_path_factory):
    pytest.importorskip("llama_cpp", reason="llama_cpp is not importable (scripts/setup.sh --tests)")
    from philora.export.gguf import export_gguf
    return export_gguf(tiny_run, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf", outtype="f32")


def test_gguf_with_a_wrong_chat_template_fails(tiny_run, gguf_f32, tmp_path):
    """A GGUF whose chat template is ChatML's: llama.cpp builds other prompt tokens: exit 1 naming
    the file and every prompt (the tokens-in replies still agree)."""
    import gguf
    chatml = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n'}}"
              "{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\\n'}}{% endif %}")
    bad = _rewrite_gguf(gguf_f32, tmp_path / "chatml.gguf",
                        {"tokenizer.chat_template": (gguf.GGUFValueType.STRING, chatml, None)})
    result = verify(tiny_run, engines=[], models=[bad], prompts=N, max_new_tokens=NEW, out=tmp_path, say=Lines())
    e = _engine(result, "gguf:chatml.gguf")
    assert result["exit_code"] == 1 and e["prompts_same"] == 0 and e["identical"] + e["near_ties"] == N
    assert [f.split(": its own chat template")[0] for f in e["failures"]] == \
        [f"gguf:chatml.gguf: prompt {n} (eval #{n})" for n in range(1, N + 1)]


def test_gguf_that_lost_its_end_of_turn_fails(tiny_run, gguf_f32, tmp_path):
    """A GGUF whose end-of-turn token is not marked (no eot_token_id, a name llama.cpp does not know
    by heart): llama.cpp generates it and goes on: 'does not stop', exit 1."""
    import gguf
    fields = gguf.GGUFReader(str(gguf_f32)).fields
    end = fields["tokenizer.ggml.eot_token_id"].contents()
    tokens = list(fields["tokenizer.ggml.tokens"].contents())
    assert tokens[end] == "<|end|>"
    tokens[end] = "<|turn_end|>"
    template = fields["tokenizer.chat_template"].contents().replace("<|end|>", "<|turn_end|>")
    bad = _rewrite_gguf(gguf_f32, tmp_path / "noeot.gguf", {
        "tokenizer.ggml.tokens": (gguf.GGUFValueType.ARRAY, tokens, gguf.GGUFValueType.STRING),
        "tokenizer.chat_template": (gguf.GGUFValueType.STRING, template, None)}, drop=["tokenizer.ggml.eot_token_id"])
    result = verify(tiny_run, engines=[], models=[bad], prompts=N, max_new_tokens=NEW, out=tmp_path, say=Lines())
    e = _engine(result, "gguf:noeot.gguf")
    assert result["exit_code"] == 1 and e["stops_on_eot"] == 0 and e["prompts_same"] == N
    assert e["failures"] and all("does not stop on '<|end|>'" in f for f in e["failures"])


def test_gguf_of_a_zeroed_adapter_ignores_it(tiny_run, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama_cpp is not importable (scripts/setup.sh --tests)")
    from philora.export.gguf import export_gguf
    path = export_gguf(_zeroed_copy(tiny_run, tmp_path / "zeroed"), tmp_path / "out" / "zeroed.gguf", outtype="f32")
    result = verify(tiny_run, engines=[], models=[path], prompts=N, max_new_tokens=NEW, out=tmp_path, say=Lines())
    assert result["exit_code"] == 1
    assert _engine(result, "gguf:zeroed.gguf")["failures"][0].startswith("gguf:zeroed.gguf: ignores the adapter")


# -----------------------------------------------------------------------------
# vLLM through another python (a fake that keeps the contract), engines not installed, bad input

FAKE_VLLM = '''
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
assert open(sys.argv[1]).read().count("LLM(") == 1  # it was handed the vLLM script
req = json.load(sys.stdin)
model = AutoModelForCausalLM.from_pretrained(req["model"], dtype=getattr(torch, req["dtype"])).eval()
if req["lora"] and not IGNORE_LORA:
    from peft import PeftModel
    model = PeftModel.from_pretrained(model, req["lora"]).eval()
tok = AutoTokenizer.from_pretrained(req["tokenizer"])
eos = model.generation_config.eos_token_id  # vLLM: the generation config's eos ids and the tokenizer's
eos = sorted(set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id})
outs = []
for ids in req["prompts"]:
    new = model.generate(torch.tensor([ids]), max_new_tokens=req["max_tokens"], do_sample=False,
                         eos_token_id=eos, pad_token_id=eos[0])[0, len(ids):].tolist()
    stop = bool(new) and new[-1] in eos
    out = {"token_ids": new, "finish_reason": "stop" if stop else "length", "stop_reason": None}
    if req.get("tool_parser") and TOOL_REGEX:  # vLLM's phi4_mini_json: its regex on the text, special tokens skipped
        import re
        text = tok.decode(new, skip_special_tokens=True)
        m = re.search(TOOL_REGEX, text, re.DOTALL)
        calls = json.loads("[" + m.group(1) + "]") if m else []
        out["tool_calls"] = {"text": text, "calls": [{"name": c["name"], "arguments": json.dumps(c["arguments"])}
                                                      for c in calls]}
    outs.append(out)
print("INFO some log line")
print(json.dumps({"vllm": "fake", "outputs": outs}))
'''


def _fake_python(tmp_path: Path, ignore_lora: bool, tool_regex=None) -> Path:
    script = tmp_path / f"fake_vllm_{ignore_lora}.py"
    script.write_text(f"IGNORE_LORA = {ignore_lora}\nTOOL_REGEX = {tool_regex!r}\n" + FAKE_VLLM)
    python = tmp_path / f"python-{ignore_lora}"
    python.write_text(f"#!/bin/sh\nexec {sys.executable} {script} \"$@\"\n")
    python.chmod(0o755)
    return python


@pytest.mark.parametrize("ignore_lora", [False, True])
def test_vllm_through_another_python(tiny_run, tmp_path, ignore_lora):
    """The vLLM engine's request/reply contract: a vLLM that serves the LoRA agrees token for token;
    one that drops it 'ignores the adapter' (exit 1)."""
    python = _fake_python(tmp_path, ignore_lora)
    result = verify(tiny_run, engines=["vllm"], vllm_python=str(python), prompts=N, max_new_tokens=NEW,
                    out=tmp_path, say=Lines())
    e = _engine(result, "vllm")
    if ignore_lora:
        assert result["exit_code"] == 1 and e["failures"][0].startswith("vllm: ignores the adapter")
    else:
        assert result["exit_code"] == 0 and e["identical"] == N and e["stops_on_eot"] == result["reference"]["stops_on_eot"]


WEATHER = [{"name": "weather", "description": "Weather in a city", "parameters": {"city": {"type": "str"}}}]


def _tools_prompts(tmp_path: Path) -> Path:
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps({"tools": WEATHER, "messages": [{"role": "system", "content": "Use tools."},
                                                             {"role": "user", "content": "Weather in Paris?"}]}) + "\n")
    return path


def test_vllm_request_carries_the_tools_without_a_call_format(tiny_run, tmp_path):
    """The tiny model writes no tool-call format philora knows, yet a prompt with tools sends them in vLLM's
    chat request (the reference and llama.cpp render with them; without them vLLM's prompt check would fail
    on verify's own doing), in the servers' shape; no parser (the request is recorded by a fake python)."""
    seen = tmp_path / "request.json"
    script = tmp_path / "record.py"
    script.write_text(f"import sys\nopen({str(seen)!r}, 'w').write(sys.stdin.read())\n"
                      "print('{\"not_installed\": \"recorded\"}')\n")
    python = tmp_path / "python-record"
    python.write_text(f"#!/bin/sh\nexec {sys.executable} {script} \"$@\"\n")
    python.chmod(0o755)
    result = verify(tiny_run, engines=["vllm"], vllm_python=str(python), prompts=str(_tools_prompts(tmp_path)),
                    max_new_tokens=4, out=tmp_path, say=Lines())
    assert result["tool_call_format"] is None and _engine(result, "vllm")["status"] == "skipped"
    req = json.loads(seen.read_text())
    assert req["tool_parser"] is None
    assert req["chats"][0]["tools"] == [{"type": "function", "function": WEATHER[0]}]
    assert req["chats"][0]["messages"] == [{"role": "system", "content": "Use tools."},
                                           {"role": "user", "content": "Weather in Paris?"}]


def test_tools_without_a_parser_render_in_real_vllm(tiny_run, vllm_python, tmp_path):
    """Real vLLM renders that request (tool_choice "none": no --enable-auto-tool-choice needed) as the
    reference: the prompt check passes."""
    result = verify(tiny_run, engines=["vllm"], vllm_python=vllm_python, prompts=str(_tools_prompts(tmp_path)),
                    max_new_tokens=8, out=tmp_path, say=Lines())
    e = _engine(result, "vllm")
    assert e["status"] == "ok" and e["prompts_checked"] == e["prompts_same"] == 1 and result["exit_code"] == 0, e


def test_engines_not_installed_are_one_line_each(tiny_run, tmp_path, monkeypatch, capsys):
    """No llama_cpp, a --vllm-python without vllm, one that does not exist: a line each, skipped; the
    merged model still runs; exit 0. Through the command's own argument parser, --json on stdout."""
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp -> ImportError
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args([str(tiny_run), "--engines", "gguf-q8_0,merged,vllm", "--prompts", "2", "--max-new-tokens",
                         "8", "--vllm-python", sys.executable, "--json", "--out", str(tmp_path)])
    capsys.readouterr()
    assert verify_cli(args) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert [(e["engine"], e["status"]) for e in result["engines"]] == [
        ("gguf-q8_0", "skipped"), ("merged", "ok"), ("vllm", "skipped")]
    skipped = [x for x in captured.err.splitlines() if ": skipped: " in x]
    assert skipped == ["verify: gguf-q8_0: skipped: llama-cpp-python is not installed (pip install llama-cpp-python)",
                       f"verify: vllm: skipped: vllm is not importable: No module named 'vllm' (in {sys.executable})"]
    lines = Lines()
    result = verify(tiny_run, engines=["vllm"], vllm_python=str(tmp_path / "nope"), prompts=1, max_new_tokens=4,
                    out=tmp_path, say=lines)
    assert result["exit_code"] == 0 and lines[-1] == f"verify: vllm: skipped: --vllm-python {tmp_path / 'nope'}: no such file"


def test_bad_input_is_one_line(tiny_run, tiny_model_dir, tmp_path, helpers):
    """A directory without an adapter, an unknown engine, a vLLM option without vLLM, a chat template or
    prompts file that is not there: one-line errors; a prompt longer than the model's context: one line, and the other prompts are verified."""
    with pytest.raises(PhiloraError) as e:
        verify(tiny_model_dir, prompts=1)
    helpers.one_line_error(e, "no adapter to verify")
    with pytest.raises(PhiloraError) as e:
        verify(tiny_run, engines=["ollama"], prompts=1, max_new_tokens=4, out=tmp_path, say=Lines())
    helpers.one_line_error(e, "unknown engine 'ollama'")
    with pytest.raises(PhiloraError) as e:
        verify(tiny_run, engines=["peft"], vllm_tool_parser="hermes", prompts=1, max_new_tokens=4, out=tmp_path,
               say=Lines())
    helpers.one_line_error(e, "--vllm-tool-parser hermes is for the vllm engine")
    with pytest.raises(PhiloraError) as e:
        verify(tiny_run, engines=["vllm"], vllm_python="python", vllm_chat_template=str(tmp_path / "no.jinja"),
               prompts=1, max_new_tokens=4, out=tmp_path, say=Lines())
    helpers.one_line_error(e, f"--vllm-chat-template {tmp_path / 'no.jinja'}: no such file")
    with pytest.raises(PhiloraError) as e:
        verify(tiny_run, prompts=str(tmp_path / "missing.jsonl"))
    helpers.one_line_error(e, "missing.jsonl: no such file")
    prompts = tmp_path / "prompts.jsonl"
    long = " ".join(f"word{i}" for i in range(3000))  # > the tiny model's 2048 positions
    prompts.write_text("\n".join(json.dumps({"messages": m}) for m in [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "user", "content": long}, {"role": "assistant", "content": "ok"}]]) + "\n")
    lines = Lines()
    result = verify(tiny_run, engines=[], prompts=str(prompts), max_new_tokens=4, out=tmp_path, say=lines)
    assert [p["where"] for p in result["prompts"]] == [f"{prompts}:1"] and result["exit_code"] == 0
    (line,) = [x for x in lines if "context" in x]
    assert line.startswith(f"verify: prompt 2 ({prompts}:2): ") and "exceed the model's context of 2048 tokens; skipped" in line
    with pytest.raises(PhiloraError) as e:
        prompts.write_text(json.dumps({"messages": [{"role": "user", "content": long}]}) + "\n")
        verify(tiny_run, engines=[], prompts=str(prompts), max_new_tokens=4, out=tmp_path, say=Lines())
    helpers.one_line_error(e, "no prompt fits the model's context")


def test_compare_reply_kinds():
    """The verdicts on hand-made replies (tokens include the stop token 9)."""
    ref = {"tokens": [5, 6, 7, 9], "stopped": True, "margins": [3.0, 0.2, 2.0, 1.0]}
    base = {"tokens": [4, 4], "stopped": False}
    def kind(tokens, stopped, threshold=0.5):
        return compare_reply(ref, {"tokens": tokens, "stopped": stopped}, base, threshold)
    assert kind([5, 6, 7, 9], True) == {"kind": "identical", "at": None, "margin": None, "as_base": False}
    assert kind([5, 8, 1], False) == {"kind": "near-tie", "at": 1, "margin": 0.2, "as_base": False}
    assert kind([5, 8, 1], False, threshold=0.1)["kind"] == "diverges"
    assert kind([5, 6, 8], True) == {"kind": "diverges", "at": 2, "margin": 2.0, "as_base": False}
    assert kind([5, 6, 7, 9, 3, 3], False)["kind"] == "missing stop"
    assert kind([5, 6], True)["kind"] == "early stop"
    assert kind([4, 4], False) == {"kind": "diverges", "at": 0, "margin": 3.0, "as_base": True}
    assert compare_reply({"tokens": [1, 2], "stopped": False, "margins": [1, 1]},
                         {"tokens": [1, 2, 3], "stopped": False}, base, 0.5)["kind"] == "length"


# -----------------------------------------------------------------------------
# tool calling: a Phi-4-mini-shape run (Phi3 with partial rotary, GQA, tied embeddings, LongRoPE, Phi-4-mini's
# tokens and template) trained to answer in <|tool_call|>[...]<|/tool_call|>

TOOLS = [{"name": "weather", "parameters": {"city": "str"}}, {"name": "add", "parameters": {"values": "list"}}]


def _call(name, args):
    return "<|tool_call|>" + json.dumps([{"name": name, "arguments": args}]) + "<|/tool_call|>"


TOOL_CHATS = [("Weather in Paris?", _call("weather", {"city": "Paris"})),
              ("Weather in Tokyo?", _call("weather", {"city": "Tokyo"})),
              ("Add 2 and 3.", _call("add", {"values": [2, 3]})), ("Hello!", "Hello!")]


@pytest.fixture(scope="module")
def tool_run(tmp_path_factory):
    """The model matrix's phi4-mini family, wider (hidden 128: the 48-wide one does not learn the format in
    minutes) with a vocabulary of its tokenizer's size and BPE merges for the calls' JSON (shorter sequences),
    LongRoPE's switch at 512 (all on the short side: across a switch at 48, transformers changes factors per
    sequence length where llama.cpp keeps one set per n_ctx, and prompt 4 parted at a margin of 1.8),
    trained 60 steps on the four conversations; the eval split is the same four (the run must emit calls
    for verify to compare them; the report's score needs no more)."""
    from model_matrix import FIXTURES, build_family  # the matrix's builder, on a changed copy of its table
    table = json.loads((FIXTURES / "families.json").read_text(encoding="utf-8"))
    c = table["families"]["phi4-mini"]["config"]
    del c["vocab_size"]
    c.update(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
             initializer_range=0.05, max_position_embeddings=512, original_max_position_embeddings=512,
             rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 12,
                           "long_factor": [1.0 + i / 8 for i in range(12)]})
    table["words"] += " weather add city values Paris Tokyo" + "".join(a for _, a in TOOL_CHATS[:3]) * 3
    d = tmp_path_factory.mktemp("tool-run")
    model = build_family(table, "phi4-mini", d / "model")
    gen = json.loads((d / "model" / "generation_config.json").read_text())
    from transformers import AutoTokenizer  # Phi-4-mini's generation config ends on <|endoftext|> and <|end|>
    gen["eos_token_id"] = [gen["eos_token_id"], AutoTokenizer.from_pretrained(model).convert_tokens_to_ids("<|end|>")]
    (d / "model" / "generation_config.json").write_text(json.dumps(gen))
    recs = [{"messages": [{"role": "system", "content": "Use tools.", "tools": TOOLS},
                          {"role": "user", "content": u}, {"role": "assistant", "content": a}]} for u, a in TOOL_CHATS]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs * 4))
    (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg = load_config(None, [f"model.name_or_path={model}", f"data.train={d / 'train.jsonl'}",
                             f"data.eval={d / 'eval.jsonl'}", "data.max_length=192", f"training_config.output_dir={d / 'run'}",
                             "training_config.max_steps=60", "training_config.per_device_train_batch_size=16",
                             "training_config.learning_rate=1e-2", *RUN[2:-1], "peft_config.r=16",
                             "peft_config.lora_alpha=32", "peft_config.target_modules=all-linear"])
    train(cfg, overwrite=True)
    return d / "run"


def test_tool_calling_run_verifies_in_llama_cpp(tool_run, tmp_path):
    """GGUF f32 / q8_0 of the Phi-4-mini-shape run in llama.cpp: the same tokens, the prompt llama-cpp-python
    builds from each conversation sent as an OpenAI request (the tools as the request's tools=, none on a
    message) with the export's template (the model's behind toolparser's preamble) is the trained one, and
    the calls (read by philora's phi4_mini parser: llama-cpp-python's handler parses none) equal the
    reference's: name and arguments."""
    pytest.importorskip("llama_cpp", reason="llama_cpp is not importable (scripts/setup.sh --tests)")
    result = verify(tool_run, engines=["gguf-f32", "gguf-q8_0"], prompts=4, max_new_tokens=40, out=tmp_path, say=Lines())
    assert result["exit_code"] == 0 and result["tool_call_format"] == "phi4_mini", \
        [e.get("failures") or e.get("reason") for e in result["engines"]]
    ref = result["reference"]["replies"]
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tool_run)
    texts = [tok.decode(r["tokens"][:-1], skip_special_tokens=False) for r in ref]
    # the reference's calls against the JSON between the tags, read here without philora's parser
    want = [json.loads(t.split("<|tool_call|>")[1].split("<|/tool_call|>")[0]) if "<|/tool_call|>" in t else None
            for t in texts]
    assert sum(w is not None for w in want) >= 3
    for r, w in zip(ref, want):
        if w is not None:
            assert r["tool_calls"] == w
    for name in ("gguf-f32", "gguf-q8_0"):
        e = _engine(result, name)
        assert e["identical"] + e["near_ties"] == 4 and e["prompts_same"] == 4, e
        assert e["tool_calls"]["prompts"] >= 3 and not e["failures"]
        for row, r in zip(e["per_prompt"], ref):  # same tokens, same calls; q8_0 may part at near-ties
            assert row["kind"] in ("identical", "near-tie")
            assert row["tool_calls"] == r["tool_calls"] or row["kind"] == "near-tie"
        assert "llama-cpp-python's chat handler parses no tool calls" in e["tool_calls"]["parser"]
    f32 = _engine(result, "gguf-f32")["tool_calls"]
    assert f32["same"] == f32["prompts"]
    md = (tmp_path / "verify.md").read_text()
    assert "Tool calls (`phi4_mini` format)" in md and "| gguf-f32 | 4/4 |" in md and "**OK**" in md


def test_tool_calls_that_differ_fail(tool_run, tmp_path):
    """An engine whose parser reads other calls from the same tokens (vLLM's phi4_mini_json looks for
    'functools[...]', so it reads none in <|tool_call|>[...]): exit 1 naming the engine, prompt and parser."""
    python = _fake_python(tmp_path, False, tool_regex=r"functools\[(.*?)\]")
    result = verify(tool_run, engines=["vllm"], vllm_python=str(python), prompts=4, max_new_tokens=40,
                    out=tmp_path, say=Lines(), vllm_tool_parser="phi4_mini_json")
    e = _engine(result, "vllm")
    assert e["identical"] == 4 and result["exit_code"] == 1
    assert e["tool_calls"]["parser"] == "vLLM phi4_mini_json" and e["tool_calls"]["same"] == 0
    assert e["failures"] and all("tool calls read by vLLM phi4_mini_json: no call; the reference's: " in f
                                 for f in e["failures"])


def test_gguf_with_the_models_own_template_loses_the_tools(tool_run, tmp_path):
    """The export's GGUF carries Phi-4-mini's template behind toolparser's preamble and builds the trained
    prompt from every OpenAI request; the same file carrying the model's own template (which reads the tools
    only from the system message, where no client can put them: llama-server drops them) builds another
    prompt for each, at the tools block: exit 1 naming the file and every prompt (tokens in, the replies
    still agree)."""
    pytest.importorskip("llama_cpp", reason="llama_cpp is not importable (scripts/setup.sh --tests)")
    import gguf
    from transformers import AutoTokenizer
    from philora.export.gguf import export_gguf
    from philora.export.toolparser import tools_template
    own = AutoTokenizer.from_pretrained(tool_run).chat_template
    fixed = export_gguf(tool_run, tmp_path / "fixed.gguf", outtype="f32")
    assert gguf.GGUFReader(str(fixed)).fields["tokenizer.chat_template"].contents() == tools_template(own, "flat")
    bad = _rewrite_gguf(fixed, tmp_path / "own.gguf", {"tokenizer.chat_template": (gguf.GGUFValueType.STRING, own, None)})
    result = verify(tool_run, engines=[], models=[fixed, bad], prompts=4, max_new_tokens=40, out=tmp_path, say=Lines())
    good, e = _engine(result, "gguf:fixed.gguf"), _engine(result, "gguf:own.gguf")
    assert good["prompts_checked"] == good["prompts_same"] == good["identical"] == 4 and not good["failures"], good
    assert result["exit_code"] == 1 and e["prompts_checked"] == 4 and e["prompts_same"] == 0 and e["identical"] == 4
    assert [f.split(": its own chat template")[0] for f in e["failures"]] == \
        [f"gguf:own.gguf: prompt {n} (eval #{n})" for n in range(1, 5)]
    assert all("build another prompt" in f and "trained: '<|tool|>[{\"name\"" in f for f in e["failures"]), e["failures"]


def test_phi4_mini_as_vllm_ships_it_fails_twice(tool_run, vllm_python, tmp_path):
    """The Phi-4-mini-shape run in real vLLM as vLLM ships Phi-4-mini support: the model's own template
    (--vllm-chat-template: the run's tokenizer's) and vLLM's phi4_mini_json parser (--vllm-tool-parser).
    Both fail, each caught (exit 1 naming vLLM and each prompt): vllm serve renders an OpenAI request
    with tools without them (vLLM drops a system message's 'tools', and the template reads them nowhere
    else), and from the reference's own tokens the parser reads no call (it looks for functools[...]).
    What ``philora export tool-parser`` fixes: the next test."""
    from transformers import AutoTokenizer
    own = tmp_path / "own.jinja"
    own.write_text(AutoTokenizer.from_pretrained(tool_run).chat_template, encoding="utf-8")
    result = verify(tool_run, engines=["vllm"], vllm_python=vllm_python, prompts=4, max_new_tokens=40,
                    out=tmp_path, say=Lines(), vllm_tool_parser="phi4_mini_json", vllm_chat_template=str(own))
    e = _engine(result, "vllm")
    assert e["status"] != "skipped" and e["identical"] == 4 and result["exit_code"] == 1, e
    assert e["prompts_checked"] == 4 and e["prompts_same"] == 0
    prompt_fails = [f for f in e["failures"] if "build another prompt" in f]
    assert [f.split(":")[1].strip() for f in prompt_fails] == [f"prompt {n} (eval #{n})" for n in range(1, 5)]
    assert all("trained: '<|tool|>[{\"name\"" in f for f in prompt_fails), prompt_fails
    assert e["tool_calls"]["parser"] == "vLLM phi4_mini_json" and e["tool_calls"]["same"] == 0
    call_fails = [f for f in e["failures"] if "tool calls read by vLLM phi4_mini_json: no call; the reference's: " in f]
    assert len(call_fails) == e["tool_calls"]["prompts"] >= 3
    assert len(e["failures"]) == len(prompt_fails) + len(call_fails)


def test_phi4_mini_calls_in_real_vllm_with_the_plugin(tool_run, vllm_python, tmp_path):
    """By default verify serves a Phi-4-mini run's prompts with philora's tool-parser plugin (the file
    ``philora export tool-parser`` writes, loaded as --tool-parser-plugin loads it): vLLM's server path
    reads every call the reference makes, name and arguments, from the same tokens: exit 0."""
    result = verify(tool_run, engines=["vllm"], vllm_python=vllm_python, prompts=4, max_new_tokens=40,
                    out=tmp_path, say=Lines())
    e = _engine(result, "vllm")
    assert e["status"] == "ok" and e["identical"] == 4 and result["exit_code"] == 0 and not e["failures"], e
    assert e["tool_calls"]["parser"] == "vLLM philora_phi4_mini (plugin: philora export tool-parser)"
    assert e["tool_calls"]["prompts"] >= 3 and e["tool_calls"]["same"] == e["tool_calls"]["prompts"]
    ref = result["reference"]["replies"]
    assert sum(bool(r["tool_calls"]) for r in ref) >= 3
    for row, r in zip(e["per_prompt"], ref):
        assert row["tool_calls"] == r["tool_calls"] and all("invalid" not in c for c in r["tool_calls"])
    assert "vLLM philora_phi4_mini (plugin: philora export tool-parser)" in (tmp_path / "verify.md").read_text()
    # the prompt vllm serve renders of an OpenAI request (tools as the request's tools) with the chat
    # template philora export tool-parser writes is the trained one, tools block included
    assert e["prompts_same"] == e["prompts_checked"] == 4


def test_report_scores_function_calling(tool_run, tmp_path):
    """philora eval's function-calling section: base vs tuned on each eval turn with calls; the score
    recomputed here from the report's own turns."""
    from philora.use.report import evaluate_run
    report = evaluate_run(tool_run, out=tmp_path, samples=8, max_new_tokens=40)
    fc = report["function_calling"]
    assert fc["format"] == "phi4_mini" and fc["fine_tuned"]["turns"] == 3 == len(fc["turns"])
    for side in ("base", "fine_tuned"):
        exact = sum(sum(c in t[side] for c in t["reference"]) for t in fc["turns"])  # no repeated calls here
        names = sum(sum(c["name"] in [p.get("name") for p in t[side]] for c in t["reference"]) for t in fc["turns"])
        assert fc[side]["calls"] == 3 and fc[side]["exact_match"] == pytest.approx(exact / 3)
        assert fc[side]["name_match"] == pytest.approx(names / 3)
    assert fc["fine_tuned"]["exact_match"] >= 2 / 3 > fc["base"]["exact_match"]  # training taught the calls
    md = (tmp_path / "report.md").read_text()
    assert "## Function calling (3 held-out turns with 3 tool calls, `phi4_mini` format, greedy)" in md
    assert (f"| calls exact (name + arguments) | {fc['base']['exact_match']:.3f} | "
            f"{fc['fine_tuned']['exact_match']:.3f} |") in md
