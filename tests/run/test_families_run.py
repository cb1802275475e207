"""Whole runs and data on the model matrix's families (conftest's ``families``): a LongRoPE run
records the side(s) of the factor switch it trained and says how to serve it (log, README,
``philora adapter check``); Gemma 2 trains with its softcapped attention, chosen and said once;
Phi-4-mini's tool-calling conversations (tools on the system message) train on the calls and
answers only."""

import json

import pytest

from philora.export.adapter_check import check_cli
from philora.data.build import encode_chat
from philora.data.formats import DataError, to_messages
from philora.data.encoding import IGNORE_INDEX
from philora.run.train import train


def write_data(families, name, d, copies=4):
    """Train / eval JSON-lines files of the family's conversations."""
    convs = [c for seed in range(copies) for c in families.conversations(name, seed)]
    d.mkdir(parents=True, exist_ok=True)
    for split, part in (("train", convs), ("eval", convs[:4])):
        (d / f"{split}.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in part),
                                          encoding="utf-8")
    return d / "train.jsonl", d / "eval.jsonl"


def labelled_runs(ex):
    runs, run = [], []
    for t, lab in zip(ex["input_ids"], ex["labels"]):
        if lab != IGNORE_INDEX:
            run.append(t)
        elif run:
            runs, run = runs + [run], []
    return runs + ([run] if run else [])


def test_longrope_run_records_both_sides_and_how_to_serve(families, helpers, tmp_path, capsys):
    path = families.dir("phi3.5-mini")
    data = write_data(families, "phi3.5-mini", tmp_path / "data")
    run = tmp_path / "run"
    train(helpers.make_cfg(run, path, data, "data.max_length=256", "training_config.max_steps=2"))
    record = json.loads((run / "longrope.json").read_text(encoding="utf-8"))
    short, long = record["short"]["conversations"], record["long"]["conversations"]
    assert record["original_max_position_embeddings"] == 48 and short > 0 and long > 0
    assert short + long == len(data[0].read_text(encoding="utf-8").splitlines())
    assert record["advice"] in capsys.readouterr().out  # said in the log
    assert record["advice"] in (run / "README.md").read_text(encoding="utf-8")
    assert check_cli(run) == 0
    out = capsys.readouterr().out
    assert "warning: LongRoPE: trained on both sides of the switch at 48 tokens" in out


def test_longrope_run_within_the_switch_serves_short_and_stays_tied(families, helpers, tmp_path, capsys):
    path = families.dir("phi4-mini")
    data = write_data(families, "phi4-mini", tmp_path / "data")
    run = tmp_path / "run"
    result = train(helpers.make_cfg(run, path, data, "data.max_length=48", "training_config.max_steps=2"))
    model = result.model  # tied embeddings stay one tensor through training
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    record = json.loads((run / "longrope.json").read_text(encoding="utf-8"))
    assert record["long"]["conversations"] == 0 and record["short"]["conversations"] > 0
    assert "--max-model-len 48" in (run / "README.md").read_text(encoding="utf-8")
    capsys.readouterr()
    assert check_cli(run) == 0
    assert "note: LongRoPE: trained with the short factors only" in capsys.readouterr().out


def test_gemma2_trains_with_softcapped_attention_said_once(families, helpers, tmp_path, capsys, monkeypatch):
    path = families.dir("gemma2")
    data = write_data(families, "gemma2", tmp_path / "data", copies=2)
    result = train(helpers.make_cfg(tmp_path / "run", path, data, "data.max_length=256",
                                    "training_config.max_steps=2"))
    out = capsys.readouterr().out
    assert out.count("philora_softcap") == 1 and "softcap 50" in out
    assert result.model.config._attn_implementation == "philora_softcap"
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "run" / "longrope.json").exists()


TOOLS = [{"name": "get_weather", "description": "Current weather in a city",
          "parameters": {"city": {"type": "str", "description": "The city"}}}]
CALL = '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}}]<|/tool_call|>'


def test_phi4_mini_tool_calling_trains_on_calls_and_answers(families):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(families.dir("phi4-mini"))
    record = {"messages": [
        {"role": "system", "content": "You can use tools.", "tools": TOOLS},
        {"role": "user", "content": "What is the weather like in Paris today?"},
        {"role": "assistant", "content": CALL},
        {"role": "tool", "content": '{"temperature": 21}'},
        {"role": "assistant", "content": "It is 21 degrees in Paris."}]}
    ex = encode_chat(to_messages(record, "auto", "tools.jsonl:1"), tok)
    text = tok.decode(ex["input_ids"])
    assert text.startswith("<|system|>You can use tools.<|tool|>" + json.dumps(TOOLS) + "<|/tool|><|end|>"
                           "<|user|>What is the weather like in Paris today?<|end|><|assistant|>" + CALL)
    assert [tok.decode(r) for r in labelled_runs(ex)] == [CALL + "<|end|>", "It is 21 degrees in Paris.<|end|>"]
    # a tools string is taken as it is
    as_text = dict(record, messages=[dict(record["messages"][0], tools=json.dumps(TOOLS))] + record["messages"][1:])
    assert encode_chat(to_messages(as_text, "auto", "tools.jsonl:2"), tok) == ex


@pytest.mark.parametrize("message, needle", [
    ({"role": "user", "content": "Hi", "tools": TOOLS}, "message 1 has 'tools', which go on the system message"),
    ({"role": "system", "content": "Hi", "tools": 5}, "message 1 'tools' must be a JSON string, list or object"),
    ({"role": "system", "content": "Hi", "tools": " "}, "message 1 'tools' must be a JSON string, list or object"),
])
def test_misplaced_or_malformed_tools_are_one_line_errors(message, needle, helpers):
    record = {"messages": [message, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    with pytest.raises(DataError) as e:
        to_messages(record, "auto", "tools.jsonl:3")
    helpers.one_line_error(e, "tools.jsonl:3", needle)


@pytest.mark.parametrize("name, model", [("phi35-mini-lora.yaml", "microsoft/Phi-3.5-mini-instruct"),
                                         ("phi4-mini-lora.yaml", "microsoft/Phi-4-mini-instruct")])
def test_shipped_longrope_configs_stay_on_the_short_side(name, model):
    from philora.core.config import CONFIG_DIR, load_config
    cfg = load_config(str(CONFIG_DIR / name))
    assert cfg.model.name_or_path == model and cfg.model.trust_remote_code is False
    assert cfg.data.max_length <= 4096  # both switch at original_max_position_embeddings 4096


def test_adapter_check_warns_about_longrope_for_an_adapter_without_record(families, helpers, tmp_path, capsys):
    from philora.model.adapter import save_adapter
    from philora.core.config import ModelConfig, PeftConfig
    from philora.model.inject import inject_lora
    from philora.model.loading import load_model_and_tokenizer
    path = families.dir("phi3.5-mini")
    model, _, _ = load_model_and_tokenizer(ModelConfig(name_or_path=path, dtype="float32"))
    pc = PeftConfig(r=4, lora_alpha=8, target_modules=["o_proj"])
    inject_lora(model, pc)
    save_adapter(model, tmp_path / "adapter", path, pc)
    capsys.readouterr()
    assert check_cli(tmp_path / "adapter") == 0
    assert "vLLM --max-model-len <= 48 for the short factors" in capsys.readouterr().out
