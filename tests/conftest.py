"""Shared fixtures: a private philora cache (never ~/.cache), the built-in tiny model built once, a
smaller GQA Phi-3 with the same tokenizer, the real Phi-3 tokenizer (tests/fixtures), and a few
sample conversations as files.

Kept small and generic; test files define their own specialised fixtures.
"""

import os
import shutil
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def philora_cache(tmp_path_factory):
    """A session-wide PHILORA_CACHE directory (tests never write to ~/.cache/philora)."""
    return tmp_path_factory.mktemp("philora-cache")


@pytest.fixture(autouse=True)
def _private_philora_cache(philora_cache, monkeypatch):
    monkeypatch.setenv("PHILORA_CACHE", str(philora_cache))


@pytest.fixture(scope="session")
def phi3_tokenizer_dir():
    """Phi-3-mini's tokenizer (pieces, ids, added tokens, whitespace handling, chat template), kept in
    the repository: tests/fixtures/phi3-tokenizer (see tests/fixtures/README.md)."""
    return FIXTURES / "phi3-tokenizer"


@pytest.fixture(scope="session")
def tiny_model_dir(philora_cache):
    """The built-in tiny Phi-3 (real tokenizer and chat template), built once into the private
    cache, so ``model.name_or_path: tiny`` resolves to it without rebuilding."""
    from philora.tiny import resolve_model
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PHILORA_CACHE", str(philora_cache))
        path = resolve_model("tiny")
    assert os.path.commonpath([path, str(philora_cache)]) == str(philora_cache)
    return path


@pytest.fixture(scope="session")
def small_model_dir(tiny_model_dir, tmp_path_factory):
    """A smaller Phi-3 with grouped-query attention (64 hidden, 2 layers, 4 heads, 2 kv heads)
    and the tiny model's tokenizer and chat template."""
    import torch
    from transformers import AutoConfig, Phi3Config, Phi3ForCausalLM
    out = tmp_path_factory.mktemp("small-phi3")
    base = AutoConfig.from_pretrained(tiny_model_dir)
    config = Phi3Config(vocab_size=base.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        original_max_position_embeddings=512, tie_word_embeddings=False,
                        bos_token_id=base.bos_token_id, eos_token_id=base.eos_token_id,
                        pad_token_id=base.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        Phi3ForCausalLM(config).save_pretrained(out)
    for f in Path(tiny_model_dir).iterdir():
        if f.name not in ("config.json", "generation_config.json", "model.safetensors"):
            shutil.copy(f, out / f.name)
    return str(out)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """24 train and 8 eval conversations from the shipped sample."""
    from philora.sample import SAMPLE_EVAL, SAMPLE_TRAIN
    d = tmp_path_factory.mktemp("data")
    train_lines = SAMPLE_TRAIN.read_text(encoding="utf-8").splitlines()[:24]
    eval_lines = SAMPLE_EVAL.read_text(encoding="utf-8").splitlines()[:8]
    (d / "train.jsonl").write_text("\n".join(train_lines) + "\n", encoding="utf-8")
    (d / "eval.jsonl").write_text("\n".join(eval_lines) + "\n", encoding="utf-8")
    return d / "train.jsonl", d / "eval.jsonl"
