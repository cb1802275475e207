"""philora.use.generate: chat template in, stop on the end-of-turn token (never printed), streaming,
prompt files, chat history, and base + adapter == merged directory."""

import io
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from philora.use import generate
from philora.use.generate import chat_ids, generate_ids
from philora.model.loading import load_source
from philora.model.families import stop_token_ids
from philora.use.merge import merge

SCALE = 10.0


@pytest.fixture(scope="module")
def scripted(tiny_model_dir, tmp_path_factory):
    """The tiny model rewired so greedy decoding answers any prompt with two fixed tokens, then
    <|end|>: attention and MLP outputs are zeroed (each position sees only its own token), one-hot
    embeddings chain <|assistant|> -> t1 -> t2 -> <|end|> through the LM head. Its generation
    config knows only <|endoftext|>, so stopping on <|end|> comes from philora's stop tokens."""
    path = tmp_path_factory.mktemp("scripted")
    shutil.copytree(tiny_model_dir, path, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    t1, t2 = tok("Paris is", add_special_tokens=False)["input_ids"][:2]
    chain = [tok.convert_tokens_to_ids("<|assistant|>"), t1, t2, tok.convert_tokens_to_ids("<|end|>")]
    hidden = model.config.hidden_size
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for k, (here, nxt) in enumerate(zip(chain, chain[1:])):
            model.model.embed_tokens.weight[here] = torch.nn.functional.one_hot(torch.tensor(k), hidden).float()
            model.lm_head.weight[nxt, k] = SCALE
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    return path, tok.decode([t1, t2]).strip(), chain


def test_stops_on_end_token_and_never_prints_it(scripted, capsys):
    path, reply, chain = scripted
    model, tok, _ = load_source(str(path))
    ids = chat_ids(tok, [{"role": "user", "content": "What is the capital of France?"}])
    assert ids[-1] == chain[0]  # the prompt ends with the assistant header
    assert chain[-1] in stop_token_ids(model, tok) and model.generation_config.eos_token_id == tok.eos_token_id
    assert generate_ids(model, tok, [ids], max_new_tokens=20) == [chain[1:3]]
    with torch.no_grad():  # without stop tokens it would go on (reference: plain transformers)
        raw = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert raw[0, len(ids):len(ids) + 3].tolist() == chain[1:] and raw.shape[1] == len(ids) + 6
    capsys.readouterr()
    for stream in (True, False):
        assert generate.generate_cli(str(path), prompt="Hello?", stream=stream, temperature=0) == 0
        out = capsys.readouterr().out
        assert out.strip() == reply and "<|end|>" not in out and "<|endoftext|>" not in out


def test_prompts_file_to_jsonl(scripted, tmp_path):
    path, reply, _ = scripted
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "Hi"},
            {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}]
    prompts.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out.jsonl"
    assert generate.generate_cli(str(path), prompts=str(prompts), out=str(out), system="Be brief.") == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert got == [{"prompt": "Hi", "response": reply},
                   {"messages": [{"role": "user", "content": "2+2?"}], "reference": "4", "response": reply}]


def test_sampling_is_seeded(tiny_model_dir):
    model, tok, _ = load_source(tiny_model_dir)
    ids = [chat_ids(tok, [{"role": "user", "content": "Tell me a story."}])]
    run = lambda seed: generate_ids(model, tok, ids, temperature=1.0, top_p=0.95, max_new_tokens=12, seed=seed)
    assert run(0) == run(0)
    assert run(0) != run(1)


def test_adapter_unmerged_and_merged_reply_alike(tiny_model_dir, tmp_path, helpers):
    run = tmp_path / "run"
    helpers.make_run(run, tiny_model_dir, tokenizer_dir=tiny_model_dir)
    merged = merge(str(run), tmp_path / "merged")
    messages = [{"role": "user", "content": "What is 2 plus 3?"}]
    replies = []
    for source in (str(run), str(merged)):
        model, tok, _ = load_source(source)
        replies.append(generate_ids(model, tok, [chat_ids(tok, messages)], max_new_tokens=16))
    base, tok, _ = load_source(tiny_model_dir)
    assert replies[0] == replies[1]
    assert replies[0] != generate_ids(base, tok, [chat_ids(tok, messages)], max_new_tokens=16)


def test_chat_keeps_and_resets_the_conversation(scripted, monkeypatch, capsys):
    path, reply, _ = scripted
    seen = []
    real = generate.generate_reply

    def spy(model, tok, messages, *args, **kwargs):
        seen.append([m["content"] for m in messages])
        return real(model, tok, messages, *args, **kwargs)

    monkeypatch.setattr(generate, "generate_reply", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n\nhow are you\n/reset\nagain\n/exit\nnever\n"))
    assert generate.chat(str(path), system="sys", temperature=0) == 0
    assert seen == [["sys", "hello"], ["sys", "hello", reply, "how are you"], ["sys", "again"]]
    assert [line.strip() for line in capsys.readouterr().out.splitlines() if line.strip()] == [reply] * 3


def test_bad_inputs_are_one_line(scripted, tmp_path, capsys, helpers):
    path, _, _ = scripted
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"messages": [{"role": "robot", "content": "x"}]}\n')
    broken_run = tmp_path / "run"
    broken_run.mkdir()
    (broken_run / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    exists = tmp_path / "exists.jsonl"
    exists.write_text("")
    cases = [
        (["generate", path, "--prompts", bad], "bad.jsonl:2: each message needs a role"),
        (["generate", path, "--prompts", tmp_path / "none.jsonl"], "no such file"),
        (["generate", path, "--prompts", bad, "--out", exists], "already exists"),
        (["generate", broken_run, "--prompt", "hi"], "no base_model_name_or_path; pass --base"),
        (["generate", broken_run, "--prompt", "hi", "--base", path], "missing adapter weights"),
        (["generate", path, "--prompt", "hi", "--base", path], "--base is for adapters"),
        (["chat", tmp_path], "not a run, adapter or model directory"),
    ]
    for argv, needle in cases:
        code, err = helpers.run_cli(capsys, *argv)
        assert code == 2 and err.startswith("philora: error:") and needle in err, (argv, err)
