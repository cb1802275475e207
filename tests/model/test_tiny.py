"""The built-in tiny model: loads with the Auto classes, is deterministic and behaves like Phi-3."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from philora.model import tiny
from philora.data.build import SAMPLE_EVAL, SAMPLE_TRAIN
from philora.model.tiny import PHI3_ADDED_TOKENS, TINY_NAME, build_tiny, resolve_model

CONVERSATIONS = [
    [{"role": "user", "content": "What is 17 plus 25?"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."}],
    [{"role": "user", "content": "Hi!\nCan you help me?"},
     {"role": "assistant", "content": "  Of course.\n\nWhat do you need?"},
     {"role": "user", "content": "Spell héllo backwards 🙂"},
     {"role": "assistant", "content": "o-l-l-é-h"}],
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


def test_loads_with_auto_classes(tiny_dir, tok):
    names = {p.name for p in tiny_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= names
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert model.config.model_type == "phi3" and model.dtype == torch.float32
    assert model.config.vocab_size % 64 == 0 and len(tok) <= model.config.vocab_size < len(tok) + 64
    assert not model.config.tie_word_embeddings
    assert 2e6 < sum(p.numel() for p in model.parameters()) < 10e6
    ids = tok.convert_tokens_to_ids
    assert model.generation_config.eos_token_id == [ids("<|endoftext|>"), ids("<|end|>"), ids("<|assistant|>")]
    assert model.config.eos_token_id == model.config.pad_token_id == tok.eos_token_id


def test_build_is_deterministic(tiny_dir, tmp_path):
    again = build_tiny(tmp_path / "again")
    files = sorted(p.name for p in tiny_dir.iterdir())
    assert files == sorted(p.name for p in again.iterdir())
    for name in files:
        assert (tiny_dir / name).read_bytes() == (again / name).read_bytes(), name


def test_special_tokens_like_phi3(tok):
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.bos_token == "<s>" and tok.padding_side == "left"
    assert tok("What is 1 plus 2?")["input_ids"][0] != tok.bos_token_id  # no BOS added
    added = {t.content: t for t in tok.backend_tokenizer.get_added_tokens_decoder().values()}
    for name in PHI3_ADDED_TOKENS:
        assert len(tok(name)["input_ids"]) == 1 and tok.convert_ids_to_tokens(tok(name)["input_ids"]) == [name]
        assert added[name].special and added[name].rstrip == (name != "<|endoftext|>")
    # the newline (and any whitespace) after <|user|> / <|end|> produces no token
    hi = tok("Hi")["input_ids"]
    u, e = tok.convert_tokens_to_ids(["<|user|>", "<|end|>"])
    assert tok("<|user|>\nHi<|end|>\n")["input_ids"] == [u, *hi, e]
    assert tok("<|user|>\n  Hi<|end|>\n\n")["input_ids"] == [u, *hi, e]


@pytest.mark.parametrize("text", ["What is 17 plus 25?", "  two spaces, a tab\tand\nnew\n\nlines\n",
                                  "Reykjavík, Bogotá, héllo, 世界, emoji 🙂!", "x = [1, 2, 3]  # 42"])
def test_text_round_trips(tok, text):
    ids = tok(text)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text


@pytest.fixture(scope="module")
def real(phi3_tokenizer_dir):
    return AutoTokenizer.from_pretrained(phi3_tokenizer_dir)


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_matches_real_phi3(tok, real, messages, add_generation_prompt):
    kwargs = dict(tokenize=False, add_generation_prompt=add_generation_prompt)
    text = tok.apply_chat_template(messages, **kwargs)
    assert text == real.apply_chat_template(messages, **kwargs)
    # and the special tokens fall in the same places (same rstrip behaviour)
    specials = lambda t: [x for x in t.convert_ids_to_tokens(t(text)["input_ids"]) if x in PHI3_ADDED_TOKENS]
    assert specials(tok) == specials(real)


def test_sample_conversations_are_20_to_150_tokens(tok):
    for path in [SAMPLE_TRAIN, SAMPLE_EVAL]:
        with open(path, encoding="utf-8") as f:
            for line in f:
                text = tok.apply_chat_template(json.loads(line)["messages"], tokenize=False)
                assert 20 <= len(tok(text)["input_ids"]) <= 150, text


def test_forward_pass_gives_finite_logits(tiny_dir, tok):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    ids = tok.apply_chat_template(CONVERSATIONS[1], tokenize=False)
    batch = tok([ids, "Hello"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_resolve_model_builds_once_and_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv("PHILORA_CACHE", str(tmp_path))
    assert resolve_model("microsoft/Phi-3-mini-4k-instruct") == "microsoft/Phi-3-mini-4k-instruct"
    assert resolve_model("/some/local/dir") == "/some/local/dir"
    path = resolve_model("tiny")
    assert Path(path) == tmp_path / TINY_NAME and (Path(path) / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [TINY_NAME]  # no temp dir left behind

    def must_not_build(*args, **kwargs):
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setattr(tiny, "build_tiny", must_not_build)
    assert resolve_model("tiny") == path


def test_resolve_model_keeps_the_winner_of_a_race(tmp_path, monkeypatch):
    monkeypatch.setenv("PHILORA_CACHE", str(tmp_path))
    target = tmp_path / TINY_NAME
    real_build = tiny.build_tiny

    def build_while_another_process_wins(path, seed=0):
        real_build(path, seed)
        shutil.copytree(path, target)  # the other process renames its build in first
        (target / "winner").write_text("theirs")

    monkeypatch.setattr(tiny, "build_tiny", build_while_another_process_wins)
    assert resolve_model("tiny") == str(target)
    assert (target / "winner").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == [TINY_NAME]
