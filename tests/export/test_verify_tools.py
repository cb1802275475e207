"""philora verify on tool-calling runs of two more families, end to end in llama.cpp: a Hermes / Qwen2.5-shape
run and a Llama-3.1-shape run, each with its family's real chat template (tests/fixtures/chat_templates:
Qwen2.5-Instruct's and Llama-3.1-Instruct's, tools included), trained on OpenAI-style data (the record's
``tools``, assistant ``tool_calls``), exported to GGUF f32 / q8_0.

Checked against references that are not philora's: the training rows are transformers' own
``apply_chat_template(messages, tools=...)`` and their labels are exactly the call text each family's
documentation gives plus its end-of-turn token; llama-cpp-python renders the GGUF's template with the tools
into the prompt that was trained; the calls of the reference's replies are the JSON between the tags
(Qwen2.5) or the whole reply (Llama 3.1), read here with ``json``; every engine's calls equal them (q8_0
may part at a near-tie only). A GGUF whose template lost its tool branch (the family's plain template)
fails naming the engine and every prompt. The eval report scores function calling on each run.
"""

import json
import time
from pathlib import Path

import pytest

from philora.core.config import load_config
from philora.data.build import build_datasets
from philora.data.encoding import IGNORE_INDEX
from philora.export.verify import verify
from philora.run.train import train

TEMPLATES = "chat_templates"  # under tests/fixtures
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}},
         {"type": "function", "function": {"name": "add", "description": "Add numbers",
                                           "parameters": {"type": "object", "properties": {
                                               "values": {"type": "array", "items": {"type": "number"}}},
                                               "required": ["values"]}}}]
# each reply told by the user's first word: a 60-step tiny model learns the format, not to copy a city out
# of the question (with "Weather in Tokyo?" too it answers one city for both, a near-tie each time)
CHATS = [("Weather in Paris?", ("weather", {"city": "Paris"})), ("Add 2 and 3.", ("add", {"values": [2, 3]})),
         ("Sum 4.5 and -1.", ("add", {"values": [4.5, -1]})), ("Hello!", "Hello!")]
# The families' own pre-tokenizer splits (their tokenizer.json), so that "\n\n" before a reply is one piece
# whether or not text follows, as on the hub
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
FAMILIES = {
    # Qwen2.5-Instruct: <tool_call> / </tool_call> are added tokens but not special; generation config
    # eos: <|im_end|>, <|endoftext|>; vLLM's parser "hermes"
    "qwen2.5": dict(matrix="qwen2", template="Qwen-Qwen2.5-7B-Instruct.jinja", fmt="hermes", vllm="hermes",
                    tokenizer={"added_tokens": ["<tool_call>", "</tool_call>"], "split_regex": QWEN2_SPLIT},
                    eos=["<|im_end|>", "<|endoftext|>"],
                    reply=lambda name, args: "<tool_call>\n" + json.dumps({"name": name, "arguments": args})
                    + "\n</tool_call><|im_end|>"),
    # Llama-3.1-Instruct: <|eom_id|>, <|python_tag|> special; eos <|end_of_text|>, <|eom_id|>, <|eot_id|>;
    # tools in the first user message (the template's default); vLLM's parser "llama3_json"
    "llama3.1": dict(matrix="llama3", template="meta-llama-Llama-3.1-8B-Instruct.jinja", fmt="llama3_json",
                     vllm="llama3_json",
                     tokenizer={"more_special": ["<|eom_id|>", "<|python_tag|>"], "split_regex": LLAMA3_SPLIT,
                                "ignore_merges": True},
                     eos=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
                     reply=lambda name, args: json.dumps({"name": name, "parameters": args}) + "<|eot_id|>"),
}
WIDE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
RUN = ["training_config.warmup_steps=1", "training_config.eval_steps=0", "training_config.save_steps=0",
       "training_config.report_samples=0", "training_config.progress_bar=false", "training_config.logging_steps=10",
       "peft_config.lora_dropout=0.0"]


class Lines(list):
    def __call__(self, line):
        assert "\n" not in line
        self.append(line)


def _records():
    """OpenAI-style records: the tools at the record's top level, calls as assistant ``tool_calls``."""
    out = []
    for user, answer in CHATS:
        if isinstance(answer, str):
            reply = {"role": "assistant", "content": answer}
        else:
            reply = {"role": "assistant", "tool_calls": [
                {"type": "function", "function": {"name": answer[0], "arguments": answer[1]}}]}
        out.append({"tools": TOOLS, "messages": [{"role": "system", "content": "Use tools."},
                                                 {"role": "user", "content": user}, reply]})
    return out


def _rendered(template: str, records) -> str:
    """The records through the template by plain jinja2: text for the tiny tokenizer's BPE to learn merges
    from (the tool prompts are long; a 400-piece vocabulary makes them ~1000 tokens)."""
    import jinja2
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, indent=indent)
    t = env.from_string(template)
    return " ".join(t.render(messages=r["messages"], tools=r["tools"], bos_token="") for r in records)


def build_tool_family(name: str, out: Path) -> str:
    """The matrix's family (model_matrix.build_family on a changed copy of its table), wider (hidden 128,
    init std 0.2: logits that can be sure; attention not sharpened: LoRA learns where to look in a few dozen
    steps), with the real family's tool-calling template, its tool tokens and pre-tokenizer split, a BPE
    vocabulary learned on the rendered conversations, and its generation config's eos ids."""
    from model_matrix import FIXTURES, build_family  # the matrix's builder (conftest's plugin module)
    from transformers import AutoTokenizer
    fam = FAMILIES[name]
    table = json.loads((FIXTURES / "families.json").read_text(encoding="utf-8"))
    spec = table["families"][fam["matrix"]]
    spec["chat_template"] = (FIXTURES / TEMPLATES / fam["template"]).read_text(encoding="utf-8")
    kind = table["tokenizers"][spec["tokenizer"]]
    extra = dict(fam["tokenizer"])
    kind["special_tokens"] += extra.pop("more_special", [])
    kind.update(extra, bpe_vocab_size=1000)
    spec["config"].update(WIDE)
    table["words"] += " " + _rendered(spec["chat_template"], _records()) * 2
    model = build_family(table, fam["matrix"], out, sharp=1.0)
    gen = json.loads((out / "generation_config.json").read_text())
    gen["eos_token_id"] = AutoTokenizer.from_pretrained(model).convert_tokens_to_ids(fam["eos"])
    (out / "generation_config.json").write_text(json.dumps(gen))
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def tool_run(request, tmp_path_factory):
    """(family name, its base model directory, a run trained 50 steps on the four conversations, all four in
    each step; the eval split is the same four: verify needs replies with calls to compare, the score no
    more)."""
    name = request.param
    d = tmp_path_factory.mktemp(f"tools-{name}")
    model = build_tool_family(name, d / "model")
    recs = _records()
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg = load_config(None, [f"model.name_or_path={model}", f"data.train={d / 'train.jsonl'}",
                             f"data.eval={d / 'eval.jsonl'}", "data.max_length=512",
                             f"training_config.output_dir={d / 'run'}", "training_config.max_steps=50",
                             "training_config.per_device_train_batch_size=4", "training_config.learning_rate=1e-2",
                             *RUN, "peft_config.r=16", "peft_config.lora_alpha=32",
                             "peft_config.target_modules=all-linear"])
    t0 = time.perf_counter()
    train(cfg, overwrite=True)
    print(f"{name}: trained in {time.perf_counter() - t0:.1f} s")
    return name, Path(model), d / "run", cfg


def _tokenizer(path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path))


def _openai(messages):
    """A conversation as transformers' apply_chat_template takes it (tools apart, as written in _records)."""
    return [{k: v for k, v in m.items() if k in ("role", "content", "tool_calls")} for m in messages]


def test_training_rows_are_the_templates_own_and_train_the_calls(tool_run):
    """Each training row is transformers' apply_chat_template(messages, tools=TOOLS) of the record (tools
    in the system block for Qwen2.5, in the first user message for Llama 3.1), and its labels are the
    reply exactly as the family writes a call (by hand here), end-of-turn token included."""
    name, model, _, cfg = tool_run
    tok = _tokenizer(model)
    train_set, _, _ = build_datasets(cfg.data, tok, 0, log=lambda *a, **k: None)
    rows = {tuple(train_set[i]["input_ids"]): train_set[i] for i in range(len(train_set))}
    assert len(rows) == len(CHATS)
    for rec, (user, answer) in zip(_records(), CHATS):
        msgs = [dict(m, content=m.get("content", "")) for m in rec["messages"]]
        ids = tok.apply_chat_template(_openai(msgs), tools=TOOLS, tokenize=True, return_dict=True)["input_ids"]
        row = rows[tuple(ids)]
        text = tok.decode(ids, skip_special_tokens=False)
        assert '"name": "weather"' in text and "Use tools." in text and user in text
        labelled = [t for t in row["labels"] if t != IGNORE_INDEX]
        want = FAMILIES[name]["reply"](*answer) if not isinstance(answer, str) else answer + (
            "<|im_end|>" if name == "qwen2.5" else "<|eot_id|>")
        assert tok.decode(labelled, skip_special_tokens=False) == want
        first = row["labels"].index(labelled[0])  # one run of labels, right after the generation prompt
        assert row["labels"][first:first + len(labelled)] == labelled
        prompt = tok.apply_chat_template(_openai(msgs[:2]), tools=TOOLS, add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]
        assert first == len(prompt) and ids[:first] == prompt


def _engine(result, name):
    return next(e for e in result["engines"] if e["engine"] == name)


def _calls_by_hand(name: str, text: str):
    """The calls of a reply read with json alone: the JSON between <tool_call> tags (Qwen2.5), or the
    reply as one JSON object with "parameters" (Llama 3.1); None when it is not a call."""
    if name == "qwen2.5":
        bodies = [part.split("</tool_call>")[0] for part in text.split("<tool_call>")[1:]]
        return [json.loads(b) for b in bodies] or None
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    return [{"name": obj["name"], "arguments": obj["parameters"]}]


def test_tool_calling_run_verifies_in_llama_cpp(tool_run, tmp_path):
    """GGUF f32 / q8_0 in llama.cpp: exit 0; the same tokens, replies that stop on the end-of-turn token,
    the prompt llama.cpp's own template builds (with the tools) is the trained one, and each engine's
    calls (philora's parser of the family's format: llama-cpp-python's handler parses none) equal the
    reference's, which are the calls read from its text with json alone."""
    pytest.importorskip("llama_cpp", reason="llama_cpp is not importable (scripts/setup.sh --tests)")
    name, model, run, _ = tool_run
    t0 = time.perf_counter()
    result = verify(run, engines=["gguf-f32", "gguf-q8_0"], prompts=4, max_new_tokens=40, out=tmp_path, say=Lines())
    print(f"{name}: verify {time.perf_counter() - t0:.1f} s\n" + (tmp_path / "verify.md").read_text())
    assert result["exit_code"] == 0 and result["tool_call_format"] == FAMILIES[name]["fmt"], \
        [e.get("failures") or e.get("reason") for e in result["engines"]]
    tok = _tokenizer(run)
    ref = result["reference"]["replies"]
    texts = [tok.decode(r["tokens"][:-1] if r["stopped"] else r["tokens"], skip_special_tokens=False) for r in ref]
    want = [_calls_by_hand(name, t) for t in texts]
    assert [w is not None for w in want] == [True, True, True, False], texts  # the three calls, then "Hello!"
    assert want[:3] == [[{"name": n, "arguments": a}] for _, (n, a) in CHATS[:3]]  # it learned them
    for r, w in zip(ref, want):
        assert r["tool_calls"] == (w or [])
    for engine in ("gguf-f32", "gguf-q8_0"):
        e = _engine(result, engine)
        assert e["identical"] + e["near_ties"] == 4 and e["prompts_same"] == 4 and not e["failures"], e
        assert e["stops_on_eot"] == result["reference"]["stops_on_eot"] == 4
        assert e["tool_calls"]["prompts"] >= 3
        for row, r in zip(e["per_prompt"], ref):  # same tokens, same calls; q8_0 may part at near-ties
            assert row["kind"] in ("identical", "near-tie")
            assert row["tool_calls"] == r["tool_calls"] or row["kind"] == "near-tie"
    f32 = _engine(result, "gguf-f32")
    assert f32["identical"] == 4 and f32["tool_calls"]["same"] == f32["tool_calls"]["prompts"] == 3
    md = (tmp_path / "verify.md").read_text()
    assert f"Tool calls (`{FAMILIES[name]['fmt']}` format)" in md and "| gguf-f32 | 4/4 |" in md and "**OK**" in md


def test_tool_calling_run_verifies_in_real_vllm(tool_run, vllm_python, tmp_path):
    """Real vLLM (its CPU build, the run's adapter as a LoRARequest) with the family's own tool parser
    (hermes / llama3_json, as `vllm serve --tool-call-parser` would use): the reference's tokens and
    stops, and the parser reads the reference's calls: exit 0."""
    name, _, run, _ = tool_run
    result = verify(run, engines=["vllm"], vllm_python=vllm_python, prompts=4, max_new_tokens=40, out=tmp_path,
                    say=Lines())
    e = _engine(result, "vllm")
    assert result["exit_code"] == 0 and e["status"] == "ok" and not e["failures"], e
    assert e["identical"] == 4 and e["stops_on_eot"] == 4
    assert e["tool_calls"]["parser"] == f"vLLM {FAMILIES[name]['vllm']}"
    assert e["tool_calls"]["same"] == e["tool_calls"]["prompts"] == 3
    for row, r in zip(e["per_prompt"], result["reference"]["replies"]):
        assert row["tool_calls"] == r["tool_calls"]
    # vllm serve's rendering of each conversation as an OpenAI request (the request's tools, normalized by
    # vLLM, through the template's tools= branch) is the trained prompt, tools included
    assert e["prompts_same"] == e["prompts_checked"] == 4


def _rewrite_template(src: Path, dst: Path, template: str) -> Path:
    """A copy of a GGUF file with another tokenizer.chat_template (gguf's own gguf_new_metadata)."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst), arch=arch, endianess=reader.endianess)
    copy_with_new_metadata(reader, writer, {"tokenizer.chat_template": MetadataDetails(
        gguf.GGUFValueType.STRING, template, None)}, [])
    return dst


def test_gguf_template_renders_the_trained_prompt_and_one_without_tools_fails(tool_run, tmp_path):
    """The GGUF carries the real template byte for byte; llama-cpp-python renders it with the request's
    tools into the text transformers renders (the trained prompt, tools included). The same GGUF with the
    family's template without its tool branch (the model matrix's) builds other prompts: exit 1 naming
    the file and each prompt."""
    pytest.importorskip("llama_cpp", reason="llama_cpp is not importable (scripts/setup.sh --tests)")
    import gguf
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from model_matrix import FIXTURES
    from philora.export.gguf import export_gguf
    name, model, run, _ = tool_run
    fam = FAMILIES[name]
    path = export_gguf(run, tmp_path / "f32.gguf", outtype="f32")
    template = gguf.GGUFReader(str(path)).fields["tokenizer.chat_template"].contents()
    assert template == (FIXTURES / TEMPLATES / fam["template"]).read_text(encoding="utf-8")
    tok = _tokenizer(run)
    rec = _records()[0]
    prompt = _openai(rec["messages"][:2])
    want = tok.apply_chat_template(prompt, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    got = Jinja2ChatFormatter(template=template, eos_token=tok.eos_token, bos_token=tok.bos_token or "")(
        messages=prompt, tools=TOOLS).prompt
    assert got == want and '"name": "weather"' in got and '"description": "Add numbers"' in got

    table = json.loads((FIXTURES / "families.json").read_text(encoding="utf-8"))
    plain = table["families"][fam["matrix"]]["chat_template"]  # the family's template, tool branches aside
    assert "tools" not in plain
    bad = _rewrite_template(path, tmp_path / "notools.gguf", plain)
    result = verify(run, engines=[], models=[bad], prompts=4, max_new_tokens=40, out=tmp_path, say=Lines())
    e = _engine(result, "gguf:notools.gguf")
    assert result["exit_code"] == 1 and e["prompts_same"] == 0
    assert [f.split(": its own chat template")[0] for f in e["failures"]] == \
        [f"gguf:notools.gguf: prompt {n} (eval #{n})" for n in range(1, 5)]


def test_report_scores_function_calling(tool_run, tmp_path):
    """philora eval's function-calling section (the reference calls are the records' tool_calls): the
    fine-tuned model makes the three calls exactly, the base none; the score recomputed from the turns."""
    name, _, run, _ = tool_run
    from philora.use.report import evaluate_run
    report = evaluate_run(run, out=tmp_path, samples=8, max_new_tokens=40)
    fc = report["function_calling"]
    assert fc["format"] == FAMILIES[name]["fmt"] and len(fc["turns"]) == 3
    assert [t["reference"] for t in fc["turns"]] == [[{"name": n, "arguments": a}] for _, (n, a) in CHATS[:3]]
    for side in ("base", "fine_tuned"):
        exact = sum(sum(c in t[side] for c in t["reference"]) for t in fc["turns"])
        assert fc[side]["calls"] == 3 and fc[side]["exact_match"] == pytest.approx(exact / 3)
    assert fc["fine_tuned"]["exact_match"] == 1.0 > fc["base"]["exact_match"]
    assert f"`{fc['format']}` format, greedy)" in (tmp_path / "report.md").read_text()
